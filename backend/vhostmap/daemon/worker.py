"""The datapath worker: a thread that runs forwarders when their kicks fire, or all the time when polling.

Forwarders (a link, a sink, the switch) say which fds should wake them and do one bounded round of work per
call. The worker holds the datapath lock while a forwarder runs; the control plane takes the same lock
before it changes a device, so a ring never changes under a running batch.

Two ways to run:

* interrupt mode (the default): when nothing is pending the worker blocks in epoll on the kick eventfds
  (and TAP or packet-socket fds), so an idle daemon uses no CPU, and every burst of traffic pays a wake-up;
* poll mode (``poll=True``, ``vhostmap serve --poll``): the worker never blocks. Like a DPDK PMD lcore it runs
  every forwarder, one round each, pass after pass, and looks at a flag only for the control plane's
  refreshes. Kicks are not watched at all, and TAPs and packet sockets are read by their
  forwarders on every pass: whatever arrived is found by the next pass. It burns its core whether or not
  there is traffic, so pin it (``cpu=``) to a core of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from vhostmap.datapath import eventfds, lib
from vhostmap.system.cpu import check_cpu, pin_current_thread

log = logging.getLogger(__name__)

# Rounds of a forwarder in a row before the worker looks at other fds again, so that one busy link cannot
# starve the others.
MAX_ROUNDS_PER_WAKEUP = 64


class Forwarder(Protocol):
    """Something the worker runs: moves packets between the rings of its ports."""

    name: str

    def wake_fds(self) -> Sequence[int]:
        """Fds whose readability means there may be work; called under the datapath lock.

        Eventfds (kicks) are drained by the worker; any other fd (a TAP, a packet socket) must be read by the
        forwarder, as the worker only waits for it to become readable.
        """

    def run(self) -> bool:
        """One bounded round of work under the datapath lock; True when something moved."""


@runtime_checkable
class Splittable(Forwarder, Protocol):
    """A forwarder that several datapath threads share, each running the part that serves its receive
    queues (links, switches and sinks; the others run whole on one thread)."""

    def part(self, owns: Callable[[Any, int], bool]) -> Forwarder:
        """The part serving the receive queues (port, RX ring index) ``owns`` accepts."""


class Worker:
    """One datapath thread serving a set of forwarders.

    ``poll`` makes the thread busy-poll its forwarders instead of sleeping on kicks (see the module's
    docstring); ``cpu`` pins the thread to that CPU (ValueError at once for a CPU that does not exist,
    OSError from `start` if the kernel refuses it).
    """

    def __init__(
        self,
        lock: threading.RLock | None = None,
        name: str = "vhostmap-datapath",
        *,
        poll: bool = False,
        cpu: int | None = None,
    ) -> None:
        if cpu is not None:
            check_cpu(cpu, "datapath CPU")
        self.poll = poll
        self.cpu = cpu
        self.lock = lock or threading.RLock()
        self._forwarders: list[Forwarder] = []
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._registered: dict[int, list[Forwarder]] = {}
        self._eventfds: set[int] = set()
        # Fds epoll refused (already logged), and those refused by the rebuild under way.
        self._refused: set[int] = set()
        self._refused_now: set[int] = set()
        self._dirty = True
        self._again: set[Forwarder] = set()
        # What a polling worker runs, pass after pass: the forwarders as of the last refresh.
        self._polled: list[Forwarder] = []
        self._stop = False
        # (Nanoseconds this thread had nothing to do so far, when the sleep under way began or 0): one tuple,
        # replaced whole, so that idle_ns() reads a consistent pair from another thread.
        self._idle = (0, 0)
        # When the thread started serving (time.perf_counter_ns), 0 before: busy = since then - idle.
        self.running_since_ns = 0
        # Forwarder rounds that moved frames: with the frames counted elsewhere, how much one round carries
        # (a few frames a round means the per-round cost, Python's included, is paid per few frames).
        self.rounds = 0
        # Kicks read from each eventfd this thread drains, by fd (entries go with their fd at a rebuild): the
        # guests' notifications, which the metrics count per queue.
        self.kicks: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    def start(self) -> None:
        """Start the thread; once this returns it runs on its CPU. Raises what pinning it raised."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    @property
    def native_id(self) -> int | None:
        """The thread's kernel thread id (``/proc/self/task/ID``) once started."""
        return self._thread.native_id

    def idle_ns(self) -> int:
        """Nanoseconds the thread had nothing to do so far (asleep in epoll, the sleep under way included,
        or polling passes that moved nothing): against the wall clock (time.perf_counter_ns), how busy it
        is. A polling thread is on its CPU all the time; this says how much of it was work."""
        idle, since = self._idle
        return idle + (time.perf_counter_ns() - since if since else 0)

    def stop(self) -> None:
        """Stop the thread and release its fds (idempotent)."""
        if self._stop:
            return
        self._stop = True
        self.refresh()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._epoll.close()
        # After this, refresh() is a no-op: ports closing after the worker (daemon shutdown) still report
        # queue changes, and writing to a closed fd number could hit a file someone else opened since.
        wake, self._wake = self._wake, -1
        os.close(wake)

    def add(self, forwarder: Forwarder) -> None:
        """Serve ``forwarder`` from now on."""
        with self.lock:
            self._forwarders.append(forwarder)
        self.refresh()

    def remove(self, forwarder: Forwarder) -> None:
        """Stop serving ``forwarder``."""
        with self.lock:
            self._forwarders.remove(forwarder)
        self.refresh()

    def refresh(self) -> None:
        """Queues changed (started, stopped, new kick fds): rebuild the wake-up set, and run everyone once."""
        self._dirty = True
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    # --- the thread -------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        wanted: dict[int, list[Forwarder]] = {}
        # A polling worker runs everyone on every pass, so it needs no fd to tell it there is work, and
        # draining kicks would cost a system call each (a front-end's kick counter just grows: 2**64 kicks
        # fill it). Its epoll set holds the refresh eventfd alone.
        for fwd in () if self.poll else self._forwarders:
            for fd in fwd.wake_fds():
                wanted.setdefault(fd, []).append(fwd)
        # A fresh epoll set every time. Closing an fd does not take it out of an epoll set while another
        # copy of the same file is open, and the front-end always keeps its end of a kick eventfd: after the
        # control plane closed a kick fd, unregister() fails with EBADF and the entry stays, firing for a
        # number that no longer means it (a busy loop while the guest kicks), and when the front-end sends
        # the same eventfd again under the same number, register() fails with EEXIST.
        epoll = select.epoll()
        try:
            epoll.register(self._wake, select.EPOLLIN)
            for fd in list(wanted):
                try:
                    epoll.register(fd, select.EPOLLIN)
                except OSError as e:
                    # epoll refuses regular files, memfds, /dev/null (EPERM), closed fds (EBADF): that fd
                    # cannot wake anyone, but the thread and every other fd go on. Its forwarders still run
                    # when their other fds fire; the port that handed it over is the one that stays quiet.
                    self._refuse(fd, wanted.pop(fd), e)
        except BaseException:
            epoll.close()
            raise
        old, self._epoll = self._epoll, epoll
        old.close()
        self._registered = wanted
        self._refused, self._refused_now = self._refused_now, set()
        # Kicks are eventfds, drained here; a TAP or a packet socket is drained by its forwarder reading it.
        self._eventfds = {fd for fd in wanted if _is_eventfd(fd)}
        self.kicks = {fd: n for fd, n in self.kicks.items() if fd in self._eventfds}
        self._polled = list(self._forwarders)

    def _refuse(self, fd: int, forwarders: list[Forwarder], error: OSError) -> None:
        """``fd`` cannot be watched: say so once (as long as it stays refused), naming who wanted it."""
        self._refused_now.add(fd)
        if fd in self._refused:
            return
        self._refused.add(fd)
        names = ", ".join(f.name for f in forwarders)
        log.error("%s: fd %d cannot be watched (%s): ignored, it wakes nobody", names, fd, error)

    def _run(self) -> None:
        try:
            if self.cpu is not None:
                pin_current_thread(self.cpu, "datapath thread")
        except BaseException as e:
            self._start_error = e
            return
        finally:
            self._started.set()
        # Calls are signalled many times a wake-up: keep the write guard armed until the thread sleeps.
        lib.vhu_eventfd_guard_hold(1)
        self.running_since_ns = time.perf_counter_ns()
        if self.poll:
            self._run_polling()
        else:
            self._run_interrupts()

    def _run_polling(self) -> None:
        """Never block: every forwarder gets one round per pass, and epoll is only peeked at."""
        last = time.perf_counter_ns()
        while not self._stop:
            # refresh() sets _dirty before it writes the eventfd: looking at the flag is enough, and costs no
            # system call per pass. (The control thread gets the GIL whenever a compiled kernel runs.)
            if self._dirty:
                _drain(self._wake)
                with self.lock:
                    self._dirty = False
                    self._rebuild()
            moved = False
            for fwd in self._polled:
                with self.lock:
                    if self._stop:
                        return
                    if fwd in self._forwarders:
                        moved = self._run_once(fwd) or moved
            now = time.perf_counter_ns()
            if not moved:
                # The whole pass since the last one ended, the loop's own steps included, was a look for work:
                # idle. (Counting from the pass's start left the steps between passes as work, and on a
                # starved CPU a thread preempted there read as busy while it had nothing to do.)
                self._idle = (self._idle[0] + now - last, 0)
            last = now

    def _run_interrupts(self) -> None:
        """Sleep in epoll until a kick (or a TAP, or a refresh) says there is work."""
        while not self._stop:
            ready, self._again = self._again, set()
            if self._dirty:
                with self.lock:
                    self._dirty = False
                    self._rebuild()
                    ready.update(self._forwarders)
            else:
                if not ready:
                    # About to sleep: no signal of the guard must wake it (a system call, only if it runs).
                    lib.vhu_eventfd_guard_disarm()
                self._idle = (self._idle[0], time.perf_counter_ns())
                try:
                    # Forwarders that were still busy run again right away, after a look at the fds.
                    events = self._epoll.poll(0 if ready else -1)
                except InterruptedError:
                    continue
                finally:
                    idle, since = self._idle
                    self._idle = (idle + time.perf_counter_ns() - since, 0)
                for fd, _ in events:
                    if fd == self._wake:
                        _drain(fd)
                        continue
                    if fd in self._eventfds:
                        self.kicks[fd] = self.kicks.get(fd, 0) + _drain(fd)
                    ready.update(self._registered.get(fd, ()))
            for fwd in ready:
                self._run_forwarder(fwd)

    def _run_forwarder(self, fwd: Forwarder) -> None:
        for _ in range(MAX_ROUNDS_PER_WAKEUP):
            with self.lock:
                if self._stop or fwd not in self._forwarders:
                    return
                moved = self._run_once(fwd)
            if not moved:
                return
        # Still busy: come back after the others had their turn.
        self._again.add(fwd)

    def _run_once(self, fwd: Forwarder) -> bool:
        """One round of ``fwd``, under the lock (held by the caller); whether it moved anything."""
        try:
            moved = fwd.run()
        except Exception:
            # A forwarder bug must not kill the datapath of every other port.
            log.exception("forwarder %s failed; removed from the datapath", fwd.name)
            self._forwarders.remove(fwd)
            self._dirty = True
            return False
        if moved:
            self.rounds += 1
        return moved


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == eventfds.EVENTFD_LINK
    except OSError:
        return False


