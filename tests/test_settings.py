"""What livemig sets on each side, from what each QEMU offers: pure."""

from __future__ import annotations

from typing import Any

from livemig.fsm.plan import Policy
from livemig.fsm.settings import UNLIMITED_BANDWIDTH, choose_settings

CAPS = dict.fromkeys(
    ["events", "pause-before-switchover", "auto-converge", "late-block-activate",
     "postcopy-ram", "multifd"],
    False,
)  # fmt: skip
PARAMS: dict[str, Any] = {
    "downtime-limit": 300,
    "max-bandwidth": 134217728,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "multifd-channels": 2,
}


def choose(policy: Policy | None = None, **changes: dict[str, Any]) -> Any:
    answers: dict[str, dict[str, Any]] = {
        "source_capabilities": CAPS,
        "target_capabilities": CAPS,
        "source_parameters": PARAMS,
        "target_parameters": PARAMS,
    }
    return choose_settings(policy or Policy(), **(answers | changes))  # type: ignore[arg-type]


def test_everything_offered_is_set_and_the_old_values_are_kept_for_undo() -> None:
    chosen = choose()
    assert dict(chosen.source_capabilities) == {
        "events": True,
        "pause-before-switchover": True,
        "auto-converge": True,
    }
    assert dict(chosen.target_capabilities) == {"events": True, "late-block-activate": True}
    assert dict(chosen.source_parameters) == {
        "downtime-limit": 300,
        "max-bandwidth": UNLIMITED_BANDWIDTH,
    }
    assert dict(chosen.target_parameters) == {}
    assert dict(chosen.restore_capabilities) == {
        "events": False,
        "pause-before-switchover": False,
        "auto-converge": False,
    }
    # The ladder's throttle parameters are put back too: it may change them later.
    assert dict(chosen.restore_parameters) == {
        "downtime-limit": 300,
        "max-bandwidth": 134217728,
        "cpu-throttle-initial": 20,
        "cpu-throttle-increment": 10,
    }
    assert chosen.not_offered == ()


def test_what_a_side_does_not_offer_is_not_set_and_is_reported() -> None:
    old_target = {k: v for k, v in CAPS.items() if k != "late-block-activate"}
    old_source = {k: v for k, v in PARAMS.items() if k != "downtime-limit"}
    chosen = choose(target_capabilities=old_target, source_parameters=old_source)
    assert "late-block-activate" not in chosen.target_capabilities
    assert "downtime-limit" not in chosen.source_parameters
    assert "downtime-limit" not in chosen.restore_parameters
    assert chosen.not_offered == (
        "target capability late-block-activate",
        "source parameter downtime-limit",
    )


def test_post_copy_and_multifd_only_when_both_sides_offer_them() -> None:
    policy = Policy(postcopy=True, multifd_channels=4)
    chosen = choose(policy)
    for side in (chosen.source_capabilities, chosen.target_capabilities):
        assert side["postcopy-ram"]
        assert side["multifd"]
    assert chosen.source_parameters["multifd-channels"] == 4
    assert dict(chosen.target_parameters) == {"multifd-channels": 4}
    one_sided = {k: v for k, v in CAPS.items() if k not in ("postcopy-ram", "multifd")}
    chosen = choose(policy, target_capabilities=one_sided)
    assert "postcopy-ram" not in chosen.source_capabilities
    assert "multifd" not in chosen.source_capabilities
    assert dict(chosen.target_parameters) == {}


def test_an_operator_bandwidth_cap_is_what_qemu_gets() -> None:
    chosen = choose(Policy(max_bandwidth=16 << 20))
    assert chosen.source_parameters["max-bandwidth"] == 16 << 20
