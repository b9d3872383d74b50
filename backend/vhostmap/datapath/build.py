"""cffi build script for the datapath kernels (run by setup.py at install time).

The declarations are the .cdef files that kernels.h includes, in that order; the definitions are every .c file
beside this script.
"""

import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

cdefs = re.findall(r'#include "(\w+\.cdef)"', (HERE / "kernels.h").read_text())

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
    # PLT, as if another library could replace them: nothing does).
    extra_compile_args=[
        "-O3",
        "-std=gnu11",
        "-fno-semantic-interposition",
        "-Wall",
        "-Wextra",
        "-Werror=implicit-function-declaration",
    ],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
