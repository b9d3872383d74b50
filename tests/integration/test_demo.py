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
    assert "vm0 -> vm1 ping: 0% loss" in result.stdout
    assert "checksums equal: True" in result.stdout
    assert "PASS" in result.stdout
