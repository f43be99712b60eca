"""The installed package: only ``livemig`` lands at the top level of site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def source_tree(into: Path) -> Path:
    """The project's files as git sees them (tracked, or new and not ignored), copied with their
    links: a build from the working tree would reuse a stale ``build/`` left by an earlier one."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source, copy = ROOT / name, into / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy, follow_symlinks=False)
    return into


@pytest.mark.slow
def test_an_install_adds_only_livemig_at_top_level(tmp_path: Path) -> None:
    target = tmp_path / "site"
    tree = source_tree(tmp_path / "src")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", "--target", str(target), str(tree),
        ],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert top in (["bin", "livemig"], ["livemig"])
    for folder in ("fsm", "drivers", "transports", "guest", "testing", "testing/model"):
        assert (target / "livemig" / folder / "__init__.py").is_file()
    # The test machinery is livemig.testing, and the engine has no fault module left.
    assert not (target / "livemig" / "fsm" / "faults.py").exists()
    assert not (target / "livemig" / "model").exists()
    probe = (
        "import importlib.util as u, livemig.fsm.machine, livemig.guest;"
        "import livemig.testing.campaign_fake, livemig.testing.campaign_real;"
        "print([n for n in ('fsm', 'drivers', 'transports', 'guest') if u.find_spec(n)])"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.stdout.strip() == "[]"
