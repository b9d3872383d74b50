"""The fuzz targets (fuzz/, scripts/fuzz) in CI: every crash ever found is replayed, and every target runs
briefly from a fresh build, failing on any crash, sanitizer report, fd leak or differential mismatch.

The long runs are by hand (`scripts/fuzz TARGET --seconds N`); this only checks that each target builds,
runs and still finds nothing in a few seconds from its seed corpus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "fuzz"))

import run as fuzz  # noqa: E402

# Seconds of fuzzing per target: libFuzzer harnesses run tens of thousands of inputs a second, the Python
# targets a few hundred.
BRIEF = {name: 10 if not t.compiled else 4 for name, t in fuzz.TARGETS.items()}


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build directory: the harnesses are compiled from the sources under test."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_regressions_replay_cleanly(name: str, build_dir: Path) -> None:
    inputs = fuzz.regressions(name)
    assert fuzz.replay(fuzz.TARGETS[name], build_dir, inputs) == 0, f"{name}: a regression input crashes"


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_target_runs_briefly_without_finding_anything(name: str, build_dir: Path) -> None:
    target = fuzz.TARGETS[name]
    status = fuzz.run(target, build_dir, seconds=BRIEF[name], runs=None, extra=["-close_fd_mask=1"])
    crashes = list((build_dir / "artifacts" / name).glob("*"))
    assert status == 0 and not crashes, f"{name}: exit status {status}, artifacts {crashes}"


def test_the_list_names_every_target() -> None:
    out = subprocess.run(
        [sys.executable, str(fuzz.FUZZ / "run.py"), "--list"], capture_output=True, text=True, check=True
    ).stdout
    assert [line.split()[0] for line in out.splitlines()] == list(fuzz.TARGETS)
