"""What scripts/bench reports each back-end was compiled for (vhostmap.lab.bench.builds): the kernels'
instruction set and DPDK's RTE_MACHINE, a condition of every ratio it prints."""

from __future__ import annotations

import os
from pathlib import Path

from vhostmap.lab.bench import Settings, builds, report
from vhostmap.lab.testpmd import BUILD_CONFIGS, build_machine

ISAS = ("avx512f", "avx2", "sse4.2", "baseline")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_the_report_names_the_instruction_set_the_kernels_were_built_for() -> None:
    got = report(Settings(), [], interrupted=False)["machine"]["builds"]
    assert got == builds()
    assert got["vhostmap"] in ISAS
    if "VHOSTMAP_MARCH" not in os.environ:  # built for this machine (-march=native): its widest set
        flags = cpu_flags()
        widest = next((isa for isa in ISAS[:-1] if isa.replace(".", "_") in flags), "baseline")
        assert got["vhostmap"] == widest


def test_dpdks_machine_is_read_from_its_build_configuration(tmp_path: Path) -> None:
    config = tmp_path / "rte_build_config.h"
    config.write_text("#define RTE_ARCH_X86 1\n#define RTE_MACHINE corei7\n#define RTE_MAX_LCORE 128\n")
    assert build_machine([str(config)]) == "corei7"
    config.write_text('#define RTE_MACHINE "native"\n')
    assert build_machine([str(config)]) == "native"
    assert build_machine([str(tmp_path / "missing.h")]) is None


def test_the_installed_dpdk_names_its_machine() -> None:
    assert build_machine(), f"no RTE_MACHINE at {BUILD_CONFIGS}: scripts/setup installs DPDK's headers"
