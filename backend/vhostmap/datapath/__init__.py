"""Compiled per-batch kernels of the datapath.

The C sources live beside this file and are compiled by ``pip install`` through cffi (API mode, so every
call releases the GIL). Each kernel has a pure-Python reference next to its caller; differential tests drive
both with the same input.
"""

from vhostmap.datapath._kernels import ffi, lib

__all__ = ["ffi", "lib"]