def _drain(fd: int) -> int:
    # Never a plain read(): a front-end (or application) shares the kick and may have made it blocking and
    # emptied it between epoll's answer and this read, which would then sleep with every port waiting.
    return eventfds.drain(fd)


# --- several datapath threads -------------------------------------------------------------------------------

# A receive queue: (port name, RX ring index; the port's host RX ring is index num_rx_rings).
RxQueue = tuple[str, int]


class DatapathLock:
    """The control plane's lock on the whole datapath: every thread's lock, taken in the threads' order.

    A datapath thread holds only its own lock (while one of its forwarders runs), so the control plane, which
    takes them all in one fixed order, cannot deadlock with it; once it holds them all, no thread uses any
    ring. Reentrant, like each thread's lock.
    """

    def __init__(self, locks: Sequence[threading.RLock]) -> None:
        self._locks = list(locks)

    def acquire(self) -> None:
        """Take every thread's lock, first to last."""
        for k, lock in enumerate(self._locks):
            try:
                lock.acquire()
            except BaseException:
                for held in reversed(self._locks[:k]):
                    held.release()
                raise

    def release(self) -> None:
        """Release them, last to first."""
        for lock in reversed(self._locks):
            lock.release()

    def __enter__(self) -> DatapathLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Assignment:
    """Which datapath thread serves each receive queue: pinned in the configuration (``pinned``: port name ->
    {RX ring index: CPU}, like OVS's pmd-rxq-affinity), else round-robin over the threads in the order the
    queues are first asked about (the daemon asks for its configured ports in order at start). ``cpus``: the
    CPU of each thread (None: not pinned). Never changes a queue's thread once given.

    With ``isolate`` (OVS's pmd-rxq-isolate, true there by default too) the round-robin skips the threads that
    serve pinned queues, unless every thread does (then it uses them all, and says so once).
    """

    def __init__(
        self, cpus: Sequence[int | None], pinned: Mapping[str, Mapping[int, int]], isolate: bool = True
    ) -> None:
        self.cpus = list(cpus)
        self._owner: dict[RxQueue, int] = {}
        self.pinned: set[RxQueue] = set()
        for port, queues in pinned.items():
            for queue, cpu in queues.items():
                if cpu not in self.cpus:
                    listed = ", ".join(str(c) for c in self.cpus if c is not None) or "none"
                    raise ValueError(
                        f"port {port!r}: rxq_affinity pins queue {queue} to CPU {cpu}, which runs no "
                        f"datapath thread (datapath CPUs, --cpu: {listed})"
                    )
                self._owner[(port, queue)] = self.cpus.index(cpu)
                self.pinned.add((port, queue))
        self.isolated = {self._owner[q] for q in self.pinned} if isolate else set()
        self._round_robin = [k for k in range(len(self.cpus)) if k not in self.isolated]
        if not self._round_robin:
            log.warning(
                "every datapath thread serves pinned receive queues: the others go round-robin over all of "
                "them (add a CPU to --cpu to keep pinned queues alone, or give --no-rxq-isolate)"
            )
            self._round_robin = list(range(len(self.cpus)))
        self._next = 0
        self._lock = threading.Lock()  # datapath threads ask too (a new switch port's queues)

    def owner(self, port: str, ring: int) -> int:
        """The thread (index) serving RX ring ``ring`` of ``port``, given now if it had none."""
        key = (port, ring)
        k = self._owner.get(key)
        if k is None:
            with self._lock:
                k = self._owner.get(key)
                if k is None:
                    k = self._owner[key] = self._round_robin[self._next % len(self._round_robin)]
                    self._next += 1
        return k

    def show(self, queues: Sequence[RxQueue]) -> list[dict[str, Any]]:
        """Each thread with its CPU and the ``queues`` it serves (``ovs-appctl dpif-netdev/pmd-rxq-show``)."""
        threads: list[dict[str, Any]] = [
            {"thread": k, "cpu": cpu, "isolated": k in self.isolated, "rx_queues": []}
            for k, cpu in enumerate(self.cpus)
        ]
        for port, ring in queues:
            entry = {"port": port, "queue": ring, "pinned": (port, ring) in self.pinned}
            threads[self.owner(port, ring)]["rx_queues"].append(entry)
        return threads


