"""``livemig migrate --to ssh://[user@]host[:port]``: launch the target on another host and
migrate to it, control over OpenSSH, data QEMU to QEMU over TLS.

**Why ssh and forwarded sockets, not a daemon.** Everything livemig says to the target host goes
through one OpenSSH master connection (`livemig.transports.ssh`): the target's QMP socket is
forwarded to a unix socket on this host (OpenSSH ``-L LOCAL:REMOTE``), so the engine, its
journal, its reverts and its monitors work exactly as with a local target; the few things that
must run *there* (check the host, create the images and start QEMU, remove them) are one
``livemig remote-target ACTION`` command each, JSON in and out. Nothing of livemig listens on
the network or stays running on the target host but the QEMU it launched (and, until the guest
runs there, a relay holding its monitor: `livemig.relay`); the operator's keys,
``known_hosts`` and ssh config decide who may do this. (A livemig agent speaking a protocol
over the ssh channel's stdio would mean a second protocol to version and keep alive, and a
second QMP client; a forwarded socket is QEMU's own protocol, end to end.)

**Data** goes from QEMU to QEMU: the RAM stream and the NBD server (mirror and base copy) over
TCP with QEMU's ``tls-creds-x509`` on both sides, each verifying the other (``--tls-dir``, the
same path on both hosts, default ``/etc/pki/qemu``); or, with ``--tunnel ssh``, through
forwarded unix sockets (no port opened, ssh's encryption, slower). Plain TCP off the host is
refused without ``--insecure``.

**Shared storage across hosts** is not decided by comparing paths: a marker file with a random
token is written beside each of the source's disk images, and a disk counts as shared only if
the target host reads that very token at that path (its directory is the same file system:
NFS, CephFS, a cluster file system). The markers are removed at once.

Before anything changes on the source, the target host is checked (`_check_probe`): livemig and
QEMU there, the target dir writable with room for the copies, the TLS files, and the
certificates against each other's CA and the name the source dials. Every refusal is exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from livemig.drivers.launch import LaunchPlan, LocalTarget, derive_local_target
from livemig.drivers.peer import PeerQemu, describe_qemu, disk_files
from livemig.fsm.events import Event, MigrationResult, Outcome
from livemig.fsm.machine import StorageChoice
from livemig.fsm.plan import Plan
from livemig.fsm.runner import migrate
from livemig.local import copied_disks
from livemig.transports.endpoints import TcpEndpoint, Tls, UnixEndpoint
from livemig.transports.errors import LivemigError, ToolError, UsageError
from livemig.transports.ssh import SshConnection, SshTarget

__all__ = ["RemoteOptions", "migrate_to_ssh", "remote_target"]

#: libvirt's default, and QEMU's: where a host keeps its x509 credentials for migration.
DEFAULT_TLS_DIR = Path("/etc/pki/qemu")
#: Seconds a ``livemig remote-target`` command may take (a launch waits for QEMU's monitor).
AGENT_TIMEOUT = 120.0


@attrs.frozen
class RemoteOptions:
    """How to reach and use the target host.

    :param ssh: where to ssh.
    :param target_dir: the target's directory on that host (created 0700).
    :param tls_dir: the x509 credentials (same path on both hosts); ``None``: no TLS.
    :param tls_hostname: the name the target's certificate must carry; ``None``: the address
        the source dials (ssh's ``HostName`` for the target).
    :param tunnel: carry the RAM stream and the NBD traffic through ssh instead of TCP.
    :param insecure: allow plain TCP to the target host.
    :param livemig: the ``livemig`` command on the target host.
    """

    ssh: SshTarget
    target_dir: Path
    tls_dir: Path | None = None
    tls_hostname: str | None = None
    tunnel: bool = False
    insecure: bool = False
    livemig: str = "livemig"


async def migrate_to_ssh(
    plan: Plan,
    options: RemoteOptions,
    *,
    on_event: Callable[[Event], None] | None = None,
    interrupt: trio.Event | None = None,
) -> MigrationResult:
    """Launch a target for ``plan``'s source on ``options.ssh``'s host and migrate to it.

    Never raises for a migration fault (as :func:`~livemig.fsm.runner.migrate`).

    :raise UsageError: for bad input and every refusal of the checks; nothing was touched.
    """
    if options.tunnel and options.tls_dir is not None:
        raise UsageError("--tunnel ssh already encrypts: give it or --tls-dir, not both")
    source = await describe_qemu(plan.source_qmp.path)
    await trio.Path(plan.work_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    ssh = SshConnection(options.ssh, control=plan.work_dir / f"lm-{plan.run_id}-ssh.ctl")
    await ssh.start()
    try:
        ready = await _prepare(plan, options, ssh, source)
        try:
            launched = await _agent(ssh, options, "launch", ready.launch.to_json())
        except UsageError:
            raise
        except LivemigError as err:
            return _refused(f"the target could not be started on {options.ssh}: {err}", err)
        target = LocalTarget.from_json(launched)
        relay = launched["relay"]
        run = _Run(plan, options, ssh, ready, target, Path(relay["socket"]), int(relay["pid"]))
        return await run.migrate(on_event, interrupt)
    finally:
        with trio.CancelScope(shield=True):
            await ssh.close()


@attrs.frozen
class _Ready:
    """What the checks found and decided, before anything was created."""

    address: str
    tls: Tls | None
    ports: tuple[int, ...]
    launch: LaunchPlan
    ram_listen: Path
    nbd_listen: Path


async def _prepare(
    plan: Plan, options: RemoteOptions, ssh: SshConnection, source: PeerQemu
) -> _Ready:
    """Check the target host and decide the launch; creates nothing there.

    :raise UsageError: for every refusal.
    """
    address = await ssh.resolved_host()
    tls = None
    if options.tls_dir is not None:
        tls = Tls(options.tls_dir, options.tls_hostname or address)
    elif not options.tunnel and not options.insecure:
        raise UsageError(
            f"no TLS credentials ({DEFAULT_TLS_DIR} or --tls-dir): the guest's memory and disks "
            f"would go to {options.ssh} in the clear; use --tls-dir, --tunnel ssh, or allow it "
            "with --insecure"
        )
    writable = disk_files(source.devices)
    markers = (
        {}
        if plan.storage is StorageChoice.NON_SHARED
        else await trio.to_thread.run_sync(_write_markers, writable, source.cwd, plan.run_id)
    )
    try:
        answer = await _agent(
            ssh,
            options,
            "probe",
            {
                "directory": os.fspath(options.target_dir),
                "qemu": source.argv[0],
                "tls_dir": os.fspath(tls.directory) if tls is not None else None,
                "address": None if options.tunnel else address,
                "ports": 0 if options.tunnel else 2,
                "markers": {os.fspath(p): token for p, token in markers.values()},
            },
        )
    finally:
        await trio.to_thread.run_sync(_remove_markers, markers)
    shared = {f for f, (p, _) in markers.items() if answer["markers"].get(os.fspath(p))}
    copies = _choose_copies(plan, source, shared)
    need = sum(_allocated(Path(f), source.cwd) for f in copies)
    _check_probe(answer, options, need=need)
    if tls is not None:
        await trio.to_thread.run_sync(_check_certificates, tls, answer)
    launch = derive_local_target(
        source, source_qmp=plan.source_qmp.path, target_dir=options.target_dir, copy_disks=copies
    )
    ram_listen = options.target_dir / f"lm-{plan.run_id}-ram.sock"
    nbd_listen = options.target_dir / f"lm-{plan.run_id}-nbd.sock"
    if options.tunnel:  # QEMU makes them there; the launch's removal takes them too
        launch = attrs.evolve(launch, files=(*launch.files, ram_listen, nbd_listen))
    return _Ready(
        address=address,
        tls=tls,
        ports=tuple(int(p) for p in answer["ports"]),
        launch=launch,
        ram_listen=ram_listen,
        nbd_listen=nbd_listen,
    )


@attrs.frozen
class _Run:
    """A migration to a target launched on the other host."""

    plan: Plan
    options: RemoteOptions
    ssh: SshConnection
    ready: _Ready
    target: LocalTarget
    #: The target's monitor relay (`livemig.relay`) on its host: its socket and pid.
    relay: Path
    relay_pid: int

    async def _link_lost(self) -> str:
        seconds = self.plan.deadlines.link
        await self.ssh.down_for(seconds)
        return f"{self.options.ssh} has been unreachable for {seconds:g} s (ssh is down)"

    def _local(self, what: str) -> Path:
        """This host's end of a tunnel (``ram`` or ``nbd``)."""
        return self.plan.work_dir / f"lm-{self.plan.run_id}-{what}.sock"

    def _plan(self) -> Plan:
        """The plan against the forwarded sockets and the target host's data endpoints."""
        plan, ready, target = self.plan, self.ready, self.target
        local_qmp = plan.work_dir / f"lm-{plan.run_id}-target-qmp.sock"
        remote = {
            "ssh": self.options.ssh.to_json(),
            "livemig": self.options.livemig,
            "target": target.to_json(),
            "forward": {os.fspath(local_qmp): os.fspath(self.relay)},
            "relay_pid": self.relay_pid,
        }
        plan = attrs.evolve(
            plan,
            target_qmp=UnixEndpoint(local_qmp),
            remote=remote,
            created_images=tuple(target.disks.values()),
            tls=ready.tls,
        )
        if self.options.tunnel:
            return attrs.evolve(
                plan,
                migrate_uri=UnixEndpoint(self._local("ram")),
                nbd=UnixEndpoint(self._local("nbd")),
                migrate_listen=UnixEndpoint(ready.ram_listen),
                nbd_listen=UnixEndpoint(ready.nbd_listen),
            )
        ram_port, nbd_port = ready.ports
        return attrs.evolve(
            plan,
            migrate_uri=TcpEndpoint(ready.address, ram_port),
            nbd=TcpEndpoint(ready.address, nbd_port),
        )

    async def migrate(
        self, on_event: Callable[[Event], None] | None, interrupt: trio.Event | None
    ) -> MigrationResult:
        plan, ssh, options, target = self._plan(), self.ssh, self.options, self.target
        try:
            await ssh.forward(plan.target_qmp.path, self.relay)
            if options.tunnel:
                await ssh.forward(self._local("ram"), self.ready.ram_listen)
                await ssh.forward(self._local("nbd"), self.ready.nbd_listen)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ssh.keep_alive)
                result = await migrate(
                    plan,
                    on_event=on_event,
                    interrupt=interrupt,
                    give_up=self._link_lost,
                )
                nursery.cancel_scope.cancel()
        except BaseException:
            with trio.CancelScope(shield=True):
                await _remove(ssh, options, target)
            raise
        warnings = list(result.warnings)
        if result.outcome in (Outcome.REVERTED, Outcome.REFUSED):
            with trio.CancelScope(shield=True):
                warning = await _remove(ssh, options, target)
            warnings += [warning] if warning is not None else []
        else:
            described = {"host": str(options.ssh), **target.as_json()}
            if result.outcome is Outcome.FINALIZED:
                # The guest runs there: its monitor goes back to the operator.
                with trio.CancelScope(shield=True):
                    warning = await _unrelay(ssh, options, self.relay_pid)
                warnings += [warning] if warning is not None else []
            else:  # failed: the relay holds the monitor, which may be the only way in
                described["relay"] = os.fspath(self.relay)
            result = attrs.evolve(result, target=described)
        if ssh.restarts:
            warnings.append(
                f"the ssh connection to {options.ssh} dropped; it was made again {ssh.restarts}x"
            )
        return attrs.evolve(result, warnings=tuple(warnings))


