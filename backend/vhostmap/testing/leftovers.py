"""Finding and removing what killed test sessions left behind: the kit's records and its sweep.

A lab writes a record (JSON, in `STATE_DIR`, one directory for the whole machine, so that every session
sees every other's records) naming what it is about to make, *before* making it: its
directory, network namespaces, interfaces and the daemons it started (pid and control socket). A lab that
closes removes what it made and then its record. A session killed outright (SIGKILL, a CI timeout) leaves
the record with an owner pid that no longer runs; `sweep`, called at every session start, removes what such
records name, and also any namespace, interface or /tmp directory with the kit's prefix that no live record
claims (lost between the removal of a thing and of its record, or a record damaged), and DPDK hugepage files
``vhk<pid>t...`` whose pid is gone.

QEMU and the daemons die with the thread that started them (PR_SET_PDEATHSIG), but not always: the kernel
clears that signal when a process changes its credentials, as ``vhostmap serve --user`` does once its
sockets exist, and such a daemon outlives a killed session, its sockets and TAPs with it. So the sweep also
kills every ``vhostmap serve`` whose control socket is in a kit directory no live record claims (its
session is gone, or it was started before its lab could record its pid), besides those dead records name
(after checking that the pid still runs that daemon: its command line names the recorded control socket),
and waits for them to be gone before it removes their directories and interfaces. A daemon of a session that
still runs is never touched: its lab's record claims its directory from before the directory exists until
after it is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vhostmap.lab.netns import NETNS_DIR, link_exists, netns_exists
from vhostmap.lab.testpmd import DPDK_RUNTIME, HUGEPAGES, remove_orphaned
from vhostmap.lab.wait import WaitTimeout, wait_until
from vhostmap.testing.names import KIT_PREFIX

# Labs' directories (short paths: UNIX sockets go in them) and the records of every session on the machine.
LAB_ROOT = Path("/tmp")
STATE_DIR = LAB_ROOT / "vhostmap-testing"
_HUGEPAGE = re.compile(rf"{KIT_PREFIX}(\d+)t\d+x\d+")
PROC = Path("/proc")
# How long a killed daemon may take to exit (and close its TAPs) before the sweep goes on without it.
DAEMON_EXIT_TIMEOUT = 10.0


def state_dir() -> Path:
    """Where records are kept (`STATE_DIR`)."""
    return STATE_DIR


#: The environment variable naming the fd of the sweep lock a session's parent holds for it
#: (`HeldSweeps.session_env`): that session sweeps under the parent's lock instead of skipping its sweep.
INHERITED_LOCK_ENV = "VHOSTMAP_TESTING_SWEEP_LOCK"


def _lock_path() -> Path:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "sweep.lock"


def _inherited_lock() -> bool:
    """Whether this process holds the sweep lock through an fd its parent passed it (`INHERITED_LOCK_ENV`):
    that fd is open here and is the lock file (a process the variable reached without the fd, as a
    session's xdist worker, does not)."""
    value = os.environ.get(INHERITED_LOCK_ENV, "")
    if not value.isdigit():
        return False
    try:
        st, lock = os.fstat(int(value)), _lock_path().stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (lock.st_dev, lock.st_ino)


@contextlib.contextmanager
def _sweep_lock(wait: bool) -> Iterator[int | None]:
    """The machine's one sweep lock (a file lock in the state directory), held for the block: the fd that
    holds it, or None if another holder has it and ``wait`` is false."""
    fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # releases the lock (a child that was passed the fd holds it until it closes it too)


@dataclass(frozen=True)
class HeldSweeps:
    """The sweep lock, held (`sweeps_held`): calling it sweeps under the lock; a child session started with
    ``pass_fds=(held.fd,)`` and `session_env` sweeps under it too, the one other sweep that runs meanwhile."""

    fd: int

    def __call__(self) -> list[str]:
        return _sweep()

    def session_env(self) -> dict[str, str]:
        """What a child session's environment needs to sweep under the lock (`INHERITED_LOCK_ENV`)."""
        return {INHERITED_LOCK_ENV: str(self.fd)}


@contextlib.contextmanager
def sweeps_held() -> Iterator[HeldSweeps]:
    """No other sweep on the machine runs while the block does (their `sweep` skips, a later one sweeps):
    for a test that looks at what a killed session left before the sweep of its choosing removes it, its own
    (calling what this yields) or a session's it starts (`HeldSweeps.session_env`)."""
    with _sweep_lock(wait=True) as fd:
        assert fd is not None
        yield HeldSweeps(fd)


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (the start time in clock ticks), or None if ``pid`` does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


@dataclass
class Record:
    """What one lab made, or is about to make, and which process owns it."""

    lab: str
    owner: int = field(default_factory=os.getpid)
    owner_start: str | None = field(default_factory=lambda: _start_time(os.getpid()))
    dirs: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    # [pid, control socket path] of each daemon started
    daemons: list[tuple[int, str]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The record's file."""
        return state_dir() / f"{self.owner}-{self.lab}.json"

    def save(self) -> None:
        """Write the record (atomically: a sweep never reads half of one)."""
        directory = state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{self.path.name}.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.path)

    def remove(self) -> None:
        """Delete the record's file (what it names is gone)."""
        self.path.unlink(missing_ok=True)

    @property
    def owner_alive(self) -> bool:
        """Whether the process that made the record still runs (the same process: pids are reused)."""
        return _start_time(self.owner) == self.owner_start

    @classmethod
    def load(cls, path: Path) -> Record | None:
        """The record in ``path``, or None if it is not one (a stray or damaged file)."""
        try:
            data = json.loads(path.read_text())
            data["daemons"] = [(int(pid), str(ctl)) for pid, ctl in data.get("daemons", [])]
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


def _kit_namespaces() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(KIT_PREFIX))


