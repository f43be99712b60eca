"""The cross-host mode: the realistic VM moved across the veth link of a two-host lab.

One lab for the whole invocation (``livemig.guest._hosts.two_hosts``): a *source* and a
*target* network namespace joined by a veth link (``10.199.77.1`` ↔ ``.2``), an sshd in the
target, x509 credentials in QEMU's layout. Every run boots the realistic VM
(``bench/realistic.py``: 1 GiB RAM, 1 GiB of disk data, non-shared storage) with its QEMU in the
source namespace and moves it to the target namespace; the variants (:data:`CROSS_HOST_VARIANTS`)
differ only in how:

- ``livemig-tls``, ``livemig-plain``, ``livemig-tunnel``: ``livemig migrate --to ssh://`` run in
  the source namespace; livemig launches the target QEMU over ssh (``remote-target``, this
  checkout's ``python -m livemig``), the data QEMU to QEMU over TCP with TLS (``--tls-dir``),
  plain TCP (``--insecure``) or through ssh (``--tunnel ssh``);
- ``libvirt-tls``: a ``libvirtd`` in each namespace (``bench/libvirt.py``, each in its own
  mount namespace as in the single-host variant), the target's listening for TLS on its link
  address (``listen_tls``, the lab's CA and server certificate), ``virsh migrate --live --p2p
  --copy-storage-all --tls`` to ``qemu+tls://10.199.77.2/system`` (the source daemon's client
  certificate in libvirt's ``pkipath`` layout), QEMU's migration and NBD over TLS with the same
  credentials (``migrate_tls_x509_cert_dir``).

The consoles, the checks and the figures are the realistic scenario's (both "hosts" see one file
system: the bench dials each console's unix socket and opens each monitor where it is).
Repetitions are interleaved and the order rotates, as in the other modes.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import tempfile
from pathlib import Path

import trio
import trio_asyncio

from bench.libvirt import (
    Daemon,
    LibvirtPeers,
    LibvirtUnavailable,
    PeerLink,
    ensure_installed,
    libvirt_peers,
)
from bench.livemig_run import livemig_remote_argv
from bench.model import RunRecord, Variant
from bench.realistic import RealisticCache, RealisticLab, ensure_cache, kill_qemus_under
from bench.runner import (
    Config,
    Results,
    Saver,
    environment,
    libvirt_run,
    realistic_run,
    rotated,
    run_line,
    say,
)
from bench.scenarios import REALISTIC_SCENARIOS
from livemig.guest import GuestImage, ensure_built
from livemig.guest._hosts import TwoHosts, two_hosts
from livemig.transports.tls import CA, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

__all__ = ["SCENARIO", "data_flags", "libvirt_over_the_link", "run_cross_host"]

#: The VM every cross-host run moves: the realistic one, idle, 1 GiB, non-shared storage.
SCENARIO = REALISTIC_SCENARIOS[0]
#: Where livemig ``--to ssh://`` takes TLS credentials from when it is given none: were it
#: there, ``livemig-plain`` would not be plain.
_DEFAULT_TLS_DIR = Path("/etc/pki/qemu")
#: libvirt's names for a client's credentials in a ``pkipath`` directory (ours → theirs).
_LIBVIRT_CLIENT_PKI = {CA: "cacert.pem", CLIENT_CERT: "clientcert.pem", CLIENT_KEY: "clientkey.pem"}


def data_flags(variant: Variant, hosts: TwoHosts) -> list[str]:
    """How a livemig variant sends the data across the link."""
    if variant == "livemig-tls":
        return ["--tls-dir", str(hosts.tls_dir)]
    if variant == "livemig-plain":
        return ["--insecure"]
    if variant == "livemig-tunnel":
        return ["--tunnel", "ssh"]
    raise ValueError(f"{variant} is not a cross-host livemig variant")


def libvirt_over_the_link(hosts: TwoHosts, pki: Path) -> tuple[Daemon, Daemon, PeerLink]:
    """The two daemons (source, target) and the migration between them over the lab's link,
    TLS throughout: the target daemon's listener, the source daemon's client (its credentials
    copied into ``pki`` under libvirt's names), QEMU's migration and NBD streams."""
    pki.mkdir(mode=0o700, parents=True, exist_ok=True)
    for ours, theirs in _LIBVIRT_CLIENT_PKI.items():
        shutil.copyfile(hosts.tls_dir / ours, pki / theirs)
    tls = hosts.tls_dir
    qemu_conf = f'migrate_tls_x509_cert_dir = "{tls}"\nmigrate_tls_x509_verify = 1\n'
    listener = (
        f'listen_tls = 1\nlisten_tcp = 0\nlisten_addr = "{hosts.target.address}"\n'
        f'ca_file = "{tls / CA}"\ncert_file = "{tls / SERVER_CERT}"\n'
        f'key_file = "{tls / SERVER_KEY}"\n'
    )
    source = Daemon(wrapper=hosts.source.wrapper, qemu_conf=qemu_conf)
    target = Daemon(
        wrapper=hosts.target.wrapper, libvirtd_conf=listener, qemu_conf=qemu_conf, listen=True
    )
    link = PeerLink(
        peer_uri=f"qemu+tls://{hosts.target.address}/system?pkipath={pki}",
        address=hosts.target.address,
        flags=("--tls",),
    )
    return source, target, link


async def run_cross_host(config: Config, results: Results, save: Saver) -> None:
    """Run every repetition of the cross-host variants in one two-host lab, appending to
    ``results`` and calling ``save`` after each repetition."""
    image = await ensure_built()
    results.environment.update(await environment())
    if await trio.Path(_DEFAULT_TLS_DIR).is_dir():
        results.notes.append(
            f"{_DEFAULT_TLS_DIR} exists: livemig-plain (--insecure, no --tls-dir) used TLS "
            "from it, it is not plain TCP"
        )
    base = Path(tempfile.mkdtemp(prefix="livemig-xhost-"))
    try:
        async with trio_asyncio.open_loop(), contextlib.AsyncExitStack() as stack:
            say("cross-host: making the two-host lab (namespaces, veth link, sshd, CA) …")
            hosts = stack.enter_context(two_hosts(base / "hosts"))
            results.environment["link"] = (
                f"veth {hosts.source.address} ({hosts.source.netns}) ↔ {hosts.target.address} "
                f"({hosts.target.netns}), no rate limit"
            )
            peers = await _libvirt(config, results, stack, base, hosts)
            say("realistic VM: writing its images' data (once) …")
            cache = await ensure_cache(base / "realistic-cache")
            for rep in range(1, config.runs + 1):
                for variant in rotated(config.variants, rep - 1):
                    if variant == "libvirt-tls" and peers is None:
                        continue
                    record = await _one_run(
                        variant,
                        hosts=hosts,
                        peers=peers,
                        image=image,
                        work=base / f"r{rep}-{len(results.records)}-{variant}",
                        rep=rep,
                        deadline=config.deadline_s,
                        cache=cache,
                        serial=len(results.records),
                    )
                    results.records.append(record)
                    say(f"[{rep}/{config.runs}] {variant:<15} {run_line(record)}")
                save(results)
        results.finished = True
        commit = (await environment()).get("livemig_commit")
        if commit != results.environment.get("livemig_commit"):
            results.notes.append(
                f"livemig's working tree changed during the run: {commit} at the end"
            )
    finally:
        kill_qemus_under(base)
        shutil.rmtree(base, ignore_errors=True)


async def _libvirt(
    config: Config,
    results: Results,
    stack: contextlib.AsyncExitStack,
    base: Path,
    hosts: TwoHosts,
) -> LibvirtPeers | None:
    if "libvirt-tls" not in config.variants:
        return None
    say("libvirt: a daemon in each namespace, the target's listening for TLS …")
    reason = await ensure_installed(install=config.install)
    if reason is None:
        source, target, link = libvirt_over_the_link(hosts, base / "libvirt-pki")
        try:
            peers = await stack.enter_async_context(
                libvirt_peers(
                    base / "libvirt", source_daemon=source, target_daemon=target, link=link
                )
            )
        except (LibvirtUnavailable, OSError) as err:
            reason = f"libvirt-tls skipped: the daemons could not be started: {err}"
        else:
            results.environment["libvirt"] = peers.version
            return peers
    results.skipped["libvirt-tls"] = reason
    say(reason)
    return None


async def _one_run(
    variant: Variant,
    *,
    hosts: TwoHosts,
    peers: LibvirtPeers | None,
    image: GuestImage,
    work: Path,
    rep: int,
    deadline: float,
    cache: RealisticCache,
    serial: int,
) -> RunRecord:
    await trio.Path(work).mkdir(parents=True)
    started = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
    try:
        if variant == "libvirt-tls":
            assert peers is not None
            record = await libvirt_run(
                peers,
                SCENARIO,
                image=image,
                work=work,
                rep=rep,
                deadline=deadline,
                serial=serial,
                cache=cache,
                variant=variant,
            )
        else:
            data = data_flags(variant, hosts)

            def argv(lab: RealisticLab, work_dir: Path, target_dir: Path) -> list[str]:
                return livemig_remote_argv(
                    lab,
                    hosts,
                    work_dir=work_dir,
                    target_dir=target_dir,
                    deadline_s=deadline,
                    data=data,
                )

            record = await realistic_run(
                variant,
                SCENARIO,
                image=image,
                work=work,
                rep=rep,
                deadline=deadline,
                cache=cache,
                wrapper=hosts.source.wrapper,
                livemig_argv=argv,
            )
    finally:
        # The launched target is nobody's child (the run's sweep stops it if it is left).
        kill_qemus_under(work)
        shutil.rmtree(work, ignore_errors=True)
    record.detail["started_utc"] = started
    return record
