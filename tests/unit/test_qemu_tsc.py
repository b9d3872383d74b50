"""The lab's guests are told the host's TSC frequency (``tsc_early_khz``) when /proc/cpuinfo says it is
constant and known, so that no guest calibrates its clock against an emulated PIT on a busy host; otherwise
they calibrate as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.qemu import QemuGuest, host_tsc_khz

KNOWN = "processor\t: 0\ncpu MHz\t\t: 2445.420\nflags\t\t: fpu tsc constant_tsc nonstop_tsc tsc_known_freq\n"


@pytest.mark.parametrize(
    ("cpuinfo", "khz"),
    [
        (KNOWN, 2445420),
        (KNOWN + "processor\t: 1\ncpu MHz\t\t: 1200.000\n", 2445420),  # the first CPU's
        (KNOWN.replace(" tsc_known_freq", ""), None),  # a TSC whose frequency was measured, not known
        (KNOWN.replace(" constant_tsc", ""), None),  # "cpu MHz" may be the core's current clock
        ("processor\t: 0\nflags\t\t: constant_tsc tsc_known_freq\n", None),
        ("", None),
    ],
)
def test_the_host_tsc_frequency_is_read_only_when_cpuinfo_vouches_for_it(
    tmp_path: Path, cpuinfo: str, khz: int | None
) -> None:
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert host_tsc_khz(tmp_path / "cpuinfo") == khz


def test_a_missing_cpuinfo_means_no_hint(tmp_path: Path) -> None:
    assert host_tsc_khz(tmp_path / "absent") is None


def test_the_guest_command_line_carries_the_hint_when_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = GuestKernel(vmlinux=tmp_path / "vmlinux", initrd=tmp_path / "initrd.gz", version="test")
    guest = QemuGuest(kernel=kernel, workdir=tmp_path / "q")
    monkeypatch.setattr("vhostmap.lab.qemu.host_tsc_khz", lambda: 2445420)
    assert "tsc_early_khz=2445420" in " ".join(guest.command())
    monkeypatch.setattr("vhostmap.lab.qemu.host_tsc_khz", lambda: None)
    assert "tsc_early_khz" not in " ".join(guest.command())
