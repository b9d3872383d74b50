"""Guest to guest through a vhostmap switch with both guests in passthrough mode, two real guests
(vhostmap.lab.ptswitch, the by-hand tool, runs it: the test and the tool share the code).

Two boots of the Python guest image side by side, each a q35 machine with QEMU's intel-iommu and an
ivshmem-doorbell device on its passthrough port, both ports on switch ``vale0``. The sender's pkt-gen sends
numbered broadcast frames; the receiver's checks every frame it gets. Exact accounting: every frame the
sender handed over was taken by the daemon, and either delivered (and received unchanged, in order, none
twice) or counted dropped by the switch for want of room at the receiver (VALE's policy).

The same boot proves the MSI-X path: both drivers open their devices through vfio-pci (the vfio modules are
in the lab's guest kernel image) and sleep on the interrupt's eventfd when they wait, asking for it with
``appl_need_kick``. The receiver slept (it waited for the first frames at least), the daemon raised it
interrupts, and far fewer than the sender's batches: while frames flow nobody asks for one.
"""

from __future__ import annotations

import pytest

from vhostmap.lab import ptswitch
from vhostmap.lab.guestimage import GuestImage

pytestmark = pytest.mark.slow

# Frames per run: enough for a rate and a few hundred batches, few enough for the suite.
COUNT = 30_000


def test_two_guests_in_passthrough_mode_through_a_switch_with_msix_interrupts(
    python_image: GuestImage, capsys: pytest.CaptureFixture[str]
) -> None:
    result = ptswitch.run(COUNT, 60, python_image, interrupts=True, idle=2.0)
    with capsys.disabled():
        print("\n" + result.table())
    assert result.sent == COUNT and result.taken == COUNT, result
    assert result.check["mismatched"] == result.check["duplicates"] == result.check["reordered"] == 0, result
    assert result.delivered == result.received > 0, result
    assert result.received + result.dropped == result.sent, result
    assert result.exact
    # The receiver slept on its MSI-X interrupt through vfio-pci, not busy-polling ...
    assert result.rx_interrupt_problem is None and result.rx_sleeps > 0, result
    # ... and was woken by the daemon's interrupts, far fewer than the batches that came.
    assert 0 < result.interrupts <= result.batches // 4, result
