"""QMP commands on the block graph: nodes, snapshots, and the jobs that copy between nodes.

Thin typed wrappers: one QMP command each, no policy, no timeouts, no retries. Optional arguments
left as ``None`` are not sent, so QEMU's defaults apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from livemig.drivers.qapi import Monitor, json_array, member, optional_member, qmp_arguments, query

__all__ = [
    "BlockDevice",
    "BlockNode",
    "block_commit",
    "blockdev_add",
    "blockdev_del",
    "blockdev_mirror",
    "blockdev_snapshot",
    "query_block",
    "query_named_block_nodes",
    "snapshot_all",
]


@attrs.frozen
class BlockNode:
    """One node of the block graph (an entry of ``query-named-block-nodes``).

    :param node_name: its name; QEMU names nodes it creates implicitly ``#block123``.
    :param driver: ``file``, ``raw``, ``qcow2``, ``nbd``, ``mirror_top``, …
    :param filename: what it reads (a path, ``nbd+unix://…``, a json: description).
    :param backing_file: the file name of the image attached as its backing; ``None`` while
        nothing is attached, even when the image's header names a backing file. QMP does not
        give the backing *node*: compare with that node's ``filename``.
    :param read_only: whether it is opened read-only.
    :param active: ``False`` while an incoming QEMU has not taken the image over yet.
    :param virtual_size: the guest-visible size in bytes.
    :param allocated_bytes: bytes its file takes on the host (``actual-size``: a sparse file
        less than its size); ``None`` when QEMU cannot tell (an NBD client, …).
    """

    node_name: str | None
    driver: str
    filename: str
    backing_file: str | None
    read_only: bool
    active: bool
    virtual_size: int
    allocated_bytes: int | None = None

    @classmethod
    def from_qmp(cls, node: Any) -> BlockNode:
        image = member(node, "image", dict)
        return cls(
            node_name=optional_member(node, "node-name", str),
            driver=member(node, "drv", str),
            filename=member(node, "file", str),
            backing_file=optional_member(node, "backing_file", str),
            read_only=member(node, "ro", bool),
            active=member(node, "active", bool),
            virtual_size=member(image, "virtual-size", int),
            allocated_bytes=optional_member(image, "actual-size", int),
        )


def _nodes(reply: Any) -> tuple[BlockNode, ...]:
    return tuple(BlockNode.from_qmp(node) for node in json_array(reply))


@attrs.frozen
class BlockDevice:
    """One block backend a guest device uses (an entry of ``query-block``).

    Unlike ``query-named-block-nodes``, one entry per disk the guest sees, not per node: a
    format node and its protocol child are one entry.

    :param qdev: the device's QOM path or id (``/machine/peripheral/vda/virtio-backend``).
    :param node_name: the top node of the medium; ``None`` when there is no medium (an empty
        CD-ROM drive).
    :param filename: what the medium reads; ``None`` without a medium.
    :param read_only: whether the medium is read-only (no medium counts as read-only).
    :param backend: the BlockBackend's name (``drive0`` of ``-drive …,id=drive0``); empty for a
        device attached to a ``-blockdev`` node.
    """

    qdev: str
    node_name: str | None
    filename: str | None
    read_only: bool
    backend: str = ""

    @property
    def device_id(self) -> str | None:
        """The guest device's id (``vda`` of ``-device virtio-blk-pci,id=vda``), when it has
        one: the ``/machine/peripheral/<id>/…`` part of its QOM path."""
        parts = self.qdev.split("/")
        if len(parts) > 3 and parts[:3] == ["", "machine", "peripheral"]:
            return parts[3]
        return self.qdev if not self.qdev.startswith("/") else None

    def named(self, name: str) -> bool:
        """Whether ``name`` names this disk: its top node, its BlockBackend or its device id."""
        return name in (self.node_name, self.device_id) or (
            bool(self.backend) and name == self.backend
        )

    @classmethod
    def from_qmp(cls, entry: Any) -> BlockDevice:
        inserted = optional_member(entry, "inserted", dict)
        backend = optional_member(entry, "device", str) or ""
        qdev = optional_member(entry, "qdev", str) or backend
        if inserted is None:
            return cls(qdev=qdev, node_name=None, filename=None, read_only=True, backend=backend)
        return cls(
            qdev=qdev,
            node_name=optional_member(inserted, "node-name", str),
            filename=member(inserted, "file", str),
            read_only=member(inserted, "ro", bool),
            backend=backend,
        )

    @property
    def writable(self) -> bool:
        """Whether the guest can write to it: a medium is inserted and it is not read-only."""
        return self.node_name is not None and not self.read_only


def _devices(reply: Any) -> tuple[BlockDevice, ...]:
    return tuple(BlockDevice.from_qmp(entry) for entry in json_array(reply))


async def query_block(monitor: Monitor) -> tuple[BlockDevice, ...]:
    """Every block backend of a guest device (``query-block``)."""
    return await query(monitor, "query-block", _devices)


async def query_named_block_nodes(monitor: Monitor) -> tuple[BlockNode, ...]:
    """Every named node, each once (``query-named-block-nodes`` with ``flat: true``)."""
    return await query(monitor, "query-named-block-nodes", _nodes, {"flat": True})


async def blockdev_add(monitor: Monitor, options: Mapping[str, object]) -> None:
    """``blockdev-add`` with QMP's ``BlockdevOptions`` as they are (``driver``, ``node-name``, …).

    The nbd driver takes the flat socket form: ``{"server": {"type": "unix", "path": …}}``.
    """
    await monitor.execute("blockdev-add", options)


async def blockdev_del(monitor: Monitor, node_name: str) -> None:
    """``blockdev-del``: remove a node that nothing uses any more."""
    await monitor.execute("blockdev-del", {"node-name": node_name})


async def blockdev_snapshot(monitor: Monitor, node: str, overlay: str) -> None:
    """``blockdev-snapshot``: put ``overlay`` (added with no backing) on top of ``node``; the
    guest's writes go to ``overlay`` from now on and ``node`` is frozen."""
    await monitor.execute("blockdev-snapshot", {"node": node, "overlay": overlay})


async def snapshot_all(monitor: Monitor, pairs: Sequence[tuple[str, str]]) -> None:
    """``transaction`` of one ``blockdev-snapshot`` per ``(node, overlay)``: every overlay goes
    on at the same instant, or none does, so the frozen bases are one crash-consistent point in
    time across the guest's disks."""
    await monitor.execute(
        "transaction",
        {
            "actions": [
                {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}
                for node, overlay in pairs
            ]
        },
    )


async def blockdev_mirror(
    monitor: Monitor,
    *,
    job_id: str,
    device: str,
    target: str,
    sync: str = "top",
    speed: int | None = None,
    copy_mode: str | None = None,
    auto_finalize: bool | None = None,
    auto_dismiss: bool | None = None,
) -> None:
    """``blockdev-mirror``: copy ``device`` (a node name) to the node ``target`` and keep
    mirroring new writes; ``BLOCK_JOB_READY`` once both are in sync.

    :param sync: ``top`` (only the top image's data), ``full`` or ``none``.
    :param copy_mode: ``background`` (QEMU's default) or ``write-blocking``.
    """
    await monitor.execute(
        "blockdev-mirror",
        qmp_arguments(
            job_id=job_id,
            device=device,
            target=target,
            sync=sync,
            speed=speed,
            copy_mode=copy_mode,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
        ),
    )


async def block_commit(
    monitor: Monitor,
    *,
    job_id: str,
    device: str,
    top_node: str | None = None,
    base_node: str | None = None,
    speed: int | None = None,
    auto_finalize: bool | None = None,
    auto_dismiss: bool | None = None,
) -> None:
    """``block-commit``: merge ``top_node`` (default: the active layer of ``device``) down into
    ``base_node`` (default: the bottom of the chain). Committing the active layer waits in
    ``ready`` for ``job-complete``, which then makes the base the active layer."""
    await monitor.execute(
        "block-commit",
        qmp_arguments(
            job_id=job_id,
            device=device,
            top_node=top_node,
            base_node=base_node,
            speed=speed,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
        ),
    )