def _choose_copies(plan: Plan, source: PeerQemu, shared: set[str]) -> dict[str, Any]:
    """The disks to copy: as ``--to local`` chooses them, less those both hosts see as one
    file; ``shared`` storage must find every writable disk so."""
    if plan.storage is StorageChoice.SHARED:
        unseen = [f for f in disk_files(source.devices) if f not in shared]
        if unseen:
            raise UsageError(
                f"--storage shared, but the target host does not see {', '.join(unseen)} as "
                "the same file (a marker written beside it here was not there): mount the "
                "shared storage at the same path on both hosts"
            )
        return {}
    copies = copied_disks(source.devices, source.nodes, storage=plan.storage, disks=plan.disks)
    if plan.storage is StorageChoice.AUTO:
        copies = {f: d for f, d in copies.items() if f not in shared}
    return copies


def _write_markers(
    files: Sequence[str], cwd: Path | None, run_id: str
) -> dict[str, tuple[Path, str]]:
    """A marker file beside each image (where its directory is writable): image → (marker,
    token)."""
    made: dict[str, tuple[Path, str]] = {}
    for name in files:
        image = Path(os.path.join(os.fspath(cwd or Path.cwd()), name))
        marker = image.parent / f".lm-{run_id}-{secrets.token_hex(4)}.shared"
        token = secrets.token_hex(16)
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            continue  # not writable here: not shown to be shared
        with os.fdopen(fd, "w") as f:
            f.write(token)
        made[name] = (marker, token)
    return made


