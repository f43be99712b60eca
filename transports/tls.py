"""The x509 credentials of a migration over TLS, checked before anything changes.

QEMU's ``tls-creds-x509`` object reads fixed file names from one directory, which livemig expects
at the same path on both hosts (libvirt's convention, :data:`DEFAULT_DIR` by default)::

    source (endpoint=client)   ca-cert.pem  client-cert.pem  client-key.pem
    target (endpoint=server)   ca-cert.pem  server-cert.pem  server-key.pem

Each side verifies its peer against its own ``ca-cert.pem``. QEMU would only find out once the
migration has started, in a TLS handshake error that names no file; so before touching anything
livemig checks:

- :func:`check_client_dir`: the source's own files are there and readable, the client certificate
  is signed by the CA, valid now, usable by a TLS client, and the key is its key;
- :func:`check_server_cert`: the target's server certificate (the caller fetched its bytes from the
  target) verifies against *our* CA, is valid now, usable by a TLS server, and names the host the
  source connects to (``tls-hostname``: a DNS name or an IP address);
- :func:`check_client_cert`: our client certificate verifies against the *target's* CA.

Every refusal is a :class:`~livemig.transports.errors.UsageError` that names the file and the
reason. The checks run the ``openssl`` command-line tool (no Python crypto library is needed), on
temporary files in a private directory; they block, so async callers run them in a thread. Only
the CA given is trusted: never the system's trust store (``openssl verify`` would otherwise also
look a certificate's issuer up there, and a certificate from any public CA would pass).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from livemig.transports.errors import UsageError

__all__ = [
    "CA",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "DEFAULT_DIR",
    "SERVER_CERT",
    "SERVER_KEY",
    "check_client_cert",
    "check_client_dir",
    "check_server_cert",
]

CA = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
#: Where libvirt keeps QEMU's credentials; livemig's default on both hosts.
DEFAULT_DIR = Path("/etc/pki/qemu")

Purpose = Literal["sslserver", "sslclient"]
_USE = {"sslserver": "a TLS server (serverAuth)", "sslclient": "a TLS client (clientAuth)"}
# ``openssl verify`` prints one line per problem it finds (it goes on after most of them).
_VERIFY_ERROR = re.compile(r"^error (\d+) at (\d+) depth lookup: ?(.*)$", re.MULTILINE)
# No trust store of the system's: ``openssl x509`` loads the default one for nothing (some 40 ms),
# ``openssl verify`` looks issuers up in it unless told not to (``-no-CApath -no-CAstore``).
_NO_SYSTEM_STORE = {"SSL_CERT_FILE": os.devnull, "SSL_CERT_DIR": os.devnull}
# X509_V_ERR_* codes (openssl/x509_vfy.h) that mean "this CA did not sign it".
_NOT_SIGNED = frozenset({2, 7, 18, 19, 20, 21})
_NOT_YET_VALID, _EXPIRED, _INVALID_CA, _PURPOSE = 9, 10, 24, 26
_HOSTNAME_MISMATCH, _IP_MISMATCH = 62, 64


def check_client_dir(tls_dir: Path) -> None:
    """Check the source's own credentials in ``tls_dir``: :data:`CA`, :data:`CLIENT_CERT` and
    :data:`CLIENT_KEY` are there and readable, the client certificate is signed by the CA, valid
    now and usable by a TLS client, and the key is the certificate's key.

    :raise UsageError: naming the file and what is wrong with it (every missing or unreadable
        file at once), or when ``openssl`` is missing.
    """
    if not tls_dir.is_dir():
        raise UsageError(f"the TLS directory {tls_dir} does not exist or is not a directory")
    ca, cert, key = (tls_dir / name for name in (CA, CLIENT_CERT, CLIENT_KEY))
    problems = [p for p in map(_unreadable, (ca, cert, key)) if p]
    if problems:
        raise UsageError(f"the TLS directory {tls_dir} is not usable: {'; '.join(problems)}")
    _require_certificate(ca, str(ca))
    if _public_key_of_certificate(cert, str(cert)) != _public_key_of_key(key, str(key)):
        raise UsageError(f"{key} is not the private key of {cert}")
    _verify(ca, cert, purpose="sslclient", ca_name=str(ca), cert_name=str(cert))


def check_server_cert(
    ca_pem: bytes,
    server_cert_pem: bytes,
    *,
    hostname: str,
    ca_name: str = CA,
    cert_name: str = f"{SERVER_CERT} on the target",
) -> None:
    """Check the target's server certificate against our CA: signed by it, valid now, usable by
    a TLS server, and naming ``hostname`` (an IP address must be among its IP addresses, a name
    among its DNS names: as QEMU's ``tls-hostname`` is matched).

    :param ca_pem: our ``ca-cert.pem``.
    :param server_cert_pem: the target's ``server-cert.pem``, as fetched from it.
    :param hostname: what the source connects to (QEMU's ``tls-hostname``).
    :param ca_name: what messages call the CA file (its path on this host).
    :param cert_name: what messages call the certificate.
    :raise UsageError: naming the certificate and the reason, or when ``openssl`` is missing.
    """
    host = hostname.removeprefix("[").removesuffix("]")
    if not host:
        raise UsageError("the TLS hostname to check the target's certificate for is empty")
    with _private_dir() as tmp:
        ca, cert = _write(tmp, CA, ca_pem), _write(tmp, SERVER_CERT, server_cert_pem)
        _require_certificate(ca, ca_name)
        _require_certificate(cert, cert_name)
        _verify(ca, cert, purpose="sslserver", ca_name=ca_name, cert_name=cert_name, host=host)


def check_client_cert(
    ca_pem: bytes,
    client_cert_pem: bytes,
    *,
    ca_name: str = f"{CA} on the target",
    cert_name: str = CLIENT_CERT,
) -> None:
    """Check our client certificate against the target's CA: signed by it, valid now and usable
    by a TLS client (the target's QEMU verifies its peer: ``verify-peer=on``).

    :param ca_pem: the target's ``ca-cert.pem``, as fetched from it.
    :param client_cert_pem: our ``client-cert.pem``.
    :param ca_name: what messages call the CA file.
    :param cert_name: what messages call the certificate (its path on this host).
    :raise UsageError: naming the certificate and the reason, or when ``openssl`` is missing.
    """
    with _private_dir() as tmp:
        ca, cert = _write(tmp, CA, ca_pem), _write(tmp, CLIENT_CERT, client_cert_pem)
        _require_certificate(ca, ca_name)
        _require_certificate(cert, cert_name)
        _verify(ca, cert, purpose="sslclient", ca_name=ca_name, cert_name=cert_name)


def _private_dir() -> tempfile.TemporaryDirectory[str]:
    """A temporary directory only we can enter (``mkdtemp`` makes it 0700)."""
    return tempfile.TemporaryDirectory(prefix="livemig-tls-")


def _write(directory: str, name: str, data: bytes) -> Path:
    path = Path(directory) / name
    path.write_bytes(data)
    return path


def _unreadable(path: Path) -> str:
    """Why ``path`` cannot be read as a file, or ``""``."""
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror})"
    return ""


def _openssl(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("openssl")
    if binary is None:
        raise UsageError(
            "openssl is not installed: livemig checks the TLS credentials with it "
            "(Debian: apt-get install openssl)"
        )
    try:
        return subprocess.run(
            [binary, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env={**os.environ, **_NO_SYSTEM_STORE},
            check=False,
        )
    except OSError as err:
        raise UsageError(f"cannot run {binary}: {err}") from err


def _require_certificate(path: Path, name: str) -> None:
    if _openssl(["x509", "-noout", "-in", str(path)]).returncode != 0:
        raise UsageError(f"{name} is not a PEM certificate")


def _public_key_of_certificate(path: Path, name: str) -> str:
    result = _openssl(["x509", "-noout", "-pubkey", "-in", str(path)])
    if result.returncode != 0:
        raise UsageError(f"{name} is not a PEM certificate")
    return result.stdout


def _public_key_of_key(path: Path, name: str) -> str:
    # An empty pass phrase: an encrypted key fails here instead of prompting on the terminal.
    result = _openssl(["pkey", "-pubout", "-passin", "pass:", "-in", str(path)])
    if result.returncode != 0:
        raise UsageError(f"{name} is not an unencrypted PEM private key")
    return result.stdout


def _host_option(host: str) -> list[str]:
    try:
        return ["-verify_ip", str(ipaddress.ip_address(host))]
    except ValueError:
        return ["-verify_hostname", host]


def _verify(
    ca: Path,
    cert: Path,
    *,
    purpose: Purpose,
    ca_name: str,
    cert_name: str,
    host: str | None = None,
) -> None:
    """``openssl verify`` of ``cert`` against ``ca``, each problem it reports in our words."""
    args = ["verify", "-CAfile", str(ca), "-no-CApath", "-no-CAstore", "-purpose", purpose]
    args += _host_option(host) if host is not None else []
    result = _openssl([*args, str(cert)])
    output = result.stdout + result.stderr
    errors = [(int(code), int(depth), text) for code, depth, text in _VERIFY_ERROR.findall(output)]
    if result.returncode == 0 and not errors:
        return
    if not errors:
        raise UsageError(f"openssl cannot verify {cert_name} against {ca_name}: {output.strip()}")
    reasons: list[str] = []
    for code, depth, text in errors:
        subject = cert_name if depth == 0 else f"the CA certificate in {ca_name}"
        if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
            reason = f"{subject} does not name {host} ({_names(cert)})"
        else:
            reason = _reason(code, text, subject=subject, ca_name=ca_name, purpose=purpose)
        if code == _EXPIRED and depth == 0:
            reason += f" on {_end_date(cert)}"
        if reason not in reasons:
            reasons.append(reason)
    raise UsageError("; ".join(reasons))


def _reason(code: int, text: str, *, subject: str, ca_name: str, purpose: Purpose) -> str:
    """One verification error as a sentence about ``subject``."""
    if code in _NOT_SIGNED:
        return f"{subject} is not signed by the CA in {ca_name}"
    if code == _EXPIRED:
        return f"{subject} expired"
    if code == _NOT_YET_VALID:
        return f"{subject} is not valid yet"
    if code == _INVALID_CA:
        return f"the certificate in {ca_name} is not a CA certificate (basicConstraints CA:TRUE)"
    if code == _PURPOSE:
        return f"{subject} is not for use by {_USE[purpose]}"
    return f"{subject} does not verify against the CA in {ca_name}: {text} (openssl error {code})"


def _end_date(cert: Path) -> str:
    result = _openssl(["x509", "-noout", "-enddate", "-in", str(cert)])
    return result.stdout.strip().removeprefix("notAfter=")


def _names(cert: Path) -> str:
    """The names a certificate carries, for a message."""
    result = _openssl(["x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)])
    # A heading ("X509v3 Subject Alternative Name:"), then the names on the next line.
    names = " ".join(line.strip() for line in result.stdout.splitlines()[1:])
    return f"it names {names}" if names else "it has no subjectAltName"
