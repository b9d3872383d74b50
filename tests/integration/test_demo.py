"""README's first command, the demo, in its quick form: it must pass and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vhostmap.lab.demo", "--quick"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in (
        "vm0 -> vm1 ping: 0% loss",
        "vm0 -> host namespace ping: 0% loss",
        "host namespace -> vm1 ping: ok",
    ):
        assert line in out, out
    assert out.count("checksums equal: True") == 2, out
    assert "switch vale0 learnt 3 addresses" in out and "PASS" in out
