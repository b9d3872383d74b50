"""scripts/soak, briefly: every action of its schedule runs under traffic and its checks hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostmap.lab import soak

pytestmark = pytest.mark.slow


def test_a_short_soak_runs_every_action_and_loses_nothing(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = soak.run(sock_dir, minutes=1.2, every=5.0, sample_every=5.0, restart_every=5)
    with capsys.disabled():
        print("\n" + report.table())
    assert report.ok, report.problems
    done = {name for _, name, _ in report.actions}
    assert done == {
        "switch detach/attach",
        "application churn",
        "testpmd restart",
        "daemon SIGKILL and restart",
    }
    assert max(s.life for s in report.samples) >= 2
    assert report.final_free_buffers == report.baseline_free_buffers
    # The guest reached the application through the switch in every life of the daemon.
    assert {s.life for s in report.samples if s.ping_loss is not None and s.ping_loss < 100} == {
        s.life for s in report.samples
    }
