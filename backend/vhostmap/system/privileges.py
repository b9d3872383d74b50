"""Giving up root once the daemon's sockets, TAPs and raw sockets exist (``vhostmap serve --user``).

Creating a TAP needs CAP_NET_ADMIN, a generic port's AF_PACKET socket CAP_NET_RAW, giving a socket its owner
CAP_CHOWN, a metrics port below 1024 CAP_NET_BIND_SERVICE: all of it happens before the daemon serves, and
nothing after needs a privilege (the TAPs and sockets stay open; promiscuous mode ends with its socket; a
vhost-user client connects with file permissions only). So the daemon switches to an ordinary user with no
capability at all, rather than keeping some: changing from uid 0 to another uid clears the permitted and
effective sets when PR_SET_KEEPCAPS is off, as it is here. glibc changes every thread's credentials.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


class PrivilegeError(Exception):
    """The switch to the configured user failed or left privileges behind."""


@dataclass(frozen=True)
class Identity:
    """Who the daemon becomes: the user's name, uid, primary gid and every group it is in."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def lookup(spec: str) -> Identity:
    """``USER`` or ``USER:GROUP`` (names or numbers) -> the Identity; KeyError naming what does not exist.
    Without GROUP, the user's primary group; the supplementary groups are the user's (initgroups)."""
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise KeyError(f"no user {user!r}") from None
    try:
        gid = entry.pw_gid if not group else int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise KeyError(f"no group {group!r}") from None
    groups = tuple(sorted({gid, *os.getgrouplist(entry.pw_name, gid)}))
    return Identity(entry.pw_name, entry.pw_uid, gid, groups)


def effective_capabilities() -> int:
    """This process's effective capability set (CapEff in /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise PrivilegeError("/proc/self/status has no CapEff line")


def become(who: Identity) -> None:
    """Switch every thread to ``who`` for good (real, effective and saved ids, groups): PrivilegeError if
    that fails or if a capability or a way back to root is left."""
    try:
        os.setgroups(list(who.groups))
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot become {who}: {e.strerror}") from None
    if os.getresuid() != (who.uid,) * 3 or os.getresgid() != (who.gid,) * 3:
        raise PrivilegeError(f"still {os.getresuid()} / {os.getresgid()} after becoming {who}")
    if who.uid != 0 and effective_capabilities():
        raise PrivilegeError(f"capabilities {effective_capabilities():#x} left after becoming {who}")
