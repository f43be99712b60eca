"""The safety invariants, checked on a fake world after a migration ended.

1. Exactly one QEMU runs the guest at the end, and it is running.
2. Every record the guest acknowledged is on the surviving disk (its active layer and the
   backing chain below, counting only files that still exist).
3. No reboot: the survivor runs the original guest, up to date; no record was written twice.
4. Nothing left behind: no temp node, job, NBD export or server, overlay or socket file, open
   monitor; the other QEMU has exited; the source's migration settings are as they were.
5. The outcome agrees: ``finalized`` means the target survives, ``reverted`` the source, both
   with nothing left behind; ``failed`` must say why, and what it left.

1 to 3 are *safety*: they hold whatever the outcome. When an injected kill took the only
up-to-date copy of the guest, no tool can keep it alive: then only "no split brain, no stale
copy running" is checked.
"""

from __future__ import annotations

import attrs

from livemig.fsm.events import MigrationResult, Outcome
from livemig.testing.model.block import Node
from livemig.testing.model.qemu import RECORDS_PER_BOOT, FakeQemu
from livemig.testing.model.world import FIRST_BOOT, World

__all__ = ["Verdict", "check_invariants", "disk_records", "reads_only"]


@attrs.frozen
class Verdict:
    """What `check_invariants` found: ``safety`` and ``leftovers`` problems; ``ok`` when none
    counts against the outcome."""

    survivor: str | None
    safety: tuple[str, ...]
    leftovers: tuple[str, ...]
    #: Leftovers the result does not explain, and outcome disagreements.
    unexplained: tuple[str, ...]

    @property
    def problems(self) -> tuple[str, ...]:
        return self.safety + self.unexplained

    @property
    def ok(self) -> bool:
        return not self.problems


def disk_records(world: World, qemu: FakeQemu) -> set[int]:
    """The records on ``qemu``'s disk: its active layer and everything below it."""
    records: set[int] = set()
    node: Node | None = qemu.device
    seen = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        image = node.image
        # A file removed while QEMU still writes it is gone once QEMU exits.
        if image is not None and world.host.files.get(image.path) is image:
            records |= image.records
        node = node.backing
    return records


def check_invariants(world: World, result: MigrationResult, *, stop_source: bool = True) -> Verdict:
    running = [q for q in world.qemus() if q.alive and q.runstate.running]
    safety = _split_brain(world, running)
    survivor = running[0] if len(running) == 1 else None
    if not world.guest_killed:
        safety += _liveness(world, running, survivor)
    leftovers = _leftovers(world, survivor, stop_source=stop_source) if survivor else []
    unexplained = _agreement(world, result, survivor, leftovers)
    return Verdict(
        survivor=survivor.name if survivor else None,
        safety=tuple(safety),
        leftovers=tuple(leftovers),
        unexplained=tuple(unexplained),
    )


def _split_brain(world: World, running: list[FakeQemu]) -> list[str]:
    problems = []
    if len(running) > 1:
        problems.append("split brain: " + " and ".join(q.name for q in running) + " both run")
    if world.conflicts:
        problems.append(f"two copies of the guest wrote: {world.conflicts[:3]}")
    latest = world.latest_record()
    for qemu in running:
        guest = qemu.guest
        assert guest is not None
        if guest.boot != FIRST_BOOT:
            problems.append(f"the guest rebooted on the {qemu.name} (boot {guest.boot})")
        elif guest.last < latest:
            problems.append(
                f"the {qemu.name} runs a stale copy of the guest (record {guest.last}, "
                f"the guest had acknowledged {latest})"
            )
    return problems


def _liveness(world: World, running: list[FakeQemu], survivor: FakeQemu | None) -> list[str]:
    if not running:
        where = ", ".join(f"{q.name} {q.runstate}" for q in world.qemus())
        return [f"no QEMU runs the guest ({where})"]
    if survivor is None:
        return []
    acked = {r for r in world.acked if r // RECORDS_PER_BOOT == FIRST_BOOT}
    missing = sorted(acked - disk_records(world, survivor))
    if missing:
        shown = [r % RECORDS_PER_BOOT for r in missing[:5]]
        return [
            f"{len(missing)} acknowledged writes are missing on the {survivor.name}'s disk "
            f"(records {shown}…)"
        ]
    return []


def _leftovers(world: World, survivor: FakeQemu, *, stop_source: bool) -> list[str]:
    left: list[str] = []
    before = world.before[survivor.name]
    if extra := sorted(set(survivor.nodes) - before.nodes):
        left.append(f"block nodes left on the {survivor.name}: {extra}")
    if survivor.device.name != before.device:
        left.append(f"the {survivor.name}'s disk runs on {survivor.device.name}")
    if survivor.jobs:
        left.append(f"block jobs left on the {survivor.name}: {sorted(survivor.jobs)}")
    if survivor.exports or survivor.nbd_server:
        left.append(
            f"NBD server or exports left on the {survivor.name}: {sorted(survivor.exports)}"
        )
    if survivor is world.source:
        if tuple(sorted(survivor.capabilities.items())) != before.capabilities:
            left.append("the source's migration capabilities were not restored")
        if tuple(sorted(survivor.parameters.items())) != before.parameters:
            left.append("the source's migration parameters were not restored")
    other = world.target if survivor is world.source else world.source
    # A run that never got past its prechecks touched nothing: the target waits on, untouched.
    untouched = other is world.target and all(reads_only(c.name) for c in other.log)
    if other.alive and not untouched and (other is world.target or stop_source):
        left.append(f"the {other.name} QEMU still runs ({other.runstate})")
    if files := sorted(set(world.host.files) - world.initial_files):
        left.append(f"files left: {files}")
    if open_monitors := [m.name for m in world.connections if not m.closed and m.qemu.alive]:
        left.append(f"monitor connections left open: {open_monitors}")
    return left


def _agreement(
    world: World, result: MigrationResult, survivor: FakeQemu | None, leftovers: list[str]
) -> list[str]:
    problems: list[str] = []
    outcome = result.outcome
    if world.guest_killed:
        # Saying "reverted" is wrong once livemig saw the source gone (a command or a
        # connection it tried failed); a kill after its last word to the source it cannot know.
        if outcome is Outcome.REVERTED and world.source.tries_after_exit:
            problems.append("reverted, but the guest was killed")
        return problems
    expected = {Outcome.FINALIZED: world.target, Outcome.REVERTED: world.source}.get(outcome)
    if expected is not None and survivor is not None and survivor is not expected:
        problems.append(f"{outcome.value}, but the guest runs on the {survivor.name}")
    if outcome is Outcome.FAILED and not result.error:
        problems.append("failed, and the result does not say why")
    explained = (
        bool(result.warnings)
        if outcome is Outcome.FINALIZED
        else bool(result.undo_failures or result.warnings)
    )
    if leftovers and (outcome is Outcome.REVERTED or not explained):
        problems += [f"{outcome.value}, yet {what}" for what in leftovers]
    return problems


def reads_only(command: str) -> bool:
    """Whether a QMP command only reads (the prechecks ask nothing else)."""
    return command.startswith("query-") or command in ("qom-get", "qom-list")
