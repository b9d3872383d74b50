"""``scripts/repeat``: run the same tests again and again, each time in a fresh pytest session, and say which
runs failed, which tests failed in them and how long the clean streak is: how a flaky test is found, and
how a suite is shown not to have one (issue #15: the slow tests, 20 runs, no failure).

A fresh session each run, not pytest-repeat's ``--count`` within one: session fixtures (a guest image, the
testing kit's sweep of killed sessions, libvirtd's connection) are set up again each time, as in CI. Each
run's output is kept in ``--logs``. A run that skips tests is clean but says how many it skipped: a skip
can hide a test that stopped running (libvirtd down, a tool missing).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PYTEST_ARGS = ("-m", "slow")
# pytest's last line: "== 1 failed, 81 passed, 4 skipped in 561.44s (0:09:21) ==" (-q drops the "==").
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclass
class Run:
    """One session's outcome."""

    number: int
    returncode: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Exited 0: every selected test passed (or was skipped)."""
        return self.returncode == 0

    def line(self, runs: int) -> str:
        """``run 3/20: clean, 82 passed (561 s)`` or ``run 4/20: FAILED tests/x.py::t; 1 failed, ...``."""
        counts = ", ".join(f"{n} {what}" for what, n in self.counts.items() if what != "deselected")
        if self.clean:
            verdict = "clean"
        elif self.failed:
            verdict = "FAILED " + " ".join(self.failed)
        else:
            verdict = f"FAILED (pytest exit status {self.returncode})"
        return f"run {self.number}/{runs}: {verdict}; {counts or 'no summary'} ({self.seconds:.0f} s)"


def parse(number: int, returncode: int, seconds: float, output: str) -> Run:
    """A run from pytest's output (``-q -rfE``: the FAILED/ERROR lines, and the counts of its last line that
    has them)."""
    counts: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        if _COUNT.search(line) and " in " in line:
            for n, what in _COUNT.findall(line):
                counts["errors" if what.startswith("error") else what] = int(n)
            break
    return Run(number, returncode, seconds, counts, _FAILED.findall(output))


def summary(runs: list[Run]) -> list[str]:
    """The tally: clean runs, the clean streak at the end, runs that skipped, and each failing test's runs."""
    clean = sum(r.clean for r in runs)
    streak = 0
    for r in reversed(runs):
        if not r.clean:
            break
        streak += 1
    out = [f"{len(runs)} runs: {clean} clean, {len(runs) - clean} failed; the last {streak} in a row clean"]
    skipped = [r for r in runs if r.counts.get("skipped")]
    if skipped:
        out.append(
            "runs that skipped tests: " + ", ".join(f"{r.number} ({r.counts['skipped']})" for r in skipped)
        )
    by_test: dict[str, list[int]] = {}
    for r in runs:
        for test in r.failed:
            by_test.setdefault(test, []).append(r.number)
    for test, numbers in sorted(by_test.items()):
        out.append(f"failed: {test} in run(s) {', '.join(map(str, numbers))}")
    return out


def run_once(number: int, pytest_args: Sequence[str], log: Path) -> Run:
    """One fresh session of ``python -m pytest -q -rfE -p no:cacheprovider ARGS``, its output into ``log``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *pytest_args]
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    return parse(number, proc.returncode, time.monotonic() - start, log.read_text(errors="replace"))


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; the exit status is 0 only if every run was clean."""
    parser = argparse.ArgumentParser(
        prog="scripts/repeat",
        description="Run tests again and again, each time in a fresh pytest session; report the failures.",
    )
    parser.add_argument("--runs", type=int, default=20, help="sessions to run (default 20)")
    parser.add_argument(
        "--logs", type=Path, default=Path("repeat-logs"), help="each run's output: DIR/run-N.log"
    )
    parser.add_argument("--until-failure", action="store_true", help="stop after the first run that fails")
    parser.add_argument(
        "pytest_args", nargs="*", help="after --: pytest's arguments (default: -m slow, the slow tests)"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.logs.mkdir(parents=True, exist_ok=True)
    pytest_args = args.pytest_args or list(DEFAULT_PYTEST_ARGS)
    runs: list[Run] = []
    for number in range(1, args.runs + 1):
        run = run_once(number, pytest_args, args.logs / f"run-{number}.log")
        runs.append(run)
        print(run.line(args.runs), flush=True)
        if args.until_failure and not run.clean:
            break
    for line in summary(runs):
        print(line)
    return 0 if all(r.clean for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
