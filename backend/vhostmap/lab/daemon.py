"""``vhostmap serve`` as a lab process: started with ports and links, waited for, asked for stats, stopped.

Tests, the demo and the benchmarks run the daemon exactly as a user would, as its own process, so a crash
in it is seen as a crash and restarting it is a real restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from vhostmap.control.client import ControlError, call
from vhostmap.lab.process import ChildProcess, end_process
from vhostmap.lab.wait import tail, wait_until


class VhostmapDaemon(ChildProcess):
    """One ``vhostmap serve`` process, as a context manager.

    ``ports`` are ``--port`` values and ``links`` ``--link`` values; the control socket and the log live in
    ``workdir``. Server-mode sockets are waited for before ``start`` returns (the daemon starts its vhost-user
    endpoints before its control socket answers a first request). `restart` kills it as a crash would and
    starts a new process with the same command line: same ports, sockets and control socket.

    ``netns`` runs the daemon inside that network namespace (``ip netns exec``, which execs it: the pid is the
    daemon's): its generic ports and TAPs are that namespace's interfaces. Its UNIX sockets are paths in the
    file system, which every namespace shares, so QEMU and the control client reach them from anywhere.
    """

    def __init__(
        self,
        workdir: str | Path,
        ports: Sequence[str],
        links: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        name: str = "vhostmap",
        env: Mapping[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.netns = netns
        self.env = dict(env or {})  # added to this process's environment (e.g. PYTHONPATH: another checkout)
        self.ports = list(ports)
        self.links = list(links)
        self.extra_args = list(extra_args)
        self.control = str(self.workdir / f"{name}-ctl.sock")
        self.log_path = self.workdir / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # time.monotonic() when the running process was first seen ready (its control socket answered).
        self.ready_at: float | None = None

    def command_line(self) -> list[str]:
        """The argv that starts the daemon (through ``ip netns exec`` when it has a ``netns``)."""
        args = [sys.executable, "-m", "vhostmap.cli", "serve", "--verbose", "--control", self.control]
        for p in self.ports:
            args += ["--port", p]
        for link in self.links:
            args += ["--link", link]
        args += self.extra_args
        return ["ip", "netns", "exec", self.netns, *args] if self.netns else args

    def start(self, timeout: float = 30.0) -> Self:
        """Start the process and wait until its control socket answers."""
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps writing to it)
        self._proc = subprocess.Popen(
            self.command_line(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        log.close()
        wait_until(
            self._answers, timeout, "vhostmap to answer on its control socket", details=self.diagnostics
        )
        self.ready_at = time.monotonic()
        return self

    def restart(self, timeout: float = 30.0) -> float:
        """SIGKILL the daemon (`kill`) and start a new process with the same configuration and socket paths
        (`start`); return ``ready_at`` of the new one, the moment it answered on its control socket.

        The front-ends notice on their own: a QEMU with ``reconnect=N`` retries every N seconds, a listening
        front-end (QEMU ``server=on``, testpmd ``server=1``) gets connected to again at once.
        """
        self.kill()
        self.start(timeout)
        assert self.ready_at is not None
        return self.ready_at

    def _enter(self) -> Self:
        return self.start()

    def _answers(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"vhostmap exited with {self._proc.returncode}\n{self.diagnostics()}")
        try:
            call(self.control, "status", timeout=2)
        except (ControlError, OSError):
            return False
        return True

    def stats(self) -> dict[str, Any]:
        """Per-port counters (``vhostmap stats --json``)."""
        return dict(call(self.control, "stats")["ports"])

    def status(self) -> dict[str, Any]:
        """Ports, connection state and memory (``vhostmap status``)."""
        return call(self.control, "status")

    def switches(self) -> dict[str, Any]:
        """Every switch with its ports, counters and learnt addresses (``vhostmap switch list --json``)."""
        return dict(call(self.control, "switch", op="list")["switches"])

    def learnt_port(self, switch: str, mac: str) -> str | None:
        """The port of ``switch`` on which ``mac`` ("52:54:00:00:00:0a") was learnt, or None."""
        for entry in self.switches()[switch]["addresses"]:
            if entry["mac"] == mac.lower():
                return str(entry["port"])
        return None

    def wait_connected(self, port: str, timeout: float = 30.0) -> None:
        """Wait until a front-end is connected to ``port``."""
        wait_until(
            lambda: self.status()["ports"][port]["connected"],
            timeout,
            f"a front-end on port {port}",
            details=self.diagnostics,
        )

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait (SIGKILL if it hangs); returns the exit status."""
        proc, self._proc = self._proc, None
        return 0 if proc is None else end_process(proc, timeout)

    def close(self) -> None:
        """Stop the daemon (`stop`), as leaving the context does."""
        self.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash would end it (other lab processes are asked to end first)."""
        proc, self._proc = self._proc, None
        self.ready_at = None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def diagnostics(self, lines: int = 40) -> str:
        """The tail of the daemon's log."""
        try:
            return "vhostmap log:\n" + tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return "(no vhostmap log)"
