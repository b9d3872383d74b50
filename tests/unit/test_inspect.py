"""``vhostmap inspect``: a live port's virtqueues and krings, and why traffic stands still, over the real
control socket and command line; read-only, also on a hostile guest's rings."""

from __future__ import annotations

import json

import pytest
from daemons import RunningDaemon, StartDaemon

from vhostmap.cli import main
from vhostmap.virtio.spec import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

FRAME = bytes.fromhex("020000000002020000000001") + b"\x88\xb5" + bytes(46)


def inspect(d: RunningDaemon, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["inspect", *args, "--control", str(d.workdir / "control.sock")])
    out, err = capsys.readouterr()
    return code, out + err


def test_a_guest_without_receive_buffers_is_shown_stalled(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    fa.transmit([FRAME] * 3)
    d.wait(lambda: d.stats("b")["occupancy"][0]["held"] == 3, "a's frames to be held for b")
    code, out = inspect(d, capsys, "b")
    assert code == 0
    assert "STALLED: no receive buffers: 3 frame(s) wait until the guest posts some" in out
    assert "vq 0 (guest receive): size 256, started, enabled, mapped; avail idx 0, taken 0, waiting 0" in out
    code, out = inspect(d, capsys, "a", "--json")
    reply = json.loads(out)
    assert reply["queues"][0]["stalled"] == [] and reply["broken"] is None
    assert reply["queues"][0]["guest_transmit"]["last_avail_idx"] == 3
    fb.post_receive_buffers(3)
    assert len(fb.receive(3)) == 3
    assert "moving (nothing stands still)" in inspect(d, capsys, "b")[1]


def test_descriptors_show_the_waiting_chains_and_a_bad_one_without_touching_it(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    d = start_daemon({"a": ""})
    fa = d.frontend("a")
    rx = fa.queues[0]
    fa.post_receive_buffers(2)
    # A third chain that loops: descriptor 2 -> 3 -> 2.
    fa.write_desc(rx, 2, fa.buffer(rx, 2), 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3)
    fa.write_desc(rx, 3, fa.buffer(rx, 3), 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2)
    fa.publish(rx, [2])
    code, out = inspect(d, capsys, "a", "--queue", "0", "--descriptors", "--json")
    assert code == 0
    vq = json.loads(out)["queues"][0]["guest_receive"]
    assert vq["pending"] == 3
    assert [c["segments"] for c in vq["chains"][:2]] == [
        [list(s) for s in fa.chain_segments(rx, head)] for head in (0, 1)
    ]
    assert vq["chains"][2]["head"] == 2 and "a loop?" in vq["chains"][2]["fault"]
    text = inspect(d, capsys, "a", "--descriptors")[1]
    assert "chain 2: FAULT" in text and "STALLED: the guest's receive queue holds a bad chain" in text
    assert d.device("a").broken is None, "inspecting reads, it does not judge"
    assert vq["last_avail_idx"] == d.device("a").vqs[0].last_avail_idx == 0


def test_a_broken_port_says_why_and_bad_requests_are_refused(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa = d.frontend("a")
    fa.write_desc(fa.queues[1], 0, 1 << 50, 64, 0)
    fa.publish(fa.queues[1], [0])
    reason = d.wait_broken("a")
    assert f"STALLED: the device is broken: {reason}" in inspect(d, capsys, "a")[1]
    assert inspect(d, capsys, "nosuch") == (
        1,
        "vhostmap inspect: no vhost-user port 'nosuch' (inspect shows vhost-user ports)\n",
    )
    code, out = inspect(d, capsys, "a", "--queue", "3")
    assert code == 1 and "port a has queue pairs 0..0, not 3" in out
