"""``livemig faults`` on the fake QEMUs: exit code, table, a JSON report whose plans replay, and a
seed that reproduces the campaign."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from livemig.cli import main
from livemig.fsm.events import Outcome
from livemig.fsm.machine import State, StorageMode
from livemig.testing import campaign_fake
from livemig.testing.faults import AtState, Fault, FaultKind, FaultPlan
from livemig.testing.model.invariants import Verdict, check_invariants

FAULTS = ["faults", "--runs", "30", "--seed", "7"]


def without_timings(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if k != "seconds"}
    out["runs"] = [{k: v for k, v in r.items() if k != "seconds"} for r in report["runs"]]
    return out


def replay(run: dict[str, Any]) -> dict[str, Any]:
    """Run one plan of a report again, as a reader of the report would."""
    again = campaign_fake.run_plan(
        StorageMode(run["storage"]),
        FaultPlan.from_json(run["plan"]),
        frozenset(Outcome(o) for o in run["expected"]),
        number=run["number"],
        source=run["source"],
    )
    return {k: v for k, v in again.to_json().items() if k != "seconds"}


def test_a_fake_campaign_passes_replays_and_repeats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.json"
    assert main([*FAULTS, "--report", str(path)]) == 0
    out, err = capsys.readouterr()
    report = json.loads(path.read_text())

    counts = report["counts"]
    table = len(campaign_fake.systematic_cases(list(StorageMode)))
    assert counts["table_plans"] == table
    assert counts["random_plans"] == 30
    assert counts["plans"] == len(report["runs"]) == table + 30
    assert counts["violations"] == 0
    assert report["violations"] == []
    assert counts["pairs_covered"] == counts["pairs_applicable"] > 0
    assert counts["faults_fired"] + counts["faults_unfired"] == sum(
        len(r["plan"]["faults"]) for r in report["runs"]
    )
    assert all(r["ok"] and r["invariants"]["held"] for r in report["runs"])
    assert "| fault |" in out
    assert "| kill-source |" in out
    assert "invariants held in every run" in out
    assert "[50/" in err

    # Any run replays from its report entry alone: a systematic crash-and-recover run, and the
    # random plans with the most faults.
    crash = next(r for r in report["runs"] if r["recovered"] and r["source"] == "table")
    random_runs = [r for r in report["runs"] if r["source"] == "random"]
    busiest = sorted(random_runs, key=lambda r: -len(r["plan"]["faults"]))[:2]
    for run in (crash, *busiest):
        expected = {k: v for k, v in run.items() if k != "seconds"}
        assert replay(run) == expected

    # The same seed gives the same campaign.
    again = tmp_path / "again.json"
    assert main([*FAULTS, "--report", str(again)]) == 0
    assert without_timings(json.loads(again.read_text())) == without_timings(report)


def test_another_seed_draws_other_plans(tmp_path: Path) -> None:
    def plans(seed: int) -> list[object]:
        path = tmp_path / f"{seed}.json"
        args = ["faults", "--runs", "5", "--seed", str(seed), "--storage", "shared"]
        assert main([*args, "--report", str(path)]) == 0
        report = json.loads(path.read_text())
        assert report["storages"] == ["shared"]
        assert {r["storage"] for r in report["runs"]} == {"shared"}
        return [r["plan"] for r in report["runs"] if r["source"] == "random"]

    assert plans(1) != plans(2)


def test_a_violation_fails_the_campaign_and_names_its_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def split_brain_after_kill_target(world: Any, result: Any) -> Verdict:
        verdict = check_invariants(world, result)
        if world.target.exit_reason == "killed":
            return Verdict(verdict.survivor, ("split brain (planted)",), (), ())
        return verdict

    monkeypatch.setattr(
        "livemig.testing.model.runs.check_invariants", split_brain_after_kill_target
    )
    path = tmp_path / "report.json"
    args = ["faults", "--runs", "3", "--seed", "1", "--storage", "shared", "--report", str(path)]
    assert main(args) == 1
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert not report["ok"]
    violations = report["violations"]
    assert violations
    assert len(violations) == report["counts"]["violations"]
    for violation in violations:
        assert "split brain (planted)" in violation["problems"]
        plan = FaultPlan.from_json(violation["plan"])
        assert any(f.kind.value == "kill-target" for f in plan.faults)
        assert f"#{violation['number']} shared: {plan.describe()}" in out
    assert "VIOLATED" in out
    assert "FAIL" in out


async def _raises(*args: object) -> None:
    raise RuntimeError("the model broke")


async def _never_ends(*args: object) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize(
    ("broken", "why"),
    [(_raises, "raised RuntimeError: the model broke"), (_never_ends, "did not end within")],
)
def test_a_run_that_breaks_is_a_finding_not_the_end_of_the_campaign(
    monkeypatch: pytest.MonkeyPatch, broken: object, why: str
) -> None:
    monkeypatch.setattr("livemig.testing.campaign_fake.migrate_with_faults", broken)
    plan = FaultPlan((Fault(FaultKind.CANCEL, AtState(State.CONNECTED)),), seed=3)
    report = campaign_fake.run_plan(StorageMode.SHARED, plan).to_json()
    assert report["outcome"] == "error"
    assert not report["ok"]
    assert not report["invariants"]["held"]
    assert why in report["error"]
    assert report["problems"] == [report["error"]]
