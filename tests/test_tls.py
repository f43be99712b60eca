"""livemig.transports.tls: x509 credentials refused before a migration, each with the file and
the reason. Certificates are made with the openssl CLI (``make_x509_dir``); no QEMU, no network."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from livemig.guest._hosts import X509Ca, make_x509_dir
from livemig.transports.errors import UsageError
from livemig.transports.tls import (
    CA,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    check_client_cert,
    check_client_dir,
    check_server_cert,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")

NAMES = ("lm-target", "10.1.2.3")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> X509Ca:
    return X509Ca.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, ca: X509Ca) -> Path:
    """Credentials for the target ``lm-target`` at 10.1.2.3. Read-only: copy it to change it."""
    return make_x509_dir(tmp_path_factory.mktemp("good"), server_names=NAMES, ca=ca)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same names, from another CA."""
    return make_x509_dir(tmp_path_factory.mktemp("other"), server_names=NAMES)


def copy(tls_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tls_dir, tmp_path / "tls"))


def read(tls_dir: Path, name: str) -> bytes:
    return (tls_dir / name).read_bytes()


# --- the good credentials pass ------------------------------------------------------------------


def test_good_dir_passes_every_check(good: Path) -> None:
    check_client_dir(good)
    for hostname in NAMES:
        check_server_cert(read(good, CA), read(good, SERVER_CERT), hostname=hostname)
    check_client_cert(read(good, CA), read(good, CLIENT_CERT))


def test_make_x509_dir_keeps_keys_private(good: Path) -> None:
    assert good.stat().st_mode & 0o777 == 0o700
    for key in ("server-key.pem", CLIENT_KEY):
        assert (good / key).stat().st_mode & 0o777 == 0o600


# --- the local directory ------------------------------------------------------------------------


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"TLS directory .*/nope does not exist"):
        check_client_dir(tmp_path / "nope")


def test_missing_files_are_named_all_at_once(good: Path, tmp_path: Path) -> None:
    tls = copy(good, tmp_path)
    (tls / CA).unlink()
    (tls / CLIENT_KEY).unlink()
    with pytest.raises(UsageError) as info:
        check_client_dir(tls)
    assert str(info.value) == (
        f"the TLS directory {tls} is not usable: ca-cert.pem is missing; client-key.pem is missing"
    )


def test_unreadable_file(good: Path, tmp_path: Path) -> None:
    tls = copy(good, tmp_path)
    (tls / CLIENT_CERT).unlink()
    (tls / CLIENT_CERT).mkdir()  # unreadable even for root, unlike a chmod 000 file
    with pytest.raises(UsageError, match=r"client-cert\.pem cannot be read \(Is a directory\)"):
        check_client_dir(tls)


def test_key_not_matching_cert(good: Path, other: Path, tmp_path: Path) -> None:
    tls = copy(good, tmp_path)
    shutil.copyfile(other / CLIENT_KEY, tls / CLIENT_KEY)
    with pytest.raises(UsageError) as info:
        check_client_dir(tls)
    assert str(info.value) == f"{tls / CLIENT_KEY} is not the private key of {tls / CLIENT_CERT}"


def test_client_cert_of_another_ca(good: Path, other: Path, tmp_path: Path) -> None:
    tls = copy(good, tmp_path)
    for name in (CLIENT_CERT, CLIENT_KEY):
        shutil.copyfile(other / name, tls / name)
    with pytest.raises(UsageError) as info:
        check_client_dir(tls)
    assert str(info.value) == f"{tls / CLIENT_CERT} is not signed by the CA in {tls / CA}"


def test_server_cert_in_the_client_role(good: Path, tmp_path: Path) -> None:
    tls = copy(good, tmp_path)
    shutil.copyfile(good / SERVER_CERT, tls / CLIENT_CERT)
    shutil.copyfile(good / "server-key.pem", tls / CLIENT_KEY)
    with pytest.raises(UsageError, match=r"is not for use by a TLS client \(clientAuth\)$"):
        check_client_dir(tls)


def test_not_a_key(good: Path, tmp_path: Path) -> None:
    tls = copy(good, tmp_path)
    (tls / CLIENT_KEY).write_text("not a key\n")
    with pytest.raises(UsageError, match=r"client-key\.pem is not an unencrypted PEM private key"):
        check_client_dir(tls)


def test_expired_client_cert(ca: X509Ca, tmp_path: Path) -> None:
    tls = make_x509_dir(tmp_path / "tls", server_names=NAMES, ca=ca, days=-1)
    with pytest.raises(
        UsageError, match=rf"^{tls / CLIENT_CERT} expired on \w+ +\d+ [\d:]+ \d+ GMT$"
    ):
        check_client_dir(tls)


# --- the target's server certificate, against our CA --------------------------------------------