class Datapath:
    """The datapath threads: one Worker per CPU of ``cpus`` (None or empty: one thread, not pinned, as
    before), each serving the receive queues ``assignment`` gives it.

    A forwarder with a ``part(owns)`` method (a link, a switch, a sink) is split: every thread runs a part
    that serves the receive queues it owns (and their lanes, sources, TX flushes); a TX ring fed by several
    threads is reserved, filled and synced under its lock (datapath/locks.cdef). Any other forwarder (a
    generator, a TAP bridge, application sessions: the only users of their port's rings) runs whole on the
    thread of its first receive queue (``rx_queues()``). With one thread nothing is split.

    ``lock`` is the control plane's (DatapathLock): held, no thread is in a forwarder.
    """

    def __init__(
        self,
        cpus: Sequence[int] | None = None,
        *,
        poll: bool = False,
        pinned: Mapping[str, Mapping[int, int]] | None = None,
        isolate: bool = True,
    ) -> None:
        slots: list[int | None] = list(cpus) if cpus else [None]
        self.assignment = Assignment(slots, pinned or {}, isolate)
        self.poll = poll
        self.workers = [
            Worker(
                threading.RLock(),
                "vhostmap-datapath" if len(slots) == 1 else f"vhostmap-datapath{k}",
                poll=poll,
                cpu=cpu,
            )
            for k, cpu in enumerate(slots)
        ]
        self.lock = DatapathLock([w.lock for w in self.workers])
        self._placed: dict[Forwarder, list[tuple[Worker, Forwarder]]] = {}

    @property
    def native_id(self) -> int | None:
        """The first thread's kernel thread id once started."""
        return self.workers[0].native_id

    def start(self) -> None:
        """Start every thread (pinned to its CPU); what pinning one raised, after stopping the others."""
        try:
            for w in self.workers:
                w.start()
        except BaseException:
            self.stop()
            raise

    def loads(self) -> list[dict[str, int]]:
        """Per thread, in order: the nanoseconds it had nothing to do (``idle_ns``) and had work
        (``busy_ns``) since it started, and its runs that moved frames (``rounds``), as status and the
        metrics report them."""
        loads = []
        for w in self.workers:
            idle, now = w.idle_ns(), time.perf_counter_ns()
            busy = max(0, now - w.running_since_ns - idle) if w.running_since_ns else 0
            loads.append({"idle_ns": idle, "busy_ns": busy, "rounds": w.rounds})
        return loads

    def kicks(self) -> dict[int, int]:
        """Kicks read so far from each eventfd the threads drain (each fd is drained by one thread)."""
        merged: dict[int, int] = {}
        for w in self.workers:
            merged.update(w.kicks)  # a copy under the GIL: the thread replaces or grows its dict meanwhile
        return merged

    def stop(self) -> None:
        """Stop every thread (idempotent)."""
        for w in self.workers:
            w.stop()

    def refresh(self) -> None:
        """Queues changed: every thread rebuilds its wake-up set and runs its forwarders once."""
        for w in self.workers:
            w.refresh()

    def add(self, forwarder: Forwarder) -> None:
        """Serve ``forwarder`` from now on, split between the threads or whole on one."""
        with self.lock:
            placed = self._placed[forwarder] = self._place(forwarder)
            for w, f in placed:
                w.add(f)

    def remove(self, forwarder: Forwarder) -> None:
        """Stop serving ``forwarder``; ValueError if it is not served."""
        with self.lock:
            placed = self._placed.pop(forwarder, None)
            if placed is None:
                raise ValueError(f"{forwarder.name} is not served")
            for w, f in placed:
                with contextlib.suppress(ValueError):  # that part failed and was dropped already
                    w.remove(f)

    def _owns(self, k: int) -> Callable[[Any, int], bool]:
        assignment = self.assignment
        return lambda port, ring: assignment.owner(port.name, ring) == k

    def _place(self, forwarder: Forwarder) -> list[tuple[Worker, Forwarder]]:
        if len(self.workers) == 1:
            return [(self.workers[0], forwarder)]
        if isinstance(forwarder, Splittable):
            return [(w, forwarder.part(self._owns(k))) for k, w in enumerate(self.workers)]
        queues: list[tuple[Any, int]] = getattr(forwarder, "rx_queues", list)()
        k = self.assignment.owner(queues[0][0].name, queues[0][1]) if queues else 0
        return [(self.workers[k], forwarder)]
