"""The one place the compiled-vs-reference choice is made: whether ports and switches run the compiled kernels
or their pure-Python references.

The reference is for tests and debugging: the differential tests compare the two, and the environment
variable lets a whole daemon or test run take the reference without passing a flag through every layer.
"""

from __future__ import annotations

import os

#: Set to anything but 0 (or empty) to run the pure-Python reference datapath everywhere.
REFERENCE_ENV = "VHOSTMAP_REFERENCE_DATAPATH"


def reference_selected(reference: bool | None = None) -> bool:
    """Whether to run the reference: ``reference`` when given, else whether the VHOSTMAP_REFERENCE_DATAPATH
    environment variable is set to anything but 0 (read at each call, so a test can set it per case)."""
    if reference is not None:
        return reference
    return os.environ.get(REFERENCE_ENV, "0").strip() not in ("", "0")
