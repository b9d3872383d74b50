"""The control server over a real UNIX socket and event loop: one client's requests never hold the loop
that every other client, and every vhost-user port, shares."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vhostmap.control.server import ControlServer

PILE = 2000  # requests one client sends in one write (34 kB: one read of the server's transport)


def test_a_client_with_a_pile_of_requests_waits_behind_the_others(tmp_path: Path) -> None:
    """A sends PILE requests at once and B one after them: B is answered long before A's pile is, as the
    loop turns between a client's requests. Answering A's whole buffered pile first (readline returns the
    next buffered line without yielding) put B's request, a vhost-user port's messages and the passthrough
    heartbeat behind it: under load, seconds."""
    handled: list[str] = []
    all_answered = asyncio.Event()

    def note(request: Mapping[str, Any]) -> dict[str, Any]:
        handled.append(str(request["who"]))
        if len(handled) == PILE + 1:
            all_answered.set()
        return {}

    async def scenario() -> None:
        path = str(tmp_path / "control.sock")
        server = ControlServer(path, {"note": note})
        await server.start()
        a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        try:
            # Connected (the listener's backlog) and the requests in the server's socket buffers before the
            # loop runs again: both clients are readable at once.
            a.connect(path)
            b.connect(path)
            a.sendall((json.dumps({"cmd": "note", "who": "A"}) + "\n").encode() * PILE)
            b.sendall((json.dumps({"cmd": "note", "who": "B"}) + "\n").encode())
            try:
                await asyncio.wait_for(all_answered.wait(), timeout=10)
            except TimeoutError:
                raise AssertionError(f"{PILE + 1} requests sent, {len(handled)} answered in 10 s") from None
        finally:
            a.close()
            b.close()
            await server.close()

    asyncio.run(scenario())
    assert handled.count("A") == PILE
    assert handled.index("B") < 50, f"B answered after {handled.index('B')} of A's requests"
