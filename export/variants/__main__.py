"""`python -m export.variants`: build the derived variants (export/variants/build.py)."""

from export.variants.build import main

main()
