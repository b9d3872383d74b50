"""The one place the compiled-versus-reference datapath choice is made.

Every kernel has a pure-Python reference twin (ARCHITECTURE.md); setting VHOSTMAP_REFERENCE_DATAPATH to
anything but 0 makes the daemon run the references everywhere (vhost-user syncs, switches), which the tests
use to hold the two to each other.
"""

from __future__ import annotations

import os

REFERENCE_ENV = "VHOSTMAP_REFERENCE_DATAPATH"


def reference_selected(reference: bool | None = None) -> bool:
    """``reference`` if given, else whether VHOSTMAP_REFERENCE_DATAPATH is set to anything but 0."""
    if reference is None:
        return os.environ.get(REFERENCE_ENV, "0").strip() not in ("", "0")
    return reference