def _remove_markers(markers: Mapping[str, tuple[Path, str]]) -> None:
    for marker, _ in markers.values():
        with contextlib.suppress(OSError):
            marker.unlink()


def _allocated(path: Path, cwd: Path | None) -> int:
    """Bytes the image's data may take on the target (what it holds here, its chain's too —
    the copy flattens the chain), a bound from the host's block counts."""
    image = Path(os.path.join(os.fspath(cwd or Path.cwd()), path))
    try:
        return image.stat().st_blocks * 512
    except OSError:
        return 0


def _check_probe(answer: Mapping[str, Any], options: RemoteOptions, *, need: int) -> None:
    host = options.ssh
    if answer.get("qemu_version") is None:
        raise UsageError(f"no QEMU on {host} ({answer.get('qemu_path') or 'not on its PATH'})")
    if answer.get("dir_problem"):
        raise UsageError(f"the target dir on {host}: {answer['dir_problem']}")
    if int(answer.get("free_bytes", 0)) < need:
        raise UsageError(
            f"the target dir on {host} has {answer['free_bytes']} bytes free; the copies need "
            f"up to {need}"
        )
    tls = answer.get("tls")
    if options.tls_dir is not None and tls is not None and tls["missing"]:
        raise UsageError(
            f"{host} lacks {', '.join(tls['missing'])} in {options.tls_dir} (QEMU's x509 "
            "layout; the same directory as on this host)"
        )


