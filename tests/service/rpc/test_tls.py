"""TLS and mutual TLS on the gRPC port (service/rpc/tls.py): the real server on loopback, clients of
service.client with certificates from a throwaway CA (tests/service/certs.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from service.client import TranslatorClient, TranslatorError
from service.config import ConfigError, EngineConfig, SecurityConfig
from service.engine.engine import Engine
from service.rpc.tls import ServerCertificates
from tests.service.certs import CertificateAuthority, Pki, write_pki
from tests.service.server_fixture import ServerThread, loopback_config

ROOT = Path(__file__).resolve().parents[3]
CATS = "I love cats."


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


def secured(engine: Engine, security: SecurityConfig) -> ServerThread:
    return ServerThread(replace(loopback_config(), security=security), engine)


@pytest.fixture(scope="module")
def mutual(engine: Engine, pki: Pki) -> Iterator[ServerThread]:
    """Mutual TLS: client certificates signed by the CA required."""
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    with secured(engine, security) as running:
        yield running


def translated(target: str, **tls: object) -> str:
    with TranslatorClient(target, timeout=30, **tls) as client:  # type: ignore[arg-type]
        return client.translate([CATS])[0].text


def refused(target: str, **tls: object) -> str:
    """The status code of a Translate call that must fail: the handshake's failure is UNAVAILABLE
    at once (the client's retries included), not a deadline."""
    with pytest.raises(TranslatorError) as info:
        translated(target, **tls)
    return info.value.code


def test_a_client_with_a_certificate_of_the_ca_is_served(mutual: ServerThread, pki: Pki) -> None:
    mine = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    assert translated(mutual.target, **mine) == "J'aime les chats."
    assert mutual.running.certificates is not None and mutual.running.certificates.mutual


def test_plaintext_stranger_and_certificateless_clients_are_refused(mutual: ServerThread, pki: Pki) -> None:
    assert refused(mutual.target) == "UNAVAILABLE"  # plaintext to a TLS port
    assert refused(mutual.target, tls_ca=pki.ca) == "UNAVAILABLE"  # TLS, but no client certificate
    stranger = {"tls_ca": pki.ca, "tls_cert": pki.rogue_cert, "tls_key": pki.rogue_key}
    assert refused(mutual.target, **stranger) == "UNAVAILABLE"  # a certificate of another CA
    # the server's certificate is not trusted by a client that only knows the system's CAs
    mine = {"tls_cert": pki.client_cert, "tls_key": pki.client_key}
    assert refused(mutual.target, tls=True, **mine) == "UNAVAILABLE"
    assert translated(mutual.target, tls_ca=pki.ca, **mine)  # and the server still serves


def test_tls_without_client_certificates_serves_any_client_that_trusts_it(engine: Engine, pki: Pki) -> None:
    with secured(engine, SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)) as server:
        assert translated(server.target, tls_ca=pki.ca) == "J'aime les chats."
        assert refused(server.target) == "UNAVAILABLE"


def test_a_changed_certificate_serves_new_connections_and_a_bad_one_is_not_taken(
    engine: Engine, tmp_path: Path
) -> None:
    first, second = CertificateAuthority("first"), CertificateAuthority("second")
    cert, key = first.issue("localhost", server=True).write(tmp_path / "server")
    first_ca, second_ca = first.write(tmp_path / "first.crt"), second.write(tmp_path / "second.crt")
    with secured(engine, SecurityConfig(tls_cert=cert, tls_key=key)) as server:
        certificates = server.running.certificates
        assert certificates is not None
        assert translated(server.target, tls_ca=first_ca)
        # rotated as a deployment would: the new pair written beside, then moved over the old one
        rotated = second.issue("localhost", server=True).write(tmp_path / "rotated")
        for new, old in zip(rotated, (cert, key), strict=True):
            os.replace(new, old)
        assert translated(server.target, tls_ca=second_ca)
        assert refused(server.target, tls_ca=first_ca) == "UNAVAILABLE"
        assert certificates.reloads == 1
        # a certificate without its key (a rotation half done) is not taken: the last good one stays
        cert.write_bytes(first.issue("localhost", server=True).cert)
        assert translated(server.target, tls_ca=second_ca)
        assert certificates.reloads == 1


def test_reload_rereads_files_whose_change_the_stamp_cannot_see(engine: Engine, tmp_path: Path) -> None:
    """SIGHUP's `reload()`: files rewritten in place with their size and time kept are re-read."""
    first, second = CertificateAuthority("first"), CertificateAuthority("second")
    old, new = first.issue("localhost", server=True), second.issue("localhost", server=True)
    while len(new.cert) != len(old.cert) or len(new.key) != len(old.key):  # DER lengths vary by a byte
        new = second.issue("localhost", server=True)
    cert, key = old.write(tmp_path / "server")
    with secured(engine, SecurityConfig(tls_cert=cert, tls_key=key)) as server:
        certificates = server.running.certificates
        assert certificates is not None
        times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (cert, key)]
        for path, data, ns in zip((cert, key), (new.cert, new.key), times, strict=True):
            with path.open("r+b") as f:  # the same inode, the same size
                f.write(data)
            os.utime(path, ns=ns)
        assert translated(server.target, tls_ca=first.write(tmp_path / "first.crt"))
        certificates.reload()
        assert translated(server.target, tls_ca=second.write(tmp_path / "second.crt"))
        assert certificates.reloads == 1


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls_cert": "server.crt"}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": "ca.crt"}, "--tls-client-ca needs --tls-cert and --tls-key"),
        ({"tls_cert": "server.crt", "tls_key": "client.key"}, "--tls-cert"),  # not its key
        ({"tls_cert": "server.crt", "tls_key": "missing.key"}, "missing.key: cannot read it"),
        (
            {"tls_cert": "server.crt", "tls_key": "server.key", "tls_client_ca": "server.key"},
            "--tls-client-ca",
        ),
    ],
)
def test_tls_files_that_do_not_fit_are_a_config_error(pki: Pki, files: dict[str, str], message: str) -> None:
    directory = pki.ca.parent
    with pytest.raises(ConfigError, match=message):
        ServerCertificates.load(SecurityConfig(**{k: directory / v for k, v in files.items()}))  # type: ignore[arg-type]


def test_the_server_exits_with_one_line_on_a_key_that_is_not_the_certificates(
    pki: Pki, tmp_path: Path
) -> None:
    key = shutil.copy(pki.client_key, tmp_path / "wrong.key")
    command = [sys.executable, "-m", "service", "--tls-cert", str(pki.server_cert), "--tls-key", str(key)]
    command += ["--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("python -m service: --tls-cert") and "wrong.key" in line
