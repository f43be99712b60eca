"""The fake QEMU's block layer: the node graph, block jobs and the NBD server, with the QMP
commands livemig uses on them and the events QEMU 10 sends.

What is modelled, and how:

- Nodes are named; an inline ``file`` child is an implicit node called ``#blockN``. The guest's
  disk device is attached to one node, its *active layer*; ``blockdev-snapshot`` puts an overlay
  on top of it. ``blockdev-del`` refuses a node that a device, a parent node, a job or an export
  uses.
- ``blockdev-mirror`` (sync ``top``): created → running → (after ``mirror_ready_after``) it copies
  the overlay's records to the target and is ready; while ready (or standby) every guest write to
  the overlay is forwarded. Soft ``block-job-cancel`` of a ready mirror completes it without a
  pivot (the target stays consistent); any other cancel aborts it. After either, writes are no
  longer forwarded: a mirror cancelled early misses later writes.
- ``block-commit`` (active): created → running → ready; ``job-complete`` merges the overlay's
  records into the base and makes the base the active layer again.
- Jobs dismiss themselves when they end. An NBD link that is cut, or whose export went away,
  makes the mirror fail at its next write (``BLOCK_JOB_ERROR``, then it ends with an error).
- The NBD server serves exports by name on a unix socket; exporting a node activates it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from livemig.drivers.status import JobStatus
from livemig.testing.model.host import RECORD_BYTES, ImageFile, SocketFile

if TYPE_CHECKING:
    from livemig.testing.model.qemu import FakeQemu

__all__ = ["BLOCK_COMMANDS", "Export", "Job", "NbdLink", "Node", "QemuError"]


class QemuError(Exception):
    """QEMU's error reply to a command."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@attrs.define(eq=False)
class NbdLink:
    """A source node's connection to an export of the target's NBD server."""

    socket: str
    export: str


@attrs.define(eq=False)
class Node:
    name: str
    driver: str
    filename: str
    size: int
    #: The image this node reads and writes (``None`` for an NBD client).
    image: ImageFile | None = None
    file: Node | None = None
    backing: Node | None = None
    nbd: NbdLink | None = None
    implicit: bool = False
    active: bool = True
    read_only: bool = False

    def children(self) -> tuple[Node, ...]:
        return tuple(c for c in (self.file, self.backing) if c is not None)

    def to_qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node-name": self.name,
            "drv": self.driver,
            "file": self.filename,
            "ro": self.read_only,
            "active": self.active,
            "image": {"filename": self.filename, "format": self.driver, "virtual-size": self.size},
        }
        if self.image is not None:
            out["image"]["actual-size"] = len(self.image.records) * RECORD_BYTES
        if self.backing is not None:
            out["backing_file"] = self.backing.filename
        return out


@attrs.define(eq=False)
class Job:
    id: str
    type: str
    status: JobStatus
    #: The node the job reads (a mirror's source, a commit's top).
    node: Node
    #: Where it writes (a mirror's NBD node, a commit's base).
    target: Node
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.status in (JobStatus.READY, JobStatus.STANDBY)

    @property
    def live(self) -> bool:
        """Still working (not cancelled, completing or ended)."""
        return self.status in (
            JobStatus.CREATED,
            JobStatus.RUNNING,
            JobStatus.READY,
            JobStatus.STANDBY,
        )

    def to_query_jobs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "current-progress": 1 if self.ready else 0,
            "total-progress": 1,
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_query_block_jobs(self) -> dict[str, Any]:
        return {
            "device": self.id,
            "type": self.type,
            "status": self.status,
            "ready": self.ready,
            "offset": 1 if self.ready else 0,
            "len": 1,
            "busy": False,
            "paused": False,
            "speed": 0,
            "io-status": "ok",
        }

    def event_data(self) -> dict[str, Any]:
        return {"device": self.id, "type": self.type, "len": 1, "offset": 1, "speed": 0}


@attrs.define(eq=False)
class Export:
    id: str
    name: str
    node: Node


# -- the node graph ------------------------------------------------------------------------------


def find_node(qemu: FakeQemu, name: str) -> Node:
    node = qemu.nodes.get(name)
    if node is None:
        raise QemuError(f"Cannot find device='{name}' nor node-name='{name}'", "DeviceNotFound")
    return node


