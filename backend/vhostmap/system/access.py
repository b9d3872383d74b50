"""Who may connect to a UNIX socket: libvirt's QEMU identity (qemu.conf) against a socket's path.

The daemon warns at start about sockets QEMU run by libvirt could not reach; ``vhostmap vm`` warns too. Only
permission bits, owners and groups are judged (search on every directory above, write on the socket).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Mapping
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# What libvirt runs QEMU as when qemu.conf does not say.
DEFAULT_QEMU_USER = "libvirt-qemu"
DEFAULT_QEMU_GROUP = "libvirt-qemu"


def libvirt_qemu_identity(conf: Path = QEMU_CONF) -> tuple[str, str] | None:
    """The ``(user, group)`` libvirt runs QEMU as, from qemu.conf; None when there is no qemu.conf."""
    try:
        text = conf.read_text()
    except OSError:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r'\s*(user|group)\s*=\s*"([^"]*)"', line)
        if match:
            values[match.group(1)] = match.group(2)
    return values.get("user", DEFAULT_QEMU_USER), values.get("group", DEFAULT_QEMU_GROUP)


def resolve_identity(user: str, group: str) -> tuple[int, frozenset[int]]:
    """A qemu.conf user and group (names, or numbers written ``+N``) -> uid and every gid QEMU would have.

    Raises KeyError for a name that does not exist.
    """
    if user.startswith("+"):
        uid = int(user[1:])
        try:
            name: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = None
    else:
        entry = pwd.getpwnam(user)
        uid, name = entry.pw_uid, entry.pw_name
    gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    # libvirt gives QEMU the user's supplementary groups too.
    gids = {gid, *(os.getgrouplist(name, gid) if name is not None else ())}
    return uid, frozenset(gids)


def _permits(st: os.stat_result, uid: int, gids: frozenset[int], bit: int) -> bool:
    """Whether ``uid`` with ``gids`` has permission ``bit`` (4 read, 2 write, 1 search) on ``st``."""
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _describe(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{owner}:{group} mode {st.st_mode & 0o7777:04o}"


def socket_access_problem(path: str, uid: int, gids: frozenset[int]) -> str | None:
    """Why a process with ``uid`` and ``gids`` could not connect to the UNIX socket at ``path``, or None.

    Connecting needs search permission on every directory above the socket and write permission on it.
    """
    if uid == 0:
        return None
    target = Path(os.path.abspath(path))
    for directory in reversed(target.parents):
        st = os.stat(directory)
        if not _permits(st, uid, gids, 1):
            return f"directory {directory} ({_describe(st)}) does not let it through"
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None  # not there yet: nothing to judge
    if not _permits(st, uid, gids, 2):
        return f"the socket is {_describe(st)}, without the write permission connecting needs"
    return None


def removal_problem(path: str, uid: int, gids: frozenset[int]) -> str | None:
    """Why a process with ``uid`` and ``gids`` could not remove the file at ``path`` (what a daemon that gave
    up root must still do with its sockets when it stops), or None: it needs write and search permission on
    the directory."""
    if uid == 0:
        return None
    directory = Path(os.path.abspath(path)).parent
    st = os.stat(directory)
    if not (_permits(st, uid, gids, 2) and _permits(st, uid, gids, 1)):
        return f"directory {directory} is {_describe(st)}"
    return None


def libvirt_access_problems(sockets: Mapping[str, str], conf: Path = QEMU_CONF) -> list[str]:
    """For port name -> socket path vhostmap listens on: why QEMU run by libvirt could not connect.

    Empty when it can, or when there is no libvirt QEMU configuration (no libvirt) to judge by.
    """
    identity = libvirt_qemu_identity(conf)
    if identity is None or not sockets:
        return []
    user, group = identity
    try:
        uid, gids = resolve_identity(user, group)
    except (KeyError, ValueError):
        return [f"libvirt runs QEMU as {user}:{group} ({conf}), which does not exist on this machine"]
    problems = []
    for port, path in sockets.items():
        why = socket_access_problem(path, uid, gids)
        if why is not None:
            problems.append(
                f"port {port}: libvirt runs QEMU as {user}:{group} ({conf}), which cannot connect to {path}: "
                f"{why}; give the socket a group QEMU is in (--socket-group GROUP --socket-mode 0660, or "
                f'group=,perm= on the port) or run QEMU as root (user = "root" in {conf})'
            )
    return problems