def test_server_cert_of_another_ca(good: Path, other: Path) -> None:
    with pytest.raises(UsageError) as info:
        check_server_cert(
            read(good, CA),
            read(other, SERVER_CERT),
            hostname="lm-target",
            ca_name="/x/ca-cert.pem",
        )
    assert (
        str(info.value) == "server-cert.pem on the target is not signed by the CA in /x/ca-cert.pem"
    )


@pytest.mark.parametrize(
    ("names", "hostname", "named"),
    [
        pytest.param(NAMES, "lm-elsewhere", "DNS:lm-target, IP Address:10.1.2.3", id="other-name"),
        pytest.param(NAMES, "10.1.2.4", "DNS:lm-target, IP Address:10.1.2.3", id="other-ip"),
        pytest.param(("lm-target",), "10.1.2.3", "DNS:lm-target", id="ip-not-among-dns-names"),
        pytest.param(("10.1.2.3",), "lm-target", "IP Address:10.1.2.3", id="name-not-among-ips"),
        pytest.param(NAMES, "[fd00::3]", "DNS:lm-target, IP Address:10.1.2.3", id="ipv6"),
    ],
)
def test_server_cert_must_name_the_host(
    ca: X509Ca, tmp_path: Path, names: tuple[str, ...], hostname: str, named: str
) -> None:
    tls = make_x509_dir(tmp_path / "tls", server_names=names, ca=ca)
    host = hostname.strip("[]")
    with pytest.raises(UsageError) as info:
        check_server_cert(read(tls, CA), read(tls, SERVER_CERT), hostname=hostname)
    assert (
        str(info.value) == f"server-cert.pem on the target does not name {host} (it names {named})"
    )


def test_ipv6_address_is_matched_as_an_address(ca: X509Ca, tmp_path: Path) -> None:
    tls = make_x509_dir(tmp_path / "tls", server_names=("lm-target", "fd00::3"), ca=ca)
    for hostname in ("[fd00::3]", "fd00:0::3"):
        check_server_cert(read(tls, CA), read(tls, SERVER_CERT), hostname=hostname)


def test_client_cert_in_the_server_role(good: Path) -> None:
    with pytest.raises(UsageError, match=r"is not for use by a TLS server \(serverAuth\)$"):
        check_server_cert(read(good, CA), read(good, CLIENT_CERT), hostname="livemig-client")


def test_expired_server_cert(ca: X509Ca, tmp_path: Path) -> None:
    tls = make_x509_dir(tmp_path / "tls", server_names=NAMES, ca=ca, days=-1)
    with pytest.raises(UsageError, match=r"^server-cert\.pem on the target expired on "):
        check_server_cert(read(tls, CA), read(tls, SERVER_CERT), hostname="lm-target")


def test_fetched_bytes_that_are_no_certificate(good: Path) -> None:
    with pytest.raises(
        UsageError, match=r"^server-cert\.pem on the target is not a PEM certificate$"
    ):
        check_server_cert(read(good, CA), b"", hostname="lm-target")
    with pytest.raises(UsageError, match=r"^ca-cert\.pem is not a PEM certificate$"):
        check_server_cert(b"junk", read(good, SERVER_CERT), hostname="lm-target")


def test_empty_hostname(good: Path) -> None:
    with pytest.raises(UsageError, match=r"hostname .* is empty"):
        check_server_cert(read(good, CA), read(good, SERVER_CERT), hostname="")


# --- our client certificate, against the target's CA --------------------------------------------


def test_client_cert_against_another_ca(good: Path, other: Path) -> None:
    with pytest.raises(UsageError) as info:
        check_client_cert(read(other, CA), read(good, CLIENT_CERT), cert_name="/x/client-cert.pem")
    assert (
        str(info.value) == "/x/client-cert.pem is not signed by the CA in ca-cert.pem on the target"
    )


def test_the_system_trust_store_is_not_trusted(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate from a CA the system trusts is no certificate from *our* CA: ``openssl
    verify`` also looks issuers up in the default directory (``$SSL_CERT_DIR``) unless told not
    to."""
    public = X509Ca.create(tmp_path / "public", name="a CA the system trusts")
    theirs = make_x509_dir(tmp_path / "theirs", server_names=NAMES, ca=public)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copyfile(public.cert, trusted / "public.pem")
    subprocess.run(["openssl", "rehash", str(trusted)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_DIR", str(trusted))
    with pytest.raises(UsageError, match="is not signed by the CA in"):
        check_server_cert(read(good, CA), read(theirs, SERVER_CERT), hostname="lm-target")
    with pytest.raises(UsageError, match="is not signed by the CA in"):
        check_client_cert(read(good, CA), read(theirs, CLIENT_CERT))


def test_missing_openssl_is_a_usage_error(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="openssl is not installed"):
        check_client_cert(read(good, CA), read(good, CLIENT_CERT))
