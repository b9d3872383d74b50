"""``vhostmap top``: a live terminal view of a running daemon's rates per port and queue and of its datapath
load, refreshed every second, from two readings of ``stats`` and ``status`` over the control socket.

Rates are differences between readings divided by the time between them; a port or queue that appeared or
was reset in between shows no rate rather than a wrong one. ``--once`` prints one view and exits (scripts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vhostmap.control.client import call


@dataclass(frozen=True)
class Reading:
    """What one look at the daemon returned: its stats and its datapath threads, and when."""

    at: float  # time.monotonic()
    ports: dict[str, Any]
    threads: list[dict[str, Any]]
    clock_ns: int


@dataclass(frozen=True)
class QueueRate:
    """One port queue's rates between two readings."""

    port: str
    queue: int
    rx_pps: float
    tx_pps: float
    rx_bps: float  # bits per second
    tx_bps: float
    drops_ps: float
    errors: int


def read(control: str) -> Reading:
    """One reading of the daemon at ``control``."""
    stats = call(control, "stats")
    status = call(control, "status")
    datapath = status["datapath"]
    return Reading(time.monotonic(), stats["ports"], datapath["threads"], int(datapath["clock_ns"]))


def rates(before: Reading, after: Reading) -> list[QueueRate]:
    """The rates of every queue present in both readings, highest packet rate first."""
    dt = after.at - before.at
    out: list[QueueRate] = []
    if dt <= 0:
        return out
    for port, p in after.ports.items():
        old = {q["queue"]: q for q in before.ports.get(port, {}).get("queues", ())}
        for q in p["queues"]:
            o = old.get(q["queue"])
            if o is None or q["rx_packets"] < o["rx_packets"] or q["tx_packets"] < o["tx_packets"]:
                continue  # new, or its counters started again (a port that reconnected)

            def per_s(key: str, q: dict[str, Any] = q, o: dict[str, Any] = o) -> float:
                return float(q[key] - o[key]) / dt

            out.append(
                QueueRate(
                    port,
                    q["queue"],
                    per_s("rx_packets"),
                    per_s("tx_packets"),
                    8 * per_s("rx_bytes"),
                    8 * per_s("tx_bytes"),
                    per_s("rx_dropped") + per_s("tx_dropped"),
                    q["errors"],
                )
            )
    out.sort(key=lambda r: (-(r.rx_pps + r.tx_pps), r.port, r.queue))
    return out


def busy(before: Reading, after: Reading) -> list[tuple[int, int | None, float]]:
    """Each datapath thread's (index, CPU, share of the interval it had work)."""
    dt = after.clock_ns - before.clock_ns
    idle0 = {t["thread"]: t["idle_ns"] for t in before.threads}
    out = []
    for t in after.threads:
        if dt > 0 and t["thread"] in idle0:
            share = 1 - (t["idle_ns"] - idle0[t["thread"]]) / dt
            out.append((t["thread"], t["cpu"], max(0.0, min(1.0, share))))
    return out


def _si(value: float) -> str:
    """``value`` in at most 6 characters: 950, 12.3k, 7.85M, 1.20G."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.0f}"


def render(before: Reading, after: Reading) -> Group:
    """The view of the interval between two readings: a table of queues and a line of datapath load."""
    table = Table(title="vhostmap top", title_justify="left")
    table.add_column("port")
    for name in ("queue", "rx pps", "rx bit/s", "tx pps", "tx bit/s", "drops/s", "errors"):
        table.add_column(name, justify="right")
    for r in rates(before, after):
        table.add_row(
            r.port,
            str(r.queue),
            _si(r.rx_pps),
            _si(r.rx_bps),
            _si(r.tx_pps),
            _si(r.tx_bps),
            _si(r.drops_ps),
            str(r.errors),
        )
    load = "  ".join(
        f"thread {k}{'' if cpu is None else f' (CPU {cpu})'}: {share:.0%} busy"
        for k, cpu, share in busy(before, after)
    )
    return Group(table, Text(f"datapath: {load}" if load else "datapath: no reading yet"))


def run(
    control: str,
    interval: float = 1.0,
    once: bool = False,
    console: Console | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Show the view every ``interval`` seconds until Ctrl-C; with ``once``, print one view and return.
    ControlError if the daemon cannot be reached."""
    console = console or Console()
    before = read(control)
    sleep(interval)  # the measurement interval itself
    after = read(control)
    if once:
        console.print(render(before, after))
        return
    with Live(render(before, after), console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                sleep(interval)
                before, after = after, read(control)
                live.update(render(before, after), refresh=True)
        except KeyboardInterrupt:
            return