def _check_certificates(tls: Tls, answer: Mapping[str, Any]) -> None:
    """Our client credentials, the target's certificate against our CA and the name we dial,
    and our certificate against the target's CA: a TLS handshake that would fail, found before
    anything changes."""
    from livemig.transports import tls as x509  # noqa: PLC0415 - runs openssl

    remote = answer["tls"]
    x509.check_client_dir(tls.directory)
    ca = (tls.directory / x509.CA).read_bytes()
    x509.check_server_cert(ca, remote["server_cert"].encode(), hostname=tls.hostname)
    x509.check_client_cert(remote["ca"].encode(), (tls.directory / x509.CLIENT_CERT).read_bytes())


async def _agent(
    ssh: SshConnection, options: RemoteOptions, action: str, request: Mapping[str, Any]
) -> dict[str, Any]:
    """Run ``livemig remote-target ACTION`` there; its answer.

    :raise UsageError: for a refusal there, or a host without livemig.
    :raise ToolError: for any other failure.
    """
    argv = [*options.livemig.split(), "remote-target", action]
    with trio.move_on_after(AGENT_TIMEOUT) as scope:
        status, out, err = await ssh.run(argv, stdin=json.dumps(request).encode())
    if scope.cancelled_caught:
        raise ToolError(argv, -1, f"no answer from {options.ssh} in {AGENT_TIMEOUT:g} s")
    try:
        answer = json.loads(out)
    except ValueError:
        answer = None
    if status == 0 and isinstance(answer, dict):
        return answer
    if isinstance(answer, dict) and "error" in answer:
        if answer.get("usage"):
            raise UsageError(f"{options.ssh}: {answer['error']}")
        raise ToolError(argv, status, str(answer["error"]))
    if status == 127:
        raise UsageError(f"no {options.livemig!r} on {options.ssh} (give --remote-livemig)")
    if status == 255:
        raise ToolError(argv, status, f"ssh to {options.ssh} failed: {err.strip()}")
    raise ToolError(argv, status, err.strip() or out.decode(errors="replace"))


