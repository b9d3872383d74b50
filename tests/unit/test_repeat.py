"""scripts/repeat (vhostmap.lab.repeat) over real pytest sessions: a test that fails in one run of three is
named with its run, the clean streak counts from the end, and skips are reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostmap.lab.repeat import main, parse

# Counts its runs in a file beside it: passes, fails on the second run, passes; the other test skips once.
INNER = """
from pathlib import Path

import pytest

COUNT = Path(__file__).with_name("count")


def test_flaky():
    n = int(COUNT.read_text()) if COUNT.exists() else 0
    COUNT.write_text(str(n + 1))
    assert n != 1, "fails on the second run"


def test_sometimes_skipped():
    if COUNT.read_text() == "3":
        pytest.skip("the third run")
"""


def test_a_failure_in_one_run_is_named_with_its_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER)
    logs = tmp_path / "logs"
    rc = main(["--runs", "3", "--logs", str(logs), "--", "-p", "no:vhostmap", str(inner)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1, out
    assert out[0].startswith("run 1/3: clean; 2 passed ("), out
    assert out[1].startswith("run 2/3: FAILED ") and "test_inner.py::test_flaky" in out[1], out
    assert "1 failed, 1 passed" in out[1], out
    assert out[2].startswith("run 3/3: clean; 1 passed, 1 skipped ("), out
    assert out[3] == "3 runs: 2 clean, 1 failed; the last 1 in a row clean", out
    assert out[4] == "runs that skipped tests: 3 (1)", out
    assert out[5].startswith("failed: ") and out[5].endswith("test_inner.py::test_flaky in run(s) 2"), out
    assert sorted(p.name for p in logs.iterdir()) == ["run-1.log", "run-2.log", "run-3.log"]
    assert "fails on the second run" in (logs / "run-2.log").read_text()


def test_until_failure_stops_at_the_first_failing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER)
    rc = main(
        [
            "--runs",
            "5",
            "--until-failure",
            "--logs",
            str(tmp_path / "logs"),
            "--",
            "-p",
            "no:vhostmap",
            str(inner),
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 1 and out[-2] == "2 runs: 1 clean, 1 failed; the last 0 in a row clean", out


def test_the_counts_come_from_the_last_summary_line() -> None:
    output = "\n".join(
        [
            "x",
            "FAILED tests/a.py::t - AssertionError",
            "vhostmap: 3 guest boot(s)",
            "1 failed, 81 passed, 4 skipped, 9 deselected in 561.44s (0:09:21)",
        ]
    )
    run = parse(7, 1, 561.4, output)
    assert run.counts == {"failed": 1, "passed": 81, "skipped": 4, "deselected": 9}
    assert run.failed == ["tests/a.py::t"] and not run.clean
    assert run.line(20) == "run 7/20: FAILED tests/a.py::t; 1 failed, 81 passed, 4 skipped (561 s)"
