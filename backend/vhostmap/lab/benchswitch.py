"""``scripts/bench-switch``: micro-benchmark of the learning switch's per-batch work, the compiled kernel
(datapath/switch.c) against the numpy/Python reference.

In-process ports (no guest, no thread) each receive a batch of frames per round addressed to the next port
(unicast, learnt: buffers move zero copy) or to everyone (broadcast: copies), and send whatever the switch
gives them at once. Prints, per implementation, frame size and traffic, the time per frame of the forwarding
itself (``Switch.forward``: parse, learn, look up, deliver) and of a whole ``Switch.run()`` (with the ports'
rxsync/txsync, which stay Python), and the frame rates they allow.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from vhostmap.ethernet import BROADCAST
from vhostmap.forwarding.switch import Switch
from vhostmap.netmap.abi import nm_prev
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.kring import Kring


def mac(i: int) -> bytes:
    """The address of bench port ``i``."""
    return bytes([2, 0, 0, 0, 0, 0x10 + i])


class BenchPort(NetmapAdapter):
    """A port whose wire is instant: every rxsync receives up to ``batch`` frames of ``size`` bytes from its
    own address to ``dst``; every txsync sends everything it is given."""

    def __init__(self, name: str, memory: NetmapMemory, index: int, slots: int) -> None:
        super().__init__(name, memory, num_tx_desc=slots, num_rx_desc=slots)
        self.index = index
        self.batch = 0
        self.size = 64
        self.header = np.zeros(14, dtype=np.uint8)
        self.columns = np.arange(14)
        self.sent = 0

    def traffic(self, dst: bytes, size: int, batch: int) -> None:
        """From now on each rxsync receives ``batch`` frames of ``size`` bytes to ``dst``."""
        self.header[:] = np.frombuffer(dst + mac(self.index) + b"\x88\xb5", dtype=np.uint8)
        self.size, self.batch = size, batch

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        n = kring.nkr_num_slots
        kring.nr_hwcur = kring.rhead
        k = min((kring.nr_hwcur - 1 - kring.nr_hwtail) % n, self.batch)
        if not k:
            return
        idx = (kring.nr_hwtail + np.arange(k)) % n
        slots = kring.ring.slots
        # Buffers move between ports: the header is written again into whichever buffer a slot holds now.
        offsets = self.memory.buffers_offset + slots["buf_idx"][idx].astype(np.int64) * self.memory.buf_size
        self.memory.array[offsets[:, None] + self.columns] = self.header
        slots["len"][idx] = self.size
        slots["flags"][idx] = 0
        kring.nr_hwtail = (kring.nr_hwtail + k) % n

    def nm_txsync(self, kring: Kring, flags: int) -> None:
        self.sent += kring.pending()
        kring.nr_hwcur = kring.rhead
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, kring.nkr_num_slots)


def measure(reference: bool, nports: int, size: int, flood: bool, batch: int, rounds: int) -> dict[str, Any]:
    """One configuration's run: frames forwarded and the time per frame of forwarding and of whole rounds."""
    with NetmapMemory(AllocatorParams(buf_num=32768)) as memory:
        ports = [BenchPort(f"p{i}", memory, i, slots=1024) for i in range(nports)]
        sw = Switch("bench", reference=reference)
        for p in ports:
            sw.attach(p)
        # Every address learnt first: one round of broadcasts.
        for p in ports:
            p.traffic(BROADCAST, size, 1)
        sw.run()
        for i, p in enumerate(ports):
            p.traffic(BROADCAST if flood else mac((i + 1) % nports), size, batch)
        forwarding = 0
        forward = sw.forward

        def timed(*args: Any) -> Any:
            nonlocal forwarding
            t0 = time.perf_counter_ns()
            out = forward(*args)
            forwarding += time.perf_counter_ns() - t0
            return out

        sw.forward = timed  # type: ignore[method-assign,assignment]
        before = sum(p.stats.rx_frames for p in sw.ports)
        start = time.perf_counter_ns()
        for _ in range(rounds):
            sw.run()
        total = time.perf_counter_ns() - start
        frames = sum(p.stats.rx_frames for p in sw.ports) - before
        dropped = sum(p.stats.dropped for p in sw.ports)
        for p in ports:
            sw.detach(p)
            p.close()
    return {
        "datapath": "reference" if reference else "compiled",
        "size": size,
        "traffic": "broadcast" if flood else "unicast",
        "ports": nports,
        "batch": batch,
        "frames": frames,
        "dropped": dropped,
        "forward_ns_per_frame": forwarding / frames,
        "forward_mpps": frames / forwarding * 1e3,
        "run_ns_per_frame": total / frames,
        "run_mpps": frames / total * 1e3,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run every configuration and print the table (or JSON)."""
    ap = argparse.ArgumentParser(prog="bench-switch")
    ap.add_argument("--ports", type=int, default=2, choices=range(2, 5))
    ap.add_argument("--batch", type=int, default=256, help="frames each port receives per round (<= 1023)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for flood in (False, True):
        for size in (int(s) for s in args.sizes.split(",")):
            for reference in (True, False):
                # The reference is ~100 times slower: fewer rounds give it as many seconds.
                rounds = max(args.rounds // 10, 5) if reference else args.rounds
                results.append(measure(reference, args.ports, size, flood, args.batch, rounds))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.ports} ports, batches of {args.batch} frames per port and round")
    print(
        f"{'traffic':10} {'size':>5} {'datapath':10} {'forward ns/frame':>17} {'Mpps':>7} "
        f"{'run() ns/frame':>15} {'Mpps':>7}"
    )
    for r in results:
        print(
            f"{r['traffic']:10} {r['size']:>5} {r['datapath']:10} {r['forward_ns_per_frame']:>17.1f} "
            f"{r['forward_mpps']:>7.2f} {r['run_ns_per_frame']:>15.1f} {r['run_mpps']:>7.2f}"
        )


if __name__ == "__main__":
    main()
