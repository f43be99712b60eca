"""The public surface embedders use: everything in ``livemig.__all__``, and nothing else needed."""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
from pathlib import Path

import livemig


def test_every_export_exists_and_is_listed_once() -> None:
    assert len(set(livemig.__all__)) == len(livemig.__all__)
    for name in livemig.__all__:
        assert hasattr(livemig, name), name


def test_every_error_derives_from_the_one_root() -> None:
    errors = [
        obj
        for name in livemig.__all__
        if inspect.isclass(obj := getattr(livemig, name)) and issubclass(obj, BaseException)
    ]
    assert len(errors) > 10
    assert all(issubclass(e, livemig.LivemigError) for e in errors)


def test_the_documented_example_builds_a_plan() -> None:
    plan = livemig.Plan.create(
        source_qmp="/run/vm1/source.qmp",
        target_qmp="/run/vm1/target.qmp",
        storage="non-shared",
        work_dir="/var/lib/livemig/vm1",
        policy=livemig.Policy(downtime_limit_ms=200),
    )
    assert plan.storage is livemig.StorageChoice.NON_SHARED
    assert inspect.iscoroutinefunction(livemig.migrate)
    assert set(livemig.Outcome) == {
        livemig.Outcome.FINALIZED,
        livemig.Outcome.REVERTED,
        livemig.Outcome.FAILED,
        livemig.Outcome.REFUSED,
    }


def test_the_cli_imports_no_engine_for_help() -> None:
    # ``livemig --help`` stays fast because building the parser loads none of the engine's heavy
    # dependencies; each command imports what it runs.
    probe = (
        "import sys, livemig.cli; livemig.cli.build_parser();"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'trio', 'trio_asyncio', 'qemu', 'rich', 'transitions', 'graphviz', 'hypothesis'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_the_test_machinery_exports_what_a_test_engineer_needs() -> None:
    import livemig.testing

    assert len(set(livemig.testing.__all__)) == len(livemig.testing.__all__)
    for name in livemig.testing.__all__:
        assert hasattr(livemig.testing, name), name
    assert {"fake_world", "migrate_with_faults", "FaultPlan", "run_fake_campaign"} <= set(
        dir(livemig.testing)
    )


def test_the_engine_does_not_import_the_test_machinery() -> None:
    probe = (
        "import sys, livemig.fsm.runner, livemig.fsm.recovery, livemig.cli;"
        "print(sorted(m for m in sys.modules if m.startswith('livemig.testing')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_a_json_run_does_not_import_the_human_display(tmp_path: Path) -> None:
    # rich (~80 ms of start-up) is for people; a --json run, the programs' interface, skips it.
    # Two socket files nobody listens on: refused at the first connect, after the display opened.
    for name in ("a", "b"):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / name))
    probe = (
        "import sys, livemig.cli;"
        f"code = livemig.cli.main(['migrate', '--source-qmp', {str(tmp_path / 'a')!r},"
        f" '--target-qmp', {str(tmp_path / 'b')!r}, '--storage', 'shared',"
        f" '--work-dir', {str(tmp_path / 'work')!r}, '--json']);"
        "print(code, 'rich' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip().splitlines()[-1] == "2 False"
