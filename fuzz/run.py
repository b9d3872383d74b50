"""Build and run the fuzz targets (scripts/fuzz is the command line; tests/unit/test_fuzz.py the CI check).

C targets are libFuzzer harnesses (fuzz/kernels/) compiled with clang against the project's own kernel
sources, under AddressSanitizer and UndefinedBehaviorSanitizer; Python targets run under atheris. Each run
reads the seed corpus kept in the repository (fuzz/corpus/TARGET/, never written) and grows a working corpus
under the build directory; crashes are written to BUILD/artifacts/TARGET/. A crash worth keeping goes to
fuzz/regressions/TARGET/, which the test suite replays.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
DATAPATH = ROOT / "backend" / "vhostmap" / "datapath"
DEFAULT_BUILD = ROOT / "build" / "fuzz"
CLANG_FLAGS = [
    "-g",
    "-O1",
    "-std=gnu11",
    "-fsanitize=fuzzer,address,undefined",
    # Undefined behaviour is a crash, not a message libFuzzer would ignore.
    "-fno-sanitize-recover=undefined",
    "-Wall",
    "-Wno-unused-function",
]


@dataclass(frozen=True)
class Target:
    """A fuzz target: a libFuzzer harness (``harness`` in fuzz/kernels/, built with ``mode``) or a Python
    module under atheris (``module`` in fuzz/)."""

    name: str
    what: str
    harness: str | None = None
    mode: int = 0
    module: str | None = None

    @property
    def compiled(self) -> bool:
        return self.harness is not None


TARGETS = {
    t.name: t
    for t in (
        Target("protocol", "vhost-user parser and device state machine (atheris)", module="protocol_target"),
        Target(
            "differential",
            "compiled kernels vs the Python references (atheris)",
            module="differential_target",
        ),
        Target("walk", "descriptor walk, translation, dirty log (vq_walk)", harness="virtqueue.c", mode=0),
        Target("dequeue", "guest TX queue -> netmap slots (vq_dequeue)", harness="virtqueue.c", mode=1),
        Target("enqueue", "netmap slots -> guest RX queue, mergeable or not", harness="virtqueue.c", mode=2),
        Target("used", "used-ring publication and notification (vq_complete)", harness="virtqueue.c", mode=3),
        Target(
            "packed",
            "packed-ring pop, unpop and used publication under a driver rewriting it (vqp_*)",
            harness="packed_ring.c",
        ),
        Target(
            "packed_dequeue",
            "guest TX packed ring -> netmap slots, whole batches (vqp_dequeue)",
            harness="packed_ring.c",
            mode=1,
        ),
        Target(
            "packed_enqueue",
            "netmap slots -> guest RX packed ring, whole batches, mergeable or not (vqp_enqueue)",
            harness="packed_ring.c",
            mode=2,
        ),
        Target(
            "packed_onecopy",
            "guest to guest between packed rings, slots that refer (vqp_dequeue_refs, vqp_enqueue_refs)",
            harness="packed_ring.c",
            mode=3,
        ),
        Target("prologue", "kring sync prologue/finalize, swap, release", harness="kring.c", mode=0),
        Target("stash", "buffer stash take/give", harness="kring.c", mode=1),
        Target("sync", "a port's whole rxsync/txsync (vhu_rxsync/vhu_txsync)", harness="kring.c", mode=2),
        Target(
            "onecopy",
            "guest to guest through slots that refer (vq_dequeue_refs, vq_enqueue_refs, settle, publish)",
            harness="kring.c",
            mode=3,
        ),
        Target("switch", "learning switch forwarding (sw_forward)", harness="switch.c", mode=0),
        Target(
            "passthrough",
            "a passthrough port's syncs of a hostile guest's rings and CSB (pt_take, pt_give)",
            harness="passthrough.c",
        ),
        Target("tap", "capture taps staging and publishing frames (nm_tap_*)", harness="packets.c", mode=0),
        Target("offload", "offloads done in software (nm_offload_complete)", harness="packets.c", mode=1),
    )
}


def _fresh(output: Path, deps: list[Path]) -> bool:
    return output.exists() and all(d.stat().st_mtime <= output.stat().st_mtime for d in deps)


def _object(source: Path, build_dir: Path) -> Path:
    """``source`` (a kernel) compiled with the sanitizers, once for every harness that links it: the kernels
    are compiled the same whatever the target (FUZZ_MODE is the harnesses')."""
    obj = build_dir / "obj" / f"{source.stem}.o"
    headers = [*DATAPATH.glob("*.h"), *DATAPATH.glob("*.cdef")]
    if not _fresh(obj, [source, *headers]):
        obj.parent.mkdir(parents=True, exist_ok=True)
        partial = obj.with_suffix(f".{os.getpid()}.tmp")  # a concurrent build never links half an object
        subprocess.run(
            ["clang", *CLANG_FLAGS, f"-I{DATAPATH}", "-c", str(source), "-o", str(partial)], check=True
        )
        partial.replace(obj)
    return obj


def build(target: Target, build_dir: Path) -> Path:
    """The harness binary of ``target``, rebuilt when any of its sources is newer."""
    assert target.harness is not None
    harness = FUZZ / "kernels" / target.harness
    # Kernel sources the harness includes (to reach their static functions) are not linked again.
    included = set(re.findall(r'#include "(\w+\.c)"', harness.read_text()))
    objects = [_object(p, build_dir) for p in sorted(DATAPATH.glob("*.c")) if p.name not in included]
    deps = [harness, FUZZ / "kernels" / "harness.h", *DATAPATH.glob("*.[ch]"), *DATAPATH.glob("*.cdef")]
    binary = build_dir / "bin" / target.name
    if _fresh(binary, [*deps, *objects]):
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["clang", *CLANG_FLAGS, f"-DFUZZ_MODE={target.mode}", f"-I{DATAPATH}", str(harness)]
    subprocess.run([*cmd, *map(str, objects), "-lm", "-o", str(binary)], check=True)
    return binary


def command(target: Target, build_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command that runs ``target`` (libFuzzer's arguments go after it) and its environment."""
    env = dict(os.environ)
    if target.compiled:
        return [str(build(target, build_dir))], env
    # The worktree's sources first, whatever the venv has installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "backend"), str(FUZZ), env.get("PYTHONPATH", "")])
    return [sys.executable, str(FUZZ / f"{target.module}.py")], env


def run(target: Target, build_dir: Path, seconds: int | None, runs: int | None, extra: list[str]) -> int:
    """Fuzz ``target``; returns libFuzzer's exit status (0: no crash, leak or mismatch found)."""
    cmd, env = command(target, build_dir)
    work = build_dir / "corpus" / target.name
    artifacts = build_dir / "artifacts" / target.name
    work.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = FUZZ / "corpus" / target.name
    args = [str(work), *([str(seeds)] if seeds.is_dir() else [])]
    args += [f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-max_len=4096"]
    if seconds is not None:
        args.append(f"-max_total_time={seconds}")
    if runs is not None:
        args.append(f"-runs={runs}")
    return subprocess.run([*cmd, *args, *extra], env=env, cwd=build_dir).returncode


def replay(target: Target, build_dir: Path, inputs: list[Path]) -> int:
    """Run ``target`` once on each of ``inputs`` (no fuzzing): 0 when none crashes."""
    if not inputs:
        return 0
    cmd, env = command(target, build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*cmd, *map(str, inputs)], env=env, cwd=build_dir).returncode


def regressions(name: str) -> list[Path]:
    """The inputs kept in fuzz/regressions/NAME/ (each once a crash, now fixed)."""
    return sorted(p for p in (FUZZ / "regressions" / name).glob("*") if not p.name.startswith("."))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", help="a target of --list")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--seconds", type=int, help="stop after this many seconds")
    parser.add_argument("--runs", type=int, help="stop after this many inputs")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD, help="binaries, corpora, crashes")
    parser.add_argument("--replay", action="store_true", help="run fuzz/regressions/TARGET/* once each")
    parser.add_argument("libfuzzer", nargs="*", help="after --: more libFuzzer arguments (-jobs=2, ...)")
    args = parser.parse_args(argv)
    if args.list or not args.target:
        for t in TARGETS.values():
            print(f"{t.name:13} {t.what}")
        return 0 if args.list else 2
    target = TARGETS.get(args.target)
    if target is None:
        parser.error(f"no target {args.target!r} (see --list)")
    build_dir = args.build_dir.resolve()
    if args.replay:
        return replay(target, build_dir, regressions(target.name))
    return run(target, build_dir, args.seconds, args.runs, args.libfuzzer)


if __name__ == "__main__":
    sys.exit(main())