def _kit_links() -> list[str]:
    result = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False)
    names = []
    for line in result.stdout.splitlines():
        # "12: vhk1a2bv3@vhk1a2bv4: <...>" (the peer after "@")
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name.startswith(KIT_PREFIX):
            names.append(name)
    return sorted(names)


def _kit_dirs() -> list[Path]:
    return sorted(p for p in LAB_ROOT.glob(f"{KIT_PREFIX}-*") if p.is_dir())


def _kit_daemons() -> dict[int, str]:
    """pid -> control socket of each ``vhostmap serve`` whose control socket is in a kit directory."""
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if b"serve" not in argv or b"--control" not in argv[:-1]:
            continue
        control = Path(os.fsdecode(argv[argv.index(b"--control") + 1]))
        if control.parent.parent == LAB_ROOT and control.parent.name.startswith(f"{KIT_PREFIX}-"):
            found[int(entry.name)] = str(control)
    return found


def _runs(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: its files, TAPs among them, are closed)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _kill_daemon(pid: int, control: str) -> bool:
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if os.fsencode(control) not in cmdline:
        return False  # the pid runs something else now
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def _delete_namespace(name: str) -> bool:
    return subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False).returncode == 0


def _delete_link(name: str) -> bool:
    """Delete an interface (a veth's peer goes with it); whether it was there to delete."""
    result = subprocess.run(["ip", "link", "delete", "dev", name], capture_output=True, check=False)
    return result.returncode == 0


def sweep() -> list[str]:
    """Remove the leftovers of kit sessions that no longer run; return what was removed (for the report).

    Safe beside running sessions: what a live record names is never touched. The kit's namespaces,
    interfaces, directories and daemons are listed *before* the records are read: a lab saves its record
    before it makes anything, so whatever was listed and is still unclaimed once the records are read is a
    leftover, and whatever a lab makes meanwhile was not listed.
    """
    if _inherited_lock():
        return _sweep()
    with _sweep_lock(wait=False) as fd:
        # Skipped while another sweep runs (two xdist workers starting) or a test holds sweeps off: a later
        # session's sweep finds whatever is still left.
        return _sweep() if fd is not None else []


def _sweep() -> list[str]:
    namespaces, links, dirs, daemons = _kit_namespaces(), _kit_links(), _kit_dirs(), _kit_daemons()
    removed: list[str] = []
    claimed_dirs: set[str] = set()
    claimed_names: set[str] = set()
    dead: list[tuple[Path, Record]] = []
    directory = state_dir()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        record = Record.load(path)
        if record is None:
            continue
        if record.owner_alive:
            claimed_dirs.update(record.dirs)
            claimed_names.update(record.namespaces + record.links)
        else:
            dead.append((path, record))
    # Daemons first, and gone before the rest: a TAP goes with the daemon that holds it.
    doomed = {pid: control for _, record in dead for pid, control in record.daemons}
    doomed.update({pid: c for pid, c in daemons.items() if str(Path(c).parent) not in claimed_dirs})
    killed = [pid for pid, control in doomed.items() if _kill_daemon(pid, control)]
    removed += [f"vhostmap daemon pid {pid}" for pid in killed]
    with contextlib.suppress(WaitTimeout):  # one that hangs in the kernel is reported, not waited for
        wait_until(lambda: not any(_runs(p) for p in killed), DAEMON_EXIT_TIMEOUT, "killed daemons to exit")
    for path, record in dead:
        for ns in record.namespaces:
            if (NETNS_DIR / ns).exists() and _delete_namespace(ns):
                removed.append(f"namespace {ns}")
        for link in record.links:
            if link_exists(link) and _delete_link(link):
                removed.append(f"interface {link}")
        for d in record.dirs:
            if Path(d).exists():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"directory {d}")
        path.unlink(missing_ok=True)
    # What no live record claims (made before a record could be written, or by an older kit).
    for ns in namespaces:
        if ns not in claimed_names and netns_exists(ns) and _delete_namespace(ns):
            removed.append(f"namespace {ns}")
    for link in links:
        if link not in claimed_names and link_exists(link) and _delete_link(link):
            removed.append(f"interface {link}")
    for orphan in dirs:
        if str(orphan) not in claimed_dirs and orphan.exists():
            shutil.rmtree(orphan, ignore_errors=True)
            removed.append(f"directory {orphan}")
    dpdk = [*HUGEPAGES.glob(f"{KIT_PREFIX}*"), *DPDK_RUNTIME.glob(f"{KIT_PREFIX}*")]
    removed += [f"hugepage file {path}" for path in remove_orphaned(dpdk, _HUGEPAGE)]
    return removed
