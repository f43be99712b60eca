"""What the guest does while it is migrated: load, RAM size, storage mode."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import attrs

__all__ = [
    "DEFAULT_SCENARIOS",
    "LOADS",
    "MEMORIES",
    "REALISTIC_SCENARIOS",
    "STORAGES",
    "Scenario",
    "select",
]

Load = Literal["idle", "50", "max"]
Storage = Literal["non-shared", "shared"]
#: ``test``: the test guest on one 64 MiB raw disk (the default matrix); ``realistic``: the
#: realistic VM of ``livemig.guest`` (q35, 2 vCPUs, qcow2 root on a backing file, raw data disk,
#: CD-ROM, NIC, RNG, USB tablet) with 1 GiB of allocated data on its disks (``bench/realistic.py``).
Vm = Literal["test", "realistic"]

LOADS: tuple[Load, ...] = ("idle", "50", "max")
MEMORIES: tuple[int, ...] = (512, 1024)
STORAGES: tuple[Storage, ...] = ("non-shared", "shared")

#: The buffer the workload dirties, per load (MiB). ``max`` walks a larger buffer so that the
#: guest's working set is well beyond what one pass sends between dirty syncs.
_BUFFER_MIB: dict[Load, int] = {"idle": 64, "50": 64, "max": 128}

#: The root disk of every scenario, as in the lab.
DISK_BYTES = 64 << 20
#: The realistic VM's disks: each 1 GiB virtual, 512 MiB of it allocated with data before boot
#: (the root's in the raw base under it, the data disk's in itself); the rest sparse.
REALISTIC_DISK_BYTES = 1 << 30
REALISTIC_FILL_BYTES = 512 << 20


@attrs.frozen
class Scenario:
    load: Load
    memory_mib: int
    storage: Storage
    vm: Vm = "test"

    @property
    def realistic(self) -> bool:
        return self.vm == "realistic"

    @property
    def name(self) -> str:
        load = {"idle": "idle", "50": "dirty50", "max": "dirtymax"}[self.load]
        size = (
            f"{self.memory_mib // 1024}G" if self.memory_mib % 1024 == 0 else f"{self.memory_mib}M"
        )
        prefix = "realistic-" if self.realistic else ""
        return f"{prefix}{load}-{size}-{self.storage}"

    @property
    def dirty_mib_s(self) -> int | Literal["max"]:
        if self.load == "max":
            return "max"
        return 0 if self.load == "idle" else int(self.load)

    @property
    def dirty_buf_mib(self) -> int:
        return _BUFFER_MIB[self.load]

    @property
    def describe(self) -> str:
        load = {
            "idle": "idle guest",
            "50": "guest dirtying 50 MiB/s (64 MiB buffer)",
            "max": "guest dirtying as fast as it can (128 MiB buffer)",
        }[self.load]
        if self.realistic:
            fill = REALISTIC_FILL_BYTES >> 20
            size = REALISTIC_DISK_BYTES >> 20
            return (
                f"realistic VM ({load} RAM, records written to both disks every 20 ms): q35, "
                f"2 vCPUs, {self.memory_mib} MiB RAM, qcow2 root ({size} MiB) on a raw backing "
                f"file holding {fill} MiB of data, raw data disk ({size} MiB, {fill} MiB of "
                f"data), CD-ROM, NIC, RNG, USB tablet; {self.storage} storage"
            )
        return f"{load}, {self.memory_mib} MiB RAM, {self.storage} storage, 64 MiB disk"


def _matrix(
    loads: Iterable[Load], memories: Iterable[int], storages: Iterable[Storage]
) -> list[Scenario]:
    return [Scenario(load, mem, st) for st in storages for mem in memories for load in loads]


#: Every load at 512 MiB, the idle guest at 1 GiB, both storage modes.
DEFAULT_SCENARIOS: tuple[Scenario, ...] = tuple(
    s for s in _matrix(LOADS, MEMORIES, STORAGES) if s.memory_mib == 512 or s.load == "idle"
)


#: Selectable by name only (``--scenario``), never part of the default matrix: one repetition
#: of all four variants takes a few minutes (1 GiB of disk data copied per run).
REALISTIC_SCENARIOS: tuple[Scenario, ...] = (Scenario("idle", 1024, "non-shared", "realistic"),)


def select(
    *,
    names: Sequence[str] = (),
    loads: Sequence[Load] = (),
    memories: Sequence[int] = (),
    storages: Sequence[Storage] = (),
) -> list[Scenario]:
    """The scenarios asked for.

    ``names`` picks scenarios by name from the full matrix and :data:`REALISTIC_SCENARIOS`
    (which nothing else selects). Otherwise the default set, filtered
    by the given loads and storage modes; asking for RAM sizes explicitly filters the full
    matrix instead (so ``--memory 1024 --load 50`` is possible).

    :raise ValueError: on an unknown scenario name or RAM size.
    """
    everything = _matrix(LOADS, memories or MEMORIES, STORAGES)
    if names:
        by_name = {s.name: s for s in (*_matrix(LOADS, MEMORIES, STORAGES), *REALISTIC_SCENARIOS)}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown scenarios {unknown}; known: {sorted(by_name)}")
        return [by_name[n] for n in names]
    pool = everything if memories else list(DEFAULT_SCENARIOS)
    return [
        s
        for s in pool
        if (not loads or s.load in loads)
        and (not memories or s.memory_mib in memories)
        and (not storages or s.storage in storages)
    ]
