"""Fuzz target `differential`: the compiled kernels against their Python references, coverage-guided.

The unit tests already hold the generators of honest and hostile inputs (hypothesis strategies) and the
comparisons (every byte, index, count and fault); this target reuses them as they are, through hypothesis's
``fuzz_one_input``, so that atheris steers hypothesis's choices by the coverage of both implementations:

- ``dequeue``, ``enqueue``: rxtx.py / Datapath(compiled=False) against vq_dequeue / vq_enqueue
  (tests/unit/test_kernels_differential.py);
- ``prologue``: Kring.txsync_prologue / rxsync_prologue against nm_sync_prologue
  (tests/unit/test_kring_compiled.py);
- ``stash``: BufferStash against nm_stash_take / nm_stash_give (tests/unit/test_stash.py);
- ``switch``, ``table``: the switch's reference forwarder and MacTable against sw_forward and sw_table_*
  (tests/unit/test_switch_differential.py).

The first input byte picks one of them, the rest is hypothesis's choice sequence. A mismatch is the
test's AssertionError, which atheris reports as a crash with the input that produced it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

import test_kernels_differential as kd
import test_kring_compiled as kc
import test_stash as ks
import test_switch_differential as sd

# No example database: a failing input is kept by libFuzzer (and then in fuzz/regressions/).
FUZZ_SETTINGS = settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))


def _krings() -> Any:
    """The test module's kring pair fixture, outside pytest (a generator fixture: its first value)."""
    return next(kc.krings.__wrapped__())


_KRINGS: Any = None


@FUZZ_SETTINGS
@given(
    tx=st.booleans(),
    state=st.tuples(kc.index, kc.index, kc.index, kc.index, kc.index),
    user=st.tuples(kc.user_index, kc.user_index, kc.index),
    slots=kc.slot_arrays,
)
def prologue(tx: bool, state: tuple[int, ...], user: tuple[int, int, int], slots: list[Any]) -> None:
    """The prologue test with the fixture it needs, made once (the test resets both krings every time)."""
    global _KRINGS
    if _KRINGS is None:
        _KRINGS = _krings()
    kc.test_compiled_prologue_agrees_with_the_reference.hypothesis.inner_test(_KRINGS, tx, state, user, slots)


def _fuzz_entry(test: Any) -> Callable[[bytes], Any]:
    """The test's fuzz_one_input, under our settings (no database, no deadline)."""
    inner = test.hypothesis.inner_test
    strategies = test.hypothesis._given_kwargs
    return FUZZ_SETTINGS(given(**strategies)(inner)).hypothesis.fuzz_one_input  # type: ignore[no-any-return]


TARGETS: dict[str, Callable[[bytes], Any]] = {
    "dequeue": _fuzz_entry(kd.test_dequeue_matches_reference),
    "enqueue": _fuzz_entry(kd.test_enqueue_matches_reference),
    "prologue": prologue.hypothesis.fuzz_one_input,
    "stash": _fuzz_entry(ks.test_compiled_stash_moves_exactly_as_the_reference),
    "switch": _fuzz_entry(sd.test_compiled_switch_matches_the_reference),
    "table": _fuzz_entry(sd.test_the_compiled_table_matches_the_reference),
}
NAMES = sorted(TARGETS)


def one_input(data: bytes) -> None:
    """Run the comparison the first byte picks on the rest of the input."""
    if not data:
        return
    TARGETS[NAMES[data[0] % len(NAMES)]](data[1:])


def main(argv: list[str]) -> None:
    """Run under atheris with libFuzzer's arguments (scripts/fuzz passes them)."""
    logging.disable(logging.CRITICAL)  # the references log every reinitialised ring
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
