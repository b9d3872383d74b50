"""What the lab's wrappers of a child process (a QEMU guest, a testpmd, a vhostmap daemon) share: the
process once started, whether it runs, its pid, and stopping it for sure."""

from __future__ import annotations

import subprocess
from typing import Any


class ChildProcess:
    """A wrapper of one child process, kept in ``_proc`` once started."""

    _proc: subprocess.Popen[Any] | None = None

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, once started."""
        return self._proc.pid if self._proc is not None else None


def end_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; reap it; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
