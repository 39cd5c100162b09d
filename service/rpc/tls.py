"""TLS on the gRPC port: the server's credentials from PEM files, read again when the files change.

    certificates = ServerCertificates.load(config.security)   # None: plaintext; ConfigError: bad files
    port = server.add_secure_port(address, certificates.credentials())
    certificates.reload()                                      # SIGHUP: re-read at the next handshake

gRPC asks `ServerCertificates` for its certificate at every TLS handshake (a dynamic certificate
configuration): a rotated certificate serves the next new connection, while connections already
open keep the one they were made with. A set of files that does not load (a key that does not match
its certificate, a half-written file) is logged and the previous certificate kept.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.config import ConfigError, SecurityConfig

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]  # (inode, size, mtime in ns) of each file


@dataclass(frozen=True)
class _Files:
    """The PEM files of one TLS setup: certificate chain, private key, client CA (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)

    def stamp(self) -> Stamp:
        """What changes when a file is rewritten or replaced; cheap enough for every handshake."""
        stamps = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((0, -1, 0))
            else:
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def read(self) -> grpc.ServerCertificateConfiguration:
        """The files as a certificate configuration for gRPC, checked with the ssl module first.

        Raises:
            ConfigError: a file cannot be read, is not PEM, the key does not match the certificate
                (or is encrypted), or the files changed while being read.
        """
        first = [self._bytes(p) for p in self.paths]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # an encrypted key would make OpenSSL prompt for a password: refused instead
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"--tls-cert {self.cert} / --tls-key {self.key}: {_reason(err)}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as err:
                raise ConfigError(f"--tls-client-ca {self.client_ca}: {_reason(err)}") from None
        if [self._bytes(p) for p in self.paths] != first:  # rewritten between the two reads
            raise ConfigError(f"{', '.join(map(str, self.paths))}: changed while being read")
        cert, key, *ca = first
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca[0] if ca else None)

    @staticmethod
    def _bytes(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it: {err.strerror}") from None


def _reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        words = err.reason.replace("_", " ").lower()
        return f"{words} (not a PEM certificate and its matching, unencrypted key?)"
    return str(getattr(err, "strerror", None) or err)


class ServerCertificates:
    """The server's TLS certificate (and client CA), handed to gRPC at each handshake; re-read
    when a file changes, or at the next handshake after `reload()`."""

    def __init__(self, files: _Files) -> None:
        self._files = files
        self._stamp = files.stamp()
        self._initial = files.read()
        self._forced = False
        self._lock = threading.Lock()  # gRPC may ask from several of its threads at once
        self.reloads = 0  # certificates taken from changed files since start

    @classmethod
    def load(cls, security: SecurityConfig) -> ServerCertificates | None:
        """The configured certificates, checked; None when TLS is not configured.

        Raises:
            ConfigError: only one of --tls-cert and --tls-key, --tls-client-ca without them, or
                files that do not load (see `_Files.read`).
        """
        cert, key, ca = security.tls_cert, security.tls_key, security.tls_client_ca
        if cert is None and key is None:
            if ca is not None:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
            return None
        if cert is None or key is None:
            raise ConfigError("--tls-cert and --tls-key go together: give both, or neither for plaintext")
        return cls(_Files(cert, key, ca))

    @property
    def mutual(self) -> bool:
        return self._files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask this object for the certificate at every handshake; with a
        client CA, a client without a certificate signed by it is refused during the handshake."""
        # gRPC's fetcher returns None for "no change" (its docs); the stubs say it never does
        fetch: Any = self._fetch
        return grpc.dynamic_ssl_server_credentials(
            self._initial, fetch, require_client_authentication=self.mutual
        )

    def reload(self) -> None:
        """Re-read the files at the next handshake, changed or not (SIGHUP)."""
        self._forced = True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: a new configuration, or None to keep the current one."""
        with self._lock:
            stamp = self._files.stamp()
            if stamp == self._stamp and not self._forced:
                return None
            self._stamp, self._forced = stamp, False
            try:
                configuration = self._files.read()
            except ConfigError as err:
                log.warning("TLS files changed, but %s: the previous certificate stays", err)
                return None
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self._files.cert)
            return configuration
