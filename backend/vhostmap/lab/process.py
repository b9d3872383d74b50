"""What the lab's wrappers of a child process (a QEMU guest, a testpmd, a vhostmap daemon) share: the
process once started, whether it runs, its pid, stopping it for sure, and being a context manager that
cleans up after a failed start as after a finished run."""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, Self


class ChildProcess(ABC):
    """A wrapper of one child process, kept in ``_proc`` once started, and a context manager.

    Entering starts the process (``_enter``: the wrapper's own start method); leaving ``close``s it. A start
    that fails is closed too, so that neither a half-started process nor the files made for it outlive the
    failure (the caller never gets the object to close).
    """

    _proc: subprocess.Popen[Any] | None = None

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, once started."""
        return self._proc.pid if self._proc is not None else None

    def kill(self) -> None:
        """Stop the process at once (SIGTERM, then SIGKILL if it has not exited within a few seconds) and
        reap it."""
        if self._proc is not None:
            end_process(self._proc)

    @abstractmethod
    def _enter(self) -> Self:
        """Start the process, as entering the context does."""

    @abstractmethod
    def close(self) -> None:
        """Stop the process and remove what was made for it, as leaving the context does."""

    def __enter__(self) -> Self:
        try:
            return self._enter()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


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
