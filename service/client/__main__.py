"""`python -m service.client`: the command line (service/client/cli.py)."""

import sys

from service.client.cli import main

sys.exit(main())
