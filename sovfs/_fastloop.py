"""A cheaper wait for the next FUSE request: the trio facade handed to pyfuse3's session loop.

pyfuse3 reads requests in a loop it owns (``_session_loop`` in its Cython core).  Before each read it
takes a ``trio.Lock`` and calls ``trio.lowlevel.wait_readable`` on ``/dev/fuse``.  Both always
yield to trio's scheduler, and ``wait_readable`` also re-arms the fd in epoll, so every request pays
two scheduler passes and an ``epoll_ctl`` even when the next request is already waiting — the usual
case under load.  (``bench/fuse_floor.py``'s trivial filesystem with four concurrent 4 KiB readers:
23.4k IOPS and 42 µs of daemon CPU per request with pyfuse3's wait, 48.7k and 20 µs with this one,
72-75k and 13 µs since its lock is lent back - see :class:`_NoYieldLock`.)

pyfuse3 looks ``trio`` up as a module global at call time so that its asyncio mode can swap in
another implementation.  :func:`fast_session_loop` uses that seam to hand it a facade that is trio
in every respect but two:

* ``Lock``: taking a free lock does not yield, and a task that releases it with others waiting
  keeps it if it comes back without yielding (:class:`_NoYieldLock`).  (pyfuse3 creates exactly
  one, to let one task at a time wait for the fd; a contended ``acquire`` still parks on a trio
  ``ParkingLot``.)
* ``lowlevel.wait_readable``: when ``poll(2)`` says a request is already queued it returns at once,
  yielding to the scheduler only every ``yield_every`` requests — so tasks waiting for ledger
  completions, the write-back timer and signal handling still run at least that often while a
  stream of requests keeps the fd readable.  When nothing is queued and no other task is
  runnable, it polls the fd for up to ``spin_us`` (50 µs) before sleeping: a serial client's next
  request usually comes within that, and catching it saves the epoll sleep and wake-up (stat of
  10,000 files in a tree: 7.9-9.2k -> 15.6-16.2k per second; create +20 %, and less daemon CPU).
  Then it is trio's own ``wait_readable``: idle waits, cancellation and ``notify_closing`` at
  unmount are unchanged.

Nothing else changes: requests are still read and answered by pyfuse3's loop, on trio, one task per
request in flight.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import trio

__all__ = ["fast_session_loop"]


class _NoYieldLock:
    """The lock pyfuse3 takes to let one task at a time wait for ``/dev/fuse``, made cheaper twice.

    * Taking a free lock does not yield (``trio.Lock`` always does).
    * Releasing it while other tasks wait does not hand it over at once; it is *lent back* to the
      releasing task.  That task has just taken a request off the fd and goes on to serve it; if the
      handler never waits (a stat, a create, a read served on the daemon's thread) it comes straight
      back for the next request and simply keeps the lock, the waiter stays parked, and the request
      costs no task switch (a scheduler pass, an ``epoll_wait`` and a park fewer per request; warm
      random 4 KiB O_DIRECT reads through the mount, alternated with the hand-over-at-once lock:
      daemon CPU per read 93-94 -> 87-88 µs with one reader, 138 -> 106-107 µs with four, whose
      IOPS rose 12.8k -> 16.1-16.8k; creates in a tree +6 %).  If the
      task yields first (its handler waits for the device), the lock is handed to the longest
      waiter when that step ends (:class:`_HandOver`, a trio instrument), so that another task reads
      the next request meanwhile: the concurrency of pyfuse3's worker tasks is kept.

    A contended ``acquire`` parks on a trio ``ParkingLot``; waiters get the lock in arrival order,
    and a task that takes a lent lock (a free lock, as far as it can tell) does so without yielding.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()
        self._lent_to: trio.lowlevel.Task | None = None  # released with waiters, not yet handed over
        self._watched: trio.lowlevel.TrioToken | None = None  # the run whose steps _HandOver watches
        self._lend = True  # False once a _HandOver hook failed: hand over at release, as trio.Lock

    async def __aenter__(self) -> None:
        if self._held:
            await self._waiters.park()  # ownership is handed to us (__aexit__ or _step_ended)
        else:
            self._held = True
            self._lent_to = None

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._waiters:
            self._held = False
        elif self._lend:
            self._held = False
            token = trio.lowlevel.current_trio_token()
            if self._watched is not token:
                trio.lowlevel.add_instrument(_HandOver(self))
                self._watched = token
            self._lent_to = trio.lowlevel.current_task()
        else:
            self._waiters.unpark(count=1)  # hand over now: the lock stays held for the waiter

    def _step_ended(self, task: trio.lowlevel.Task) -> None:
        """The end of a task's step: if the lock was lent to it, it yielded (or finished) before
        taking the lock back, so a waiter gets it now."""
        if task is self._lent_to:
            self._lent_to = None
            if not self._held and self._waiters:
                self._held = True  # the lock stays held: ownership passes to the unparked waiter
                if not self._waiters.unpark(count=1):
                    self._held = False  # nobody was left to wake after all

    def _hook_failed(self) -> None:
        """trio drops an instrument whose hook raised, and nothing would hand a lent lock over any
        more: stop lending (release hands over at once, as ``trio.Lock``), and hand over the lock
        if it is lent and free right now."""
        self._lend = False
        self._lent_to = None
        if not self._held and self._waiters:
            self._held = True
            if not self._waiters.unpark(count=1):
                self._held = False


class _HandOver(trio.abc.Instrument):
    """Hands a lent :class:`_NoYieldLock` to its next waiter once the borrowing task yields."""

    def __init__(self, lock: _NoYieldLock) -> None:
        self._lock = lock

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        try:
            self._lock._step_ended(task)
        except BaseException:
            self._lock._hook_failed()  # trio logs this and removes the instrument
            raise


class _Lowlevel:
    """``trio.lowlevel`` with a ``wait_readable`` that does not wait for what is already there."""

    def __init__(self, yield_every: int, spin_us: int = 0) -> None:
        self._yield_every = yield_every
        self._spin_ns = spin_us * 1000
        self._streak = 0
        self._polls: dict[int, select.poll] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        if poller.poll(0) or self._spin(poller):
            # Returns without yielding, but never more than yield_every times in a row: timers,
            # signals and I/O completions are only noticed when the scheduler runs.
            self._streak += 1
            if self._streak >= self._yield_every:
                self._streak = 0
                await trio.lowlevel.checkpoint()
            return
        self._streak = 0
        await trio.lowlevel.wait_readable(fd)

    def _spin(self, poller: select.poll) -> bool:
        """With nothing else runnable, poll a little before sleeping in epoll: a serial client
        (stat, create, unlink in a loop) sends its next request within tens of µs."""
        if not self._spin_ns or trio.lowlevel.current_statistics().tasks_runnable:
            return False
        deadline = time.monotonic_ns() + self._spin_ns
        while time.monotonic_ns() < deadline:
            if poller.poll(0):
                return True
        return False

    def queued(self) -> bool:
        """Is a request already waiting on the fd(s) pyfuse3 reads?  (False before the first wait.)"""
        return any(p.poll(0) for p in self._polls.values())


class _TrioFacade:
    def __init__(self, yield_every: int, spin_us: int) -> None:
        self.lowlevel = _Lowlevel(yield_every, spin_us)
        self.Lock = _NoYieldLock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


@contextlib.contextmanager
def fast_session_loop(yield_every: int = 8, spin_us: int = 50) -> Iterator[Callable[[], bool]]:
    """Within the block, pyfuse3's session loop waits for requests through the facade above.

    Enter it before ``pyfuse3.main`` starts (pyfuse3 creates its read lock on first use).  Yields
    a function that says whether a FUSE request is queued right now (a hint for the ledger's
    polling: spinning for a completion delays those requests).
    """
    import pyfuse3

    if yield_every < 1:
        raise ValueError("yield_every must be at least 1")
    if spin_us < 0:
        raise ValueError("spin_us must not be negative")
    # pyfuse3.trio is the module global its own asyncio mode swaps; the stubs do not declare it
    saved = pyfuse3.trio  # type: ignore[attr-defined]
    facade = _TrioFacade(yield_every, spin_us)
    pyfuse3.trio = facade  # type: ignore[attr-defined]
    try:
        yield facade.lowlevel.queued
    finally:
        pyfuse3.trio = saved  # type: ignore[attr-defined]