def _blockdev_add(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    name = str(args["node-name"])
    if name in qemu.nodes:
        raise QemuError(f"Duplicate nodes with node-name='{name}'")
    driver = str(args["driver"])
    if driver == "nbd":
        node = _nbd_node(qemu, name, args)
    elif driver in ("qcow2", "raw"):
        file = _file_child(qemu, args["file"])
        assert file.image is not None
        node = Node(name, driver, file.filename, file.size, image=file.image, file=file)
        if args.get("backing") is not None:
            node.backing = find_node(qemu, str(args["backing"]))
    else:
        raise QemuError(f"the fake does not model driver {driver!r}")
    qemu.nodes[name] = node
    return {}


def _file_child(qemu: FakeQemu, spec: object) -> Node:
    if isinstance(spec, str):
        return find_node(qemu, spec)
    assert isinstance(spec, Mapping)
    filename = str(spec["filename"])
    image = qemu.world.host.image(filename)
    if image is None:
        raise QemuError(f"Could not open '{filename}': No such file or directory")
    name = qemu.implicit_name()
    node = Node(name, "file", filename, image.size, image=image, implicit=True)
    qemu.nodes[name] = node
    return node


def _nbd_node(qemu: FakeQemu, name: str, args: Mapping[str, Any]) -> Node:
    server, export = args["server"], str(args["export"])
    if server.get("type") != "unix" or "path" not in server:
        raise QemuError("the fake models NBD over a unix socket given as {type, path}")
    socket = str(server["path"])
    target = qemu.world.resolve_nbd(socket, export)
    if target is None:
        raise QemuError(f"Failed to connect to '{socket}': Connection refused")
    uri = f"nbd+unix:///{export}?socket={socket}"
    return Node(name, "nbd", uri, target.size, nbd=NbdLink(socket, export))


def _blockdev_del(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    name = str(args["node-name"])
    node = qemu.nodes.get(name)
    if node is None:
        raise QemuError(f"Failed to find node with node-name='{name}'")
    if node.implicit:
        raise QemuError(f"Node {name} is not owned by the monitor")
    if (user := _user_of(qemu, node)) is not None:
        raise QemuError(f"Node '{name}' is busy: {user}")
    del qemu.nodes[name]
    if node.file is not None and node.file.implicit:
        del qemu.nodes[node.file.name]
    return {}


def _user_of(qemu: FakeQemu, node: Node) -> str | None:
    if qemu.device is node:
        return "node is used by the guest's disk device"
    for other in qemu.nodes.values():
        if node in other.children():
            return f"node is used as a child of '{other.name}'"
    for job in qemu.jobs.values():
        if node in (job.node, job.target):
            return f"block device is in use by block job: {job.type}"
    for export in qemu.exports.values():
        if export.node is node:
            return "node is exported"
    return None


def _blockdev_snapshot(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    base, overlay = find_node(qemu, str(args["node"])), find_node(qemu, str(args["overlay"]))
    if overlay.backing is not None:
        raise QemuError("The overlay already has a backing image")
    if overlay.driver != "qcow2":
        raise QemuError(f"The overlay '{overlay.name}' does not support backing images")
    overlay.backing = base
    if qemu.device is base:
        qemu.device = overlay
    return {}


def _query_named_block_nodes(qemu: FakeQemu, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    del args
    return [n.to_qmp() for n in qemu.nodes.values()]


def _query_block(qemu: FakeQemu, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The one disk device, on its active layer (what QEMU 10 says for ``-blockdev`` disks)."""
    del args
    node = qemu.device
    inserted = {
        "node-name": node.name,
        "drv": node.driver,
        "file": node.filename,
        "ro": node.read_only,
    }
    qdev = "/machine/peripheral/vda/virtio-backend"
    return [{"device": "", "qdev": qdev, "type": "unknown", "inserted": inserted}]


# -- jobs ----------------------------------------------------------------------------------------


def _new_job(qemu: FakeQemu, job_id: str, kind: str, node: Node, target: Node) -> Job:
    if job_id in qemu.jobs:
        raise QemuError(f"Job ID '{job_id}' already in use")
    for other in qemu.jobs.values():
        if {id(node), id(target)} & {id(other.node), id(other.target)}:
            raise QemuError(f"Node '{node.name}' is busy: block device is in use by block job")
    job = Job(job_id, kind, JobStatus.CREATED, node, target)
    qemu.jobs[job_id] = job
    qemu.job_status(job, JobStatus.CREATED)
    qemu.world.after(0, lambda: _start(qemu, job))
    return job


def _start(qemu: FakeQemu, job: Job) -> None:
    if qemu.jobs.get(job.id) is job and job.status is JobStatus.CREATED:
        qemu.job_status(job, JobStatus.RUNNING)


def _blockdev_mirror(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    if args.get("sync") != "top":
        raise QemuError("the fake models blockdev-mirror sync=top only")
    node, target = find_node(qemu, str(args["device"])), find_node(qemu, str(args["target"]))
    job = _new_job(qemu, str(args["job-id"]), "mirror", node, target)
    delay = qemu.world.knobs.mirror_ready_after
    if delay is not None:
        qemu.world.after(delay, lambda: _mirror_synced(qemu, job))
    return {}


def _mirror_synced(qemu: FakeQemu, job: Job) -> None:
    """The bulk copy is done: the target holds everything the overlay holds; ready."""
    if qemu.jobs.get(job.id) is not job or job.status is not JobStatus.RUNNING:
        return
    assert job.node.image is not None
    if not _copy_to_target(qemu, job, job.node.image.records):
        return
    _become_ready(qemu, job)


def _become_ready(qemu: FakeQemu, job: Job) -> None:
    qemu.job_status(job, JobStatus.READY)
    qemu.emit("BLOCK_JOB_READY", job.event_data())


def forward_write(qemu: FakeQemu, node: Node, record: int) -> None:
    """A guest write to ``node`` reaches every ready mirror of it."""
    for job in list(qemu.jobs.values()):
        if job.type == "mirror" and job.node is node and job.ready:
            _copy_to_target(qemu, job, {record})


def _copy_to_target(qemu: FakeQemu, job: Job, records: set[int]) -> bool:
    """Write ``records`` through the job's NBD link; on an I/O error, fail the job."""
    link = job.target.nbd
    image = qemu.world.resolve_nbd(link.socket, link.export) if link else job.target.image
    if image is None:
        _fail(qemu, job, "Input/output error")
        return False
    image.records |= records
    return True


def _fail(qemu: FakeQemu, job: Job, error: str) -> None:
    qemu.emit("BLOCK_JOB_ERROR", {"device": job.id, "operation": "write", "action": "report"})
    job.error = error
    qemu.job_status(job, JobStatus.ABORTING)
    delay = qemu.world.knobs.job_abort_seconds
    qemu.world.after(delay, lambda: _conclude(qemu, job, "BLOCK_JOB_COMPLETED"))


def _conclude(qemu: FakeQemu, job: Job, event: str) -> None:
    if qemu.jobs.get(job.id) is not job:
        return
    data = job.event_data()
    if job.error is not None:
        data["error"] = job.error
    qemu.emit(event, data)
    qemu.job_status(job, JobStatus.CONCLUDED)
    qemu.job_status(job, JobStatus.NULL)  # auto-dismiss
    del qemu.jobs[job.id]


def _finish(qemu: FakeQemu, job: Job, then: Callable[[], None]) -> None:
    """The success path of a job's end: waiting, pending, ``then``, completed, gone."""
    qemu.job_status(job, JobStatus.WAITING)

    def end() -> None:
        if qemu.jobs.get(job.id) is not job or job.status is not JobStatus.WAITING:
            return  # cancelled meanwhile
        qemu.job_status(job, JobStatus.PENDING)
        then()
        _conclude(qemu, job, "BLOCK_JOB_COMPLETED")

    qemu.world.after(0.0013, end)


def _block_commit(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    if any(k in args for k in ("top-node", "top", "base")):
        raise QemuError("the fake models active commit of the top layer only")
    top = find_node(qemu, str(args["device"]))
    if top.backing is None:
        raise QemuError(f"Top image '{top.name}' has no backing file to commit into")
    if "base-node" in args and args["base-node"] != top.backing.name:
        raise QemuError("the fake models a commit into the top's own backing node only")
    job = _new_job(qemu, str(args["job-id"]), "commit", top, top.backing)
    qemu.world.after(qemu.world.knobs.commit_ready_after, lambda: _commit_synced(qemu, job))
    return {}


def _commit_synced(qemu: FakeQemu, job: Job) -> None:
    if qemu.jobs.get(job.id) is job and job.status is JobStatus.RUNNING:
        _become_ready(qemu, job)


def _job(qemu: FakeQemu, job_id: str, verb: str, allowed: Callable[[Job], bool]) -> Job:
    """The job a ``verb`` command names, if QEMU's job verb table lets it take that verb now."""
    job = qemu.jobs.get(job_id)
    if job is None:
        raise QemuError(f"Block job '{job_id}' not found", "DeviceNotActive")
    if not allowed(job):
        raise QemuError(
            f"Job '{job_id}' in state '{job.status}' cannot accept command verb '{verb}'"
        )
    return job


def _job_complete(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    job = _job(qemu, str(args["id"]), "complete", lambda j: j.ready)
    if job.type != "commit":
        raise QemuError("the fake does not model a mirror pivot")

    def merge() -> None:
        assert job.target.image is not None
        assert job.node.image is not None
        job.target.image.records |= job.node.image.records
        if qemu.device is job.node:
            qemu.device = job.target

    _finish(qemu, job, merge)
    return {}


def _cancellable(job: Job) -> bool:
    return job.status.cancellable


def _block_job_cancel(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    job = _job(qemu, str(args["device"]), "cancel", _cancellable)
    if job.ready and not args.get("force", False):
        # A ready mirror cancelled softly completes without a pivot: the target is consistent.
        _finish(qemu, job, lambda: None)
    else:
        _abort(qemu, job)
    return {}


def _job_cancel(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    _abort(qemu, _job(qemu, str(args["id"]), "cancel", _cancellable))
    return {}


def _abort(qemu: FakeQemu, job: Job) -> None:
    qemu.job_status(job, JobStatus.ABORTING)
    delay = qemu.world.knobs.job_abort_seconds
    qemu.world.after(delay, lambda: _conclude(qemu, job, "BLOCK_JOB_CANCELLED"))


def _job_dismiss(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    job = _job(qemu, str(args["id"]), "dismiss", lambda j: j.status is JobStatus.CONCLUDED)
    qemu.job_status(job, JobStatus.NULL)
    del qemu.jobs[job.id]
    return {}


def _query_jobs(qemu: FakeQemu, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    del args
    return [j.to_query_jobs() for j in qemu.jobs.values()]


def _query_block_jobs(qemu: FakeQemu, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    del args
    return [j.to_query_block_jobs() for j in qemu.jobs.values()]


def pause_jobs_for_stop(qemu: FakeQemu) -> None:
    """The guest stopped: a ready job goes standby, then ready again (as measured)."""
    for job in list(qemu.jobs.values()):
        if job.status is JobStatus.READY:
            qemu.job_status(job, JobStatus.STANDBY)
            qemu.job_status(job, JobStatus.READY)


# -- the NBD server ------------------------------------------------------------------------------


def _nbd_server_start(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    addr = args["addr"]
    if "data" not in addr:
        raise QemuError("Parameter 'addr.data' is missing")
    if qemu.nbd_server is not None:
        raise QemuError("NBD server already running")
    path = str(addr["data"]["path"])
    qemu.nbd_server = path
    qemu.world.host.files[path] = SocketFile(path, qemu.name)
    return {}


def _nbd_server_stop(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    if qemu.nbd_server is None:
        raise QemuError("NBD server not running")
    for export in list(qemu.exports.values()):
        _delete_export(qemu, export)
    qemu.nbd_server = None
    return {}


def _block_export_add(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    if args.get("type") != "nbd":
        raise QemuError("the fake models NBD exports only")
    if qemu.nbd_server is None:
        raise QemuError("NBD server not running")
    export_id = str(args["id"])
    if export_id in qemu.exports:
        raise QemuError(f"Block export id '{export_id}' is already in use")
    node = find_node(qemu, str(args["node-name"]))
    node.active = True  # QEMU 10 activates an inactive node it exports
    qemu.exports[export_id] = Export(export_id, str(args.get("name", node.name)), node)
    return {}


def _block_export_del(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    export = qemu.exports.get(str(args["id"]))
    if export is None:
        raise QemuError(f"Export '{args['id']}' is not found")
    if args.get("mode", "safe") == "safe" and qemu.world.nbd_clients(qemu, export):
        raise QemuError(f"export '{export.id}' still in use")
    _delete_export(qemu, export)
    return {}


def _delete_export(qemu: FakeQemu, export: Export) -> None:
    del qemu.exports[export.id]
    qemu.emit("BLOCK_EXPORT_DELETED", {"id": export.id})


def _query_block_exports(qemu: FakeQemu, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    del args
    return [
        {"id": e.id, "type": "nbd", "node-name": e.node.name, "shutting-down": False}
        for e in qemu.exports.values()
    ]


Handler = Callable[["FakeQemu", Mapping[str, Any]], Any]

BLOCK_COMMANDS: Mapping[str, Handler] = {
    "blockdev-add": _blockdev_add,
    "blockdev-del": _blockdev_del,
    "blockdev-snapshot": _blockdev_snapshot,
    "query-named-block-nodes": _query_named_block_nodes,
    "query-block": _query_block,
    "blockdev-mirror": _blockdev_mirror,
    "block-commit": _block_commit,
    "job-complete": _job_complete,
    "block-job-cancel": _block_job_cancel,
    "job-cancel": _job_cancel,
    "job-dismiss": _job_dismiss,
    "query-jobs": _query_jobs,
    "query-block-jobs": _query_block_jobs,
    "nbd-server-start": _nbd_server_start,
    "nbd-server-stop": _nbd_server_stop,
    "block-export-add": _block_export_add,
    "block-export-del": _block_export_del,
    "query-block-exports": _query_block_exports,
}
