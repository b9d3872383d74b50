"""Waiting on conditions with a deadline: the lab's only way to synchronise with guests and testpmd.

A fixed ``sleep`` is either too short on a loaded machine or wasted time on an idle one; polling a predicate
until it holds, and failing with a message that says what did not happen, is neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A condition did not hold before its deadline; the message says which and, if known, why."""


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Polling starts fast (a few ms) and backs off to ``interval``, so quick conditions cost little latency.
    Raises `WaitTimeout` naming ``what`` after ``timeout`` seconds; ``details`` (e.g. a log tail) is called
    then and appended. Exceptions raised by the predicate propagate at once (a dead process, say).
    """
    deadline = time.monotonic() + timeout
    pause = min(0.005, interval)
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            message = f"timed out after {timeout:g} s waiting for {what}"
            if details is not None:
                message += "\n" + details()
            raise WaitTimeout(message)
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, interval)


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``, for error messages."""
    return "\n".join(text.splitlines()[-lines:])