async def _remove(
    ssh: SshConnection, options: RemoteOptions, target: LocalTarget, *, patience: float = 60.0
) -> str | None:
    """Stop the target and remove what its launch made, trying again for ``patience``
    seconds while its host cannot be reached; a warning when that did not do it."""
    error: LivemigError | None = None
    with trio.move_on_after(patience):
        while True:
            try:
                if not ssh.alive:
                    await ssh.start()
                await _agent(ssh, options, "remove", target.to_json())
            except LivemigError as err:
                error = err
                await trio.sleep(1.0)
                continue
            return None
    return (
        f"could not remove the target launched on {options.ssh} (pid {target.pid}, never ran "
        f"the guest; its files in {target.directory}): {error}"
    )


async def _unrelay(ssh: SshConnection, options: RemoteOptions, pid: int) -> str | None:
    try:
        if not ssh.alive:
            await ssh.start()
        await _agent(ssh, options, "unrelay", {"pid": pid})
    except LivemigError as err:
        return f"could not stop the target's monitor relay (pid {pid}) on {options.ssh}: {err}"
    return None


def _refused(message: str, err: LivemigError) -> MigrationResult:
    return MigrationResult(
        outcome=Outcome.REFUSED,
        states=("idle",),
        total_ms=0.0,
        error=message,
        error_type=type(err).__name__,
        failed_in="idle",
    )


@contextlib.asynccontextmanager
async def remote_target(
    remote: Mapping[str, Any],
) -> AsyncIterator[Callable[[Outcome], Awaitable[str | None]]]:
    """For ``livemig recover``: reach a journalled remote target again (a new ssh master, the
    journalled forward of its monitor), and once the outcome is known, remove it (reverted:
    it never ran the guest) or hand its monitor back (finalized).

    :raise UsageError: when its host cannot be reached.
    """
    options = RemoteOptions(
        ssh=SshTarget.from_json(dict(remote["ssh"])),
        target_dir=Path("/"),  # unused: the target exists
        livemig=str(remote["livemig"]),
    )
    target = LocalTarget.from_json(remote["target"])
    ((local, far),) = dict(remote["forward"]).items()
    control = Path(local).with_name(Path(local).name.replace("-target-qmp.sock", "-ssh.ctl"))
    ssh = SshConnection(options.ssh, control=control)
    await ssh.start()

    async def finish(outcome: Outcome) -> str | None:
        if outcome is Outcome.REVERTED:
            return await _remove(ssh, options, target)
        if outcome is Outcome.FINALIZED and remote.get("relay_pid") is not None:
            return await _unrelay(ssh, options, int(remote["relay_pid"]))
        return None

    try:
        await ssh.forward(Path(local), Path(far))
        yield finish
    finally:
        with trio.CancelScope(shield=True):
            await ssh.close()
