"""cffi build script for the datapath kernels (run by setup.py at install time).

The declarations are the .cdef files that kernels.h includes, in that order; the definitions are every .c file
beside this script.
"""

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

cdefs = re.findall(r'#include "(\w+\.cdef)"', (HERE / "kernels.h").read_text())

# The instruction set: this machine's own by default, as DPDK builds (meson's cpu_instruction_set=native).
# Against the x86-64 baseline, P3 at 64 B went 1.1x faster through the switch and 1.2x with packed rings
# (A/B by core state; the link alike or better). VHOSTMAP_MARCH names another for a build that runs
# elsewhere: scripts/guest-image builds its wheel for x86-64, its guests being QEMU's (TCG: no AVX-512).
MARCH = os.environ.get("VHOSTMAP_MARCH", "native")

ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / name).read_text() for name in cdefs))
ffibuilder.set_source(
    "vhostmap.datapath._kernels",
    '#include "kernels.h"',
    sources=[str(p.relative_to(ROOT)) for p in sorted(HERE.glob("*.c"))],
    include_dirs=[str(HERE.relative_to(ROOT))],
    # The headers and declarations every source includes: a change to one alone rebuilds the module (without
    # them build_ext kept the old one, as its sources had not changed).
    depends=[str(p.relative_to(ROOT)) for p in sorted([*HERE.glob("*.h"), *HERE.glob("*.cdef")])],
    # -fno-semantic-interposition: calls within a source file are direct and may be inlined (not through the
    # PLT, as if another library could replace them: nothing does). -ffp-contract=off: floating point rounded
    # as written, as the Python references compute it (a fused multiply-add would round once).
    extra_compile_args=[
        "-O3",
        f"-march={MARCH}",
        "-ffp-contract=off",
        "-std=gnu11",
        "-fno-semantic-interposition",
        "-Wall",
        "-Wextra",
        "-Werror=implicit-function-declaration",
    ],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
