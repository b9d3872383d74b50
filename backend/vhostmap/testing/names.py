"""What makes one lab's resources its own: names, directories, MAC and IP ranges, hugepage prefixes.

Every lab of a test session draws from ranges derived from the pytest-xdist worker (``PYTEST_XDIST_WORKER``,
``gw0`` when there is none) and a per-process lab counter, so that labs built side by side by two workers, or
one after another by one worker, never share a socket, a namespace, a subnet or a MAC address. Everything
that lives in a host-wide name space (network namespaces, interfaces, directories under /tmp, hugepage
files) also carries ``KIT_PREFIX`` and a random per-process token, which is how a later session tells the
kit's leftovers (`vhostmap.testing.leftovers`) from anything else on the machine, and how two test sessions
running at once stay apart.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from dataclasses import dataclass, field
from ipaddress import IPv4Network

# Every host-wide name the kit makes starts with this: namespaces, interfaces, /tmp/vhk-* directories,
# hugepage files (vhk<pid>t<n>...).
KIT_PREFIX = "vhk"
# One /24 per lab: 10.<SUBNET_BASE + worker>.<lab>.0/24.
SUBNET_BASE = 100
_WORKER = re.compile(r"gw(\d+)$")
# Per process: the labs made so far, and the interface/namespace names handed out.
_labs = itertools.count()
_names = itertools.count()
# Random per process: two test sessions on one machine (say, two CI jobs) never make the same name.
_TOKEN = secrets.token_hex(2)


def worker_id() -> str:
    """The pytest-xdist worker this process is (``gw0``, ``gw1``, ...), or ``gw0`` without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0")


def worker_index(worker: str | None = None) -> int:
    """The number of ``worker`` (default: this process's), 0 for a name that is not ``gwN``."""
    match = _WORKER.match(worker or worker_id())
    return int(match.group(1)) if match else 0


@dataclass
class LabNames:
    """The names, addresses and prefixes of one lab.

    ``worker`` and ``index`` (the lab's number in this process) pick its ranges: its subnet is
    ``10.(100 + worker).(index % 250 + 1).0/24`` and its MACs ``52:54:WW:II:II:HH``. `ip` and `mac` hand out
    the next host address and MAC of those ranges; `ifname` a fresh namespace or interface name (at most 15
    bytes); `hugepage_prefix` a DPDK ``--file-prefix`` whose files a later session can tell are stale.
    """

    worker: int
    index: int
    token: str = _TOKEN
    _hosts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _macs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _prefixes: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def next(cls) -> LabNames:
        """The names of this process's next lab."""
        return cls(worker=worker_index(), index=next(_labs))

    @property
    def label(self) -> str:
        """Short and unique in this session: ``w<worker>l<index>`` (used in directory names and reports)."""
        return f"w{self.worker}l{self.index}"

    @property
    def dir_prefix(self) -> str:
        """The prefix of the lab's directory under /tmp (short: UNIX socket paths go in it)."""
        return f"{KIT_PREFIX}-{self.token}{self.label}-"

    @property
    def subnet(self) -> IPv4Network:
        """The lab's IPv4 /24."""
        return IPv4Network(f"10.{SUBNET_BASE + self.worker % 150}.{self.index % 250 + 1}.0/24")

    def ip(self) -> str:
        """The next host address of the lab's subnet, with its prefix length ("10.100.1.1/24")."""
        host = next(self._hosts)
        if host > 254:
            raise ValueError(f"lab {self.label} has used all 254 addresses of {self.subnet}")
        return f"{self.subnet[host]}/{self.subnet.prefixlen}"

    def mac(self) -> str:
        """The next MAC address of the lab's range (locally administered, unicast)."""
        host = next(self._macs)
        if host > 255:
            raise ValueError(f"lab {self.label} has used all 255 MAC addresses of its range")
        lab = self.index & 0xFFFF
        return f"52:54:{self.worker % 256:02x}:{lab >> 8:02x}:{lab & 0xFF:02x}:{host:02x}"

    def ifname(self, kind: str) -> str:
        """A fresh name for a namespace or interface; ``kind`` is one letter ("n" namespace, "v" veth, "t"
        TAP). ``vhk`` + token + kind + counter: at most 15 bytes, unique on the machine."""
        if len(kind) != 1:
            raise ValueError(f"kind {kind!r} must be one letter")
        return f"{KIT_PREFIX}{self.token}{kind}{next(_names):x}"

    def hugepage_prefix(self) -> str:
        """A fresh DPDK ``--file-prefix``: ``vhk<pid>t<lab>x<n>`` (the pid tells a later sweep whether the
        files' owner is gone)."""
        return f"{KIT_PREFIX}{os.getpid()}t{self.index}x{next(self._prefixes)}"
