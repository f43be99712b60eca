"""The ``libvirt`` variant: two libvirtd instances on this machine, ``virsh migrate --p2p``.

Set up as measured in the project's libvirt-peer reference:

- packages ``libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu`` from
  bookworm-backports (installed by :func:`ensure_installed` when missing);
- each daemon runs under ``unshare --mount --propagation private`` with libvirt's five fixed
  state directories bind-mounted from its own directory, its own ``host_uuid``, a ``qemu.conf``
  that runs QEMU as root without security driver, namespaces or cgroups, and its own migration
  port range; started by hand in the background, stopped at the end;
- the guest is the test guest booted the same way as in the lab (direct kernel boot, same
  kernel command line, q35, TCG, one vCPU, virtio raw 64 MiB disk);
- or, for the realistic scenario (:func:`realistic_domain_xml`), the realistic VM: q35, 2 vCPUs,
  1 GiB, a qcow2 root whose backing file (the bench's cached raw base, outside the namespaced
  directories, read by the source only) libvirt finds in its header, a raw data disk, a CD-ROM
  (the cached ISO, one file both sides open: read-only, so libvirt does not copy it), virtio-net
  on user networking, virtio-rng, a USB tablet on qemu-xhci. The target's images are created
  beforehand as ``copy-storage-all`` needs them: a plain qcow2 (no backing file) of the root's
  virtual size, a sparse raw data disk; libvirt mirrors each disk whole (``sync=full``: the
  root's chain flattened into the target's one qcow2). After the migration the bench powers the
  guest off on the target and checks its images as for every variant
  (``bench.realistic.verify_survivor``, no monitor checks: libvirt owns the monitors).

Paths inside the namespaced directories (``/run/libvirt``, ``/var/lib/libvirt``) name a different
file for each daemon: the domain XML is the same on both sides, yet with non-shared storage the
target's disk is its own file, and each side's serial console connects to its own socket, on
which the benchmark listens and timestamps every heartbeat line.

Figures come from the source's completed-job statistics (``virsh domjobinfo --completed``):
``time_elapsed``, ``downtime``, ``memory_processed``, ``disk_processed``; virsh's own wall time
includes waiting for the old QEMU to exit after the guest already runs on the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

import attrs
import trio

from bench.heartbeats import first_after, gap_around
from bench.realistic import DISK_BYTES as REALISTIC_DISK_BYTES
from bench.realistic import RealisticCache, Survivor, source_images, verify_survivor
from bench.scenarios import DISK_BYTES, Scenario
from livemig.drivers import image
from livemig.guest import GuestImage, RealisticImages, SerialConsole, kernel_cmdline

__all__ = [
    "Daemon",
    "LibvirtOutcome",
    "LibvirtPeers",
    "LibvirtUnavailable",
    "PeerLink",
    "ensure_installed",
    "libvirt_peers",
    "run_libvirt",
]

PACKAGES = ("libvirt-daemon-system", "libvirt-clients", "libvirt-daemon-driver-qemu")
#: libvirt's fixed state directories, each bind-mounted per instance (name in the instance dir).
_STATE_DIRS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "etc": "/etc/libvirt",
}
#: Migration (and NBD) port ranges, one per instance.
_PORTS = {"a": (49200, 49215), "b": (49216, 49231)}
_TICK_MS = 20  # the lab's heartbeat period (guest_vm_spec's default)


class LibvirtUnavailable(Exception):
    """libvirt cannot be installed or started here; the variant is skipped with this message."""


class LibvirtError(Exception):
    """A virsh command failed."""


@attrs.frozen
class Daemon:
    """Where a daemon runs and what it gets beyond the bench's settings (see the module).

    :param wrapper: a command its ``unshare`` runs under (``ip netns exec NAME``: another "host").
    :param libvirtd_conf: lines appended to its ``libvirtd.conf`` (a TLS listener, its files).
    :param qemu_conf: lines appended to its ``qemu.conf`` (the migration's x509 directory).
    :param listen: start it with ``--listen`` (TCP/TLS, as ``libvirtd_conf`` says).
    """

    wrapper: tuple[str, ...] = ()
    libvirtd_conf: str = ""
    qemu_conf: str = ""
    listen: bool = False


@attrs.frozen
class PeerLink:
    """How a migration goes from the source daemon to the target's.

    :param peer_uri: what the source daemon dials (``--p2p``); ``None``: the target's unix
        socket (both daemons on this host).
    :param address: where the target QEMU listens and the source dials (``--listen-address``,
        ``--migrateuri tcp://…``).
    :param flags: more ``virsh migrate`` flags (``--tls``).
    """

    peer_uri: str | None = None
    address: str = "127.0.0.1"
    flags: tuple[str, ...] = ()


@attrs.define
class Instance:
    name: str
    root: Path
    process: trio.Process | None = None
    daemon: Daemon = Daemon()

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    def host_path(self, inside: str) -> Path:
        """Where a path inside this instance's namespaced directories is on the host."""
        for local, mounted in _STATE_DIRS.items():
            if inside == mounted or inside.startswith(mounted + "/"):
                return self.root / local / inside[len(mounted) :].lstrip("/")
        return Path(inside)


@attrs.define
class LibvirtPeers:
    source: Instance
    target: Instance
    version: str
    link: PeerLink = PeerLink()

    def migrate_args(self) -> list[str]:
        """What follows the domain's name in ``virsh migrate``: the target daemon's URI and
        where the data goes."""
        uri = self.link.peer_uri or self.target.uri
        at = self.link.address
        return [uri, "--migrateuri", f"tcp://{at}", "--listen-address", at, *self.link.flags]


# ---- installation and daemons ------------------------------------------------------------------


def _missing_tools() -> list[str]:
    return [t for t in ("libvirtd", "virsh", "unshare") if shutil.which(t) is None]


async def ensure_installed(*, install: bool) -> str | None:
    """Install libvirt from bookworm-backports when it is missing; ``None`` when usable, else why
    not (for the report)."""
    if not _missing_tools():
        return None
    if not install:
        return f"libvirt skipped: {', '.join(_missing_tools())} not installed (--no-install)"
    argv = ["apt-get", "install", "-y", "-q", "-t", "bookworm-backports", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    except OSError as err:
        return f"libvirt skipped: cannot run apt-get: {err}"
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return f"libvirt skipped: apt-get install failed ({result.returncode}): {' / '.join(tail)}"
    if missing := _missing_tools():
        return f"libvirt skipped: still missing after install: {', '.join(missing)}"
    return None


def _prepare_instance(inst: Instance) -> None:
    """Fill the instance's directories: a copy of /etc/libvirt, the empty directory trees of the
    others, and the per-instance settings."""
    if inst.root.exists():
        shutil.rmtree(inst.root)
    inst.root.mkdir(parents=True)
    shutil.copytree(_STATE_DIRS["etc"], inst.root / "etc", symlinks=True)
    for local in ("run", "lib", "cache", "log"):
        mounted = Path(_STATE_DIRS[local])
        (inst.root / local).mkdir()
        if mounted.is_dir():
            for sub, dirs, _ in os.walk(mounted):
                for d in dirs:
                    rel = Path(sub, d).relative_to(mounted)
                    (inst.root / local / rel).mkdir(parents=True, exist_ok=True)
        mounted.mkdir(parents=True, exist_ok=True)  # the mount point
    autostart = inst.root / "etc" / "qemu" / "networks" / "autostart"
    if autostart.is_dir():
        for link in autostart.iterdir():
            link.unlink()
    with (inst.root / "etc" / "libvirtd.conf").open("a") as conf:
        conf.write(f'\n# livemig bench\nhost_uuid = "{uuid.uuid4()}"\n')
        conf.write(inst.daemon.libvirtd_conf)
    low, high = _PORTS[inst.name]
    with (inst.root / "etc" / "qemu.conf").open("a") as conf:
        conf.write(
            "\n# livemig bench\n"
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\nstdio_handler = "file"\nnamespaces = [ ]\n'
            "cgroup_controllers = [ ]\n"
            f"migration_port_min = {low}\nmigration_port_max = {high}\n"
        )
        conf.write(inst.daemon.qemu_conf)


def _daemon_script(inst: Instance) -> str:
    mounts = " && ".join(
        f"mount --bind {quote(str(inst.root / local))} {mounted}"
        for local, mounted in _STATE_DIRS.items()
    )
    pid_file = quote(str(inst.root / "libvirtd.pid"))
    listen = " --listen" if inst.daemon.listen else ""
    # cgroups are unmounted inside the namespace as a precaution (libvirt is told not to use
    # them, and must not touch the host's).
    return (
        f"umount -R /sys/fs/cgroup 2>/dev/null; {mounts} && "
        f"exec libvirtd{listen} --pid-file {pid_file}"
    )


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


async def _start_daemon(inst: Instance) -> None:
    await trio.to_thread.run_sync(_prepare_instance, inst)
    log = await trio.to_thread.run_sync(lambda: (inst.root / "libvirtd.log").open("wb"))
    try:
        inst.process = await trio.lowlevel.open_process(
            [
                *inst.daemon.wrapper,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                _daemon_script(inst),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own session: a Ctrl-C meant for the bench must not stop the daemon before
            # the bench has destroyed its domains. No PR_SET_PDEATHSIG: trio forks from a
            # worker thread, and the signal would come when that thread exits (10 s idle);
            # libvirt_peers() stops the daemon on every way out instead.
            start_new_session=True,
        )
    finally:
        log.close()
    with trio.move_on_after(30):
        while True:
            if inst.process.returncode is not None:
                raise LibvirtUnavailable(
                    f"libvirtd {inst.name} exited ({inst.process.returncode}): {_log_tail(inst)}"
                )
            with contextlib.suppress(LibvirtError):
                await virsh(inst, "version", within=5)
                return
            await trio.sleep(0.2)
    raise LibvirtUnavailable(f"libvirtd {inst.name} did not answer in 30 s: {_log_tail(inst)}")


def _log_tail(inst: Instance) -> str:
    try:
        lines = (inst.root / "libvirtd.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if " error : " in line] or lines
    return " / ".join(errors[-3:])


async def _stop_daemon(inst: Instance) -> None:
    for name in await _domains(inst):
        with contextlib.suppress(LibvirtError):
            await virsh(inst, "destroy", name, within=15)
        with contextlib.suppress(LibvirtError):
            await virsh(inst, "undefine", name, within=15)
    _kill_qemus(inst)
    proc = inst.process
    if proc is not None and proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _domains(inst: Instance) -> list[str]:
    if inst.process is None or inst.process.returncode is not None:
        return []
    try:
        out = await virsh(inst, "list", "--all", "--name", within=10)
    except LibvirtError:
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _kill_qemus(inst: Instance) -> None:
    """Last resort: QEMUs this instance started that are still there (by their pid files)."""
    for pid_file in (inst.root / "run" / "qemu").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if Path(os.fsdecode(exe)).name.startswith("qemu-system"):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def libvirt_peers(
    base: Path,
    *,
    source_daemon: Daemon = Daemon(),
    target_daemon: Daemon = Daemon(),
    link: PeerLink = PeerLink(),
) -> AsyncIterator[LibvirtPeers]:
    """Start the two daemons under ``base``; stop them (and any domain left) on the way out.
    By default both on this host, migrating over loopback.

    :raise LibvirtUnavailable: when one cannot be started.
    """
    if missing := _missing_tools():
        raise LibvirtUnavailable(f"not installed: {', '.join(missing)}")
    source = Instance("a", base / "a", daemon=source_daemon)
    target = Instance("b", base / "b", daemon=target_daemon)
    try:
        await _start_daemon(source)
        await _start_daemon(target)
        version = (await virsh(source, "version", "--daemon", within=10)).strip()
        daemon = [line for line in version.splitlines() if "daemon" in line.lower()]
        number = daemon[-1].rpartition(":")[2].strip() if daemon else version
        yield LibvirtPeers(source, target, f"libvirtd {number}", link)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            await _stop_daemon(target)
            await _stop_daemon(source)


async def virsh(inst: Instance, *args: str, within: float) -> str:
    """Run ``virsh -c <instance> args…`` and return its stdout.

    :raise LibvirtError: when it fails or takes longer than ``within`` seconds.
    """
    argv = ["virsh", "-q", "-c", inst.uri, *args]
    with trio.move_on_after(within):
        result = await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if result.returncode != 0:
            raise LibvirtError(
                f"virsh {' '.join(args[:2])}: {result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode(errors="replace")
    raise LibvirtError(f"virsh {' '.join(args[:2])}: no answer in {within} s")


# ---- one run -------------------------------------------------------------------------------------


def domain_xml(*, name: str, guest: GuestImage, scenario: Scenario, disk: str, serial: str) -> str:
    """The test guest as a libvirt domain: the lab's machine and kernel command line."""
    cmdline = kernel_cmdline(
        tick_ms=_TICK_MS, dirty_mib_s=scenario.dirty_mib_s, dirty_buf_mib=scenario.dirty_buf_mib
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{scenario.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(guest.kernel))}</kernel>
    <initrd>{escape(str(guest.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(disk)}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='unix'>
      <source mode='connect' path={quoteattr(serial)}/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def realistic_domain_xml(
    *,
    name: str,
    guest: GuestImage,
    scenario: Scenario,
    root: str,
    data: str,
    iso: str,
    serial: str,
) -> str:
    """The realistic VM as a libvirt domain (see the module's documentation); its kernel
    command line is :func:`livemig.guest.realistic_vm_spec`'s (records on ``vda`` and ``vdb``)."""
    cmdline = kernel_cmdline(
        tick_ms=_TICK_MS,
        dirty_mib_s=scenario.dirty_mib_s,
        dirty_buf_mib=scenario.dirty_buf_mib,
        disks=("vda", "vdb"),
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{scenario.memory_mib}</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(guest.kernel))}</kernel>
    <initrd>{escape(str(guest.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(root)}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(data)}/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(iso)}/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='usb' model='qemu-xhci'/>
    <interface type='user'>
      <mac address='52:54:00:6c:6d:01'/>
      <model type='virtio'/>
    </interface>
    <input type='tablet' bus='usb'/>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <serial type='unix'>
      <source mode='connect' path={quoteattr(serial)}/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@attrs.define(eq=False)
class ListenedConsole:
    """A serial console QEMU connects to (``<source mode='connect'>``): we listen, it dials."""

    name: str
    path: Path
    console: SerialConsole | None = None
    connected: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with sock:
            await sock.bind(str(self.path))
            sock.listen(1)
            task_status.started()
            conn, _ = await sock.accept()
        stream = trio.SocketStream(conn)
        self.console = SerialConsole(self.name, receive=stream, send=stream)
        self.connected.set()
        await self.console.run()

    async def wait_console(self) -> SerialConsole:
        await self.connected.wait()
        assert self.console is not None
        return self.console

    async def wait_console_boot_id(self) -> int:
        return await (await self.wait_console()).wait_boot()


@attrs.define
class LibvirtOutcome:
    converged: bool = False
    #: The deadline passed before ``virsh migrate`` returned (then the job was aborted).
    timed_out: bool = False
    total_ms: float | None = None
    downtime_ms: float | None = None
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    heartbeat_gap_ms: float | None = None
    missing_heartbeats: int = 0
    #: When the longest heartbeat gap began, ms after ``virsh migrate`` started.
    gap_at_ms: float | None = None
    virsh_wall_ms: float | None = None
    error: str | None = None
    problems: list[str] = attrs.field(factory=list)
    stats: dict[str, str] = attrs.field(factory=dict)
    #: Realistic VM: acknowledged records checked per disk after the run.
    records_checked: dict[str, int] | None = None
    #: Realistic VM: each disk of the domain on the survivor (``virsh dumpxml`` after the
    #: migration): its image and the backing file libvirt has under it (``None``: none).
    survivor_disks: dict[str, dict[str, str | None]] | None = None


def parse_rawstats(text: str) -> dict[str, str]:
    """``virsh domjobinfo --rawstats`` output as a dict (``time_elapsed: 805`` lines)."""
    stats: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            stats[key.strip()] = value.strip()
    return stats


def _int(stats: dict[str, str], key: str) -> int | None:
    try:
        return int(stats[key])
    except (KeyError, ValueError):
        return None


async def run_libvirt(
    peers: LibvirtPeers,
    scenario: Scenario,
    guest: GuestImage,
    work_dir: Path,
    *,
    run_name: str,
    deadline_s: float,
    cache: RealisticCache | None = None,
) -> LibvirtOutcome:
    """Boot the guest on the source daemon, migrate it to the target daemon, measure (and for
    the realistic VM, whose images come from ``cache``, check its disks afterwards)."""
    out = LibvirtOutcome()
    src, dst = peers.source, peers.target
    serial = f"/run/libvirt/{run_name}.serial"
    after: _After | None = None
    if scenario.realistic:
        if cache is None:
            raise LibvirtError("the realistic scenario needs the image cache")
        text, disks, after = await _realistic_setup(
            peers, scenario, guest=guest, cache=cache, name=run_name, serial=serial
        )
    else:
        if scenario.storage == "shared":
            disk = str(work_dir / "shared.raw")
            disks = [Path(disk)]
        else:
            disk = f"/var/lib/libvirt/images/{run_name}.raw"
            disks = [src.host_path(disk), dst.host_path(disk)]
        for path in disks:
            await image.create(path, "raw", DISK_BYTES)
        text = domain_xml(name=run_name, guest=guest, scenario=scenario, disk=disk, serial=serial)
    xml = work_dir / "domain.xml"
    await trio.Path(xml).write_text(text)
    src_console = ListenedConsole("libvirt-source", src.host_path(serial))
    dst_console = ListenedConsole("libvirt-target", dst.host_path(serial))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(src_console.run)
            await nursery.start(dst_console.run)
            try:
                await _migrate(
                    peers=peers,
                    scenario=scenario,
                    name=run_name,
                    xml=xml,
                    src_console=src_console,
                    dst_console=dst_console,
                    out=out,
                    deadline_s=deadline_s,
                )
                if after is not None:
                    await after(out, src_console, dst_console, work_dir)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(60):
                    await _clean_domain(peers, run_name)
                nursery.cancel_scope.cancel()
    finally:
        for path in [*disks, src_console.path, dst_console.path]:
            path.unlink(missing_ok=True)
    return out


async def _migrate(
    *,
    peers: LibvirtPeers,
    scenario: Scenario,
    name: str,
    xml: Path,
    src_console: ListenedConsole,
    dst_console: ListenedConsole,
    out: LibvirtOutcome,
    deadline_s: float,
) -> None:
    src, dst = peers.source, peers.target
    await virsh(src, "define", str(xml), within=30)
    await virsh(src, "start", name, within=60)
    with trio.fail_after(90):
        console = await src_console.wait_console()
        await console.wait_boot()
        for _ in range(5):
            await console.wait_heartbeat()
    args = ["migrate", "--live", "--p2p"]
    args += ["--copy-storage-all"] if scenario.storage == "non-shared" else ["--unsafe"]
    args += [name, *peers.migrate_args()]
    started = trio.current_time()
    finished = False
    with trio.move_on_after(deadline_s):
        try:
            await virsh(src, *args, within=deadline_s + 5)
        except LibvirtError as err:
            out.error = str(err)
        finished = True
    ended = trio.current_time()
    out.virsh_wall_ms = (ended - started) * 1000.0
    if not finished:
        out.timed_out = True
        out.error = f"not migrated after {deadline_s:.0f} s"
        with contextlib.suppress(LibvirtError):
            await virsh(src, "domjobabort", name, within=30)
    if out.error is None:
        raw = await virsh(
            src, "domjobinfo", name, "--completed", "--rawstats", "--keep-completed", within=30
        )
        out.stats = parse_rawstats(raw)
        out.total_ms = _float(_int(out.stats, "time_elapsed"))
        out.downtime_ms = _float(_int(out.stats, "downtime"))
        out.ram_bytes = _int(out.stats, "memory_processed")
        out.disk_bytes = _int(out.stats, "disk_processed")
        state = (await virsh(dst, "domstate", name, within=30)).strip()
        if state != "running":
            out.problems.append(f"the guest is {state!r} on the target")
        out.converged = out.total_ms is not None
    survivor = dst_console if out.converged else src_console
    try:
        with trio.fail_after(15):
            last = max(
                (
                    h.seq
                    for c in (src_console, dst_console)
                    if c.console
                    for h in c.console.heartbeats
                ),
                default=0,
            )
            await (await survivor.wait_console()).wait_heartbeat(last)
    except trio.TooSlowError:
        out.problems.append(f"no heartbeat on the {survivor.name} after the migration")
    _gap(out, (src_console, dst_console), survivor, started, ended)


def _gap(
    out: LibvirtOutcome,
    consoles: tuple[ListenedConsole, ...],
    survivor: ListenedConsole,
    started: float,
    ended: float,
) -> None:
    """The longest heartbeat gap around the migration (``started`` to the survivor's first
    heartbeat after ``ended``), both consoles merged."""
    beats = [h for c in consoles if c.console for h in c.console.heartbeats]
    survivor_beats = survivor.console.heartbeats if survivor.console else ()
    end = first_after(survivor_beats, ended) or ended
    gap = gap_around(beats, started, end)
    out.heartbeat_gap_ms = gap.gap_ms
    out.missing_heartbeats = gap.missing
    if gap.at is not None:
        out.gap_at_ms = round((gap.at - started) * 1000.0, 1)


_After = Callable[[LibvirtOutcome, ListenedConsole, ListenedConsole, Path], Awaitable[None]]


async def _realistic_setup(
    peers: LibvirtPeers,
    scenario: Scenario,
    *,
    guest: GuestImage,
    cache: RealisticCache,
    name: str,
    serial: str,
) -> tuple[str, list[Path], _After]:
    """The realistic VM's images on both sides, its domain XML, the files to remove, and the
    check to run once the migration has ended."""
    src, dst = peers.source, peers.target
    root = f"/var/lib/libvirt/images/{name}-root.qcow2"
    data = f"/var/lib/libvirt/images/{name}-data.raw"
    source = await source_images(cache, root=src.host_path(root), data=src.host_path(data))
    target = RealisticImages(
        root=dst.host_path(root),
        backing=(),
        data=dst.host_path(data),
        iso=cache.iso,
        root_bytes=REALISTIC_DISK_BYTES,
    )
    # What copy-storage-all needs on the target: images of the same virtual sizes.
    await image.create(target.root, "qcow2", REALISTIC_DISK_BYTES)
    await image.create(target.data, "raw", REALISTIC_DISK_BYTES)
    text = realistic_domain_xml(
        name=name,
        guest=guest,
        scenario=scenario,
        root=root,
        data=data,
        iso=str(cache.iso),
        serial=serial,
    )

    async def after(
        out: LibvirtOutcome, src_console: ListenedConsole, dst_console: ListenedConsole, work: Path
    ) -> None:
        survivor_inst, other_inst = (dst, src) if out.converged else (src, dst)
        listened = dst_console if out.converged else src_console
        if listened.console is None:
            out.problems.append(f"no console on the {listened.name}")
            return
        disks = target.disk_images(markers_from=source) if out.converged else source.disk_images()
        survivor = Survivor(
            "target" if out.converged else "source", None, listened.console, disks, frozenset()
        )
        beats = [h for c in (src_console, dst_console) if c.console for h in c.console.heartbeats]
        with contextlib.suppress(LibvirtError, ElementTree.ParseError):
            xml = await virsh(survivor_inst, "dumpxml", name, within=30)
            out.survivor_disks = disk_chains(xml)
        async with trio.open_nursery() as nursery:
            other = _gone_event(other_inst, name, nursery)
            mine = _gone_event(survivor_inst, name, nursery)
            verdict = await verify_survivor(
                survivor,
                boot_id=await src_console.wait_console_boot_id(),
                other_exited=other,
                survivor_exited=mine,
                heartbeats=beats,
                work_dir=work,
                scratch_dir=work,
            )
            nursery.cancel_scope.cancel()
        out.problems += list(verdict.problems)
        out.records_checked = verdict.records_checked

    return text, [*source.writable, *target.writable], after


def disk_chains(xml: str) -> dict[str, dict[str, str | None]]:
    """Each file disk of a domain XML by target dev: its source file and the first backing
    file libvirt records under it (``None``: none)."""
    out: dict[str, dict[str, str | None]] = {}
    for disk in ElementTree.fromstring(xml).iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is None or source is None:
            continue
        backing = disk.find("backingStore/source")
        out[target.get("dev", "?")] = {
            "source": source.get("file"),
            "backing": None if backing is None else backing.get("file"),
        }
    return out


def _gone_event(inst: Instance, name: str, nursery: trio.Nursery) -> trio.Event:
    """Set once ``name`` no longer runs on ``inst`` (shut off, or gone: a transient domain)."""
    done = trio.Event()

    async def poll() -> None:
        while True:
            try:
                state = (await virsh(inst, "domstate", name, within=10)).strip()
            except LibvirtError:
                break
            if state not in {"running", "paused"}:
                break
            await trio.sleep(0.2)
        done.set()

    nursery.start_soon(poll)
    return done


def _float(value: int | None) -> float | None:
    return None if value is None else float(value)


async def _clean_domain(peers: LibvirtPeers, name: str) -> None:
    for inst, action in ((peers.target, "destroy"), (peers.source, "destroy")):
        with contextlib.suppress(LibvirtError):
            await virsh(inst, action, name, within=20)
    for inst in (peers.source, peers.target):
        with contextlib.suppress(LibvirtError):
            await virsh(inst, "undefine", name, within=20)
