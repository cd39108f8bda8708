"""The trio facade for pyfuse3's session loop: same behaviour as trio's lock and wait, fewer yields."""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterator

import pyfuse3
import pytest
import trio
import trio.testing

from sovfs._fastloop import _Lowlevel, _NoYieldLock, fast_session_loop


class _Count:
    n = 0

    def reset(self) -> None:
        """Start counting here (pytest-trio's own start-up checkpoints are not the facade's)."""
        self.n = 0


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe (read end, write end) standing in for /dev/fuse."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


@pytest.fixture
def yields(monkeypatch: pytest.MonkeyPatch) -> _Count:
    """Counts the facade's explicit yields (``trio.lowlevel.checkpoint`` calls)."""
    count = _Count()
    checkpoint = trio.lowlevel.checkpoint

    async def counted() -> None:
        count.n += 1
        await checkpoint()

    monkeypatch.setattr(trio.lowlevel, "checkpoint", counted)
    return count


async def _ran_meanwhile(body: object) -> bool:
    """Run ``await body()`` while a freshly scheduled task waits to set a flag; did the flag get set?"""
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await body()  # type: ignore[operator]
        seen = ran
    return seen


async def test_free_lock_is_taken_without_yielding() -> None:
    lock = _NoYieldLock()

    async def take() -> None:
        async with lock:
            pass

    assert not await _ran_meanwhile(take)  # (trio.Lock yields here: the point of the facade)


async def test_lock_excludes_and_hands_over_in_order() -> None:
    lock = _NoYieldLock()
    inside = 0
    order: list[int] = []

    async def worker(i: int) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1
            order.append(i)
            await trio.sleep(0.001)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(worker, i)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]


async def test_cancelled_waiter_does_not_keep_the_lock() -> None:
    lock = _NoYieldLock()
    got: list[str] = []
    inner = trio.CancelScope()

    async def waiter(tag: str) -> None:
        async with lock:
            got.append(tag)

    async def cancellable() -> None:
        with inner:
            await waiter("cancelled")

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()  # held by this task
        nursery.start_soon(cancellable)
        await trio.testing.wait_all_tasks_blocked()
        inner.cancel()  # the parked waiter leaves the queue
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "second")
        await trio.testing.wait_all_tasks_blocked()
        await lock.__aexit__(None, None, None)  # handed to the second waiter, not the cancelled one
    assert got == ["second"]
    async with lock:  # and free again afterwards
        pass


async def test_a_release_with_waiters_is_lent_back_to_a_task_that_returns_without_yielding() -> None:
    """pyfuse3's reader releases the lock, serves the request and comes back for the next one: if it
    never yielded meanwhile, it keeps the lock and the parked waiter is not switched to."""
    lock = _NoYieldLock()
    got: list[str] = []

    async def waiter() -> None:
        async with lock:
            got.append("waiter")

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()  # parked on the lock
        for _ in range(3):  # release and take back, no yield in between
            await lock.__aexit__(None, None, None)
            await lock.__aenter__()
        assert got == []  # never handed over: the waiter did not run
        await lock.__aexit__(None, None, None)
        await trio.testing.wait_all_tasks_blocked()  # this task yields: the waiter gets the lock
        assert got == ["waiter"]
    async with lock:
        pass


async def test_a_lent_lock_goes_to_the_waiter_as_soon_as_the_borrower_yields() -> None:
    """If the releasing task's handler waits (yields) before it comes back, the next waiter reads
    meanwhile: concurrency between pyfuse3's worker tasks is kept.  The borrower then queues."""
    lock = _NoYieldLock()
    order: list[str] = []

    async def waiter() -> None:
        async with lock:
            order.append("waiter in")
            await trio.sleep(0.01)
            order.append("waiter out")

    async def borrower_done() -> None:
        await lock.__aexit__(None, None, None)  # lent, then this task ends: handed over too

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        await lock.__aexit__(None, None, None)
        # The borrower yields (a handler waiting for the device): when that step ends the lock is
        # the waiter's, which runs (and sleeps, holding it) while the borrower is away.
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["waiter in"]
        async with lock:  # the borrower waits its turn
            order.append("borrower")
    assert order == ["waiter in", "waiter out", "borrower"]

    order.clear()
    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(borrower_done)  # takes nothing, releases this task's hold: lent to it
        # (a lock held by one task and released by another is not pyfuse3's use, but the lent
        # lock must still reach the waiter when the borrowing task finishes)
    assert order == ["waiter in", "waiter out"]


class _LockInvariant(trio.abc.Instrument):
    """Checked before every task step: nobody is parked on a free lock, and no lock stays lent."""

    def __init__(self, lock: _NoYieldLock) -> None:
        self.lock = lock
        self.bad: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.lock._waiters and not self.lock._held:
            self.bad.append(f"free with {len(self.lock._waiters)} parked before {task.name}")
        if self.lock._lent_to is not None:
            self.bad.append(f"still lent to {self.lock._lent_to.name} before {task.name}")


@pytest.mark.parametrize("seed", range(12))
async def test_lending_keeps_exclusion_and_liveness_under_random_schedules(seed: int) -> None:
    """Six tasks take the lock in a loop; each randomly yields inside and after it (a handler that
    waits or not), is cancelled while parked, or raises inside it.  At most one holder at a time,
    every task finishes, and between any two steps no waiter is parked on a free or lent lock."""
    rng = random.Random(seed)
    lock = _NoYieldLock()
    invariant = _LockInvariant(lock)
    trio.lowlevel.add_instrument(invariant)
    inside = max_inside = done = 0

    async def maybe_yield() -> None:
        if rng.random() < 0.35:
            await trio.lowlevel.checkpoint()

    async def worker() -> None:
        nonlocal inside, max_inside, done
        for _ in range(rng.randrange(5, 40)):
            with contextlib.suppress(KeyError), trio.CancelScope() as scope:
                if rng.random() < 0.1:
                    scope.cancel()  # cancelled while (maybe) parked
                async with lock:
                    inside += 1
                    max_inside = max(max_inside, inside)
                    try:
                        await maybe_yield()
                        if rng.random() < 0.1:
                            raise KeyError("in the body")
                    finally:
                        inside -= 1
            await maybe_yield()
        done += 1

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(worker)
    trio.lowlevel.remove_instrument(invariant)
    assert (max_inside, done, invariant.bad) == (1, 6, [])
    assert not lock._held and not lock._waiters


async def test_a_failing_hand_over_hook_falls_back_to_handing_over_at_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """trio removes an instrument whose hook raised.  Nothing would then hand a lent lock over: the
    lock stops lending, hands over the one lent at that moment, and later releases hand over at
    once (trio.Lock's behaviour), so no waiter is left parked on a free lock."""
    lock = _NoYieldLock()
    got: list[str] = []
    real = lock._step_ended
    calls = 0

    def flaky(task: trio.lowlevel.Task) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("hook failure (test)")
        real(task)

    monkeypatch.setattr(lock, "_step_ended", flaky)

    async def waiter(tag: str) -> None:
        async with lock:
            got.append(tag)
            await trio.lowlevel.checkpoint()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            nursery.start_soon(waiter, "a")
            await trio.testing.wait_all_tasks_blocked()
            await lock.__aexit__(None, None, None)  # lent; the hook raises when this step ends
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["a"]
            await lock.__aenter__()
            nursery.start_soon(waiter, "b")
            await trio.testing.wait_all_tasks_blocked()
            await lock.__aexit__(None, None, None)  # no lending any more: handed over at once
            assert lock._held and lock._lent_to is None
    assert got == ["a", "b"]


async def test_wait_readable_returns_at_once_when_data_is_queued_and_yields_every_n(
    pipe: tuple[int, int], yields: _Count
) -> None:
    r, w = pipe
    yields.reset()
    os.write(w, b"x")
    low = _Lowlevel(yield_every=3)
    assert not await _ran_meanwhile(lambda: low.wait_readable(r))  # no yield at all
    seen = []
    for _ in range(5):
        await low.wait_readable(r)
        seen.append(yields.n)
    assert seen == [0, 1, 1, 1, 2]


async def test_wait_readable_waits_for_data_when_none_is_queued(pipe: tuple[int, int]) -> None:
    r, w = pipe
    low = _Lowlevel(yield_every=8)
    woke = trio.Event()

    async def reader() -> None:
        await low.wait_readable(r)
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        os.write(w, b"x")
        with trio.fail_after(5):
            await woke.wait()


async def test_notify_closing_still_wakes_an_idle_wait(pipe: tuple[int, int]) -> None:
    r, _w = pipe
    low = _Lowlevel(yield_every=8)
    raised: list[BaseException] = []

    async def reader() -> None:
        try:
            await low.wait_readable(r)
        except trio.ClosedResourceError as e:
            raised.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.notify_closing(r)
    assert len(raised) == 1


def test_facade_is_installed_only_inside_the_block() -> None:
    before = pyfuse3.trio  # type: ignore[attr-defined]
    with fast_session_loop(yield_every=4):
        facade = pyfuse3.trio  # type: ignore[attr-defined]
        assert facade is not before
        assert facade.Lock is _NoYieldLock
        assert facade.open_nursery is trio.open_nursery  # everything else is trio
        assert facade.lowlevel.current_task is trio.lowlevel.current_task
    assert pyfuse3.trio is before  # type: ignore[attr-defined]
    with pytest.raises(ValueError), fast_session_loop(yield_every=0):
        pass
    with pytest.raises(ValueError), fast_session_loop(spin_us=-1):
        pass


async def test_queued_says_whether_a_request_waits_on_the_fds_it_has_waited_on(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    low = _Lowlevel(yield_every=8)
    assert not low.queued()  # no fd seen yet
    os.write(w, b"x")
    await low.wait_readable(r)
    assert low.queued()
    os.read(r, 1)
    assert not low.queued()


async def test_an_idle_wait_spins_for_a_request_that_comes_soon(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    """With nothing else runnable, the wait polls the fd for up to ``spin_us`` before sleeping in
    epoll: data written by another thread 5 ms later is seen by the spin (trio's wait is never
    called).  With the spin off, or another task runnable, it sleeps in trio's wait at once."""
    sleeps = 0
    real_wait = trio.lowlevel.wait_readable

    async def counted_wait(fd: int) -> None:
        nonlocal sleeps
        sleeps += 1
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted_wait)
    r, w = pipe

    def write_soon() -> None:
        threading.Timer(0.005, os.write, (w, b"x")).start()

    write_soon()
    with trio.fail_after(5):
        await _Lowlevel(yield_every=8, spin_us=2_000_000).wait_readable(r)
    assert sleeps == 0  # caught by the spin
    os.read(r, 1)
    write_soon()
    with trio.fail_after(5):
        await _Lowlevel(yield_every=8, spin_us=0).wait_readable(r)
    assert sleeps == 1  # no spin: trio's wait
    os.read(r, 1)
    write_soon()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)  # a runnable task: spinning would hold it up
        with trio.fail_after(5):
            await _Lowlevel(yield_every=8, spin_us=2_000_000).wait_readable(r)
    assert sleeps == 2


async def test_requests_caught_by_the_spin_still_yield_every_n(
    pipe: tuple[int, int], yields: _Count
) -> None:
    """A serial client whose every request is caught by the spin must not starve the scheduler
    (write-back timer, SIGTERM): those returns count toward ``yield_every`` like queued ones."""
    r, w = pipe
    yields.reset()
    low = _Lowlevel(yield_every=4, spin_us=2_000_000)
    for _ in range(8):
        threading.Timer(0.002, os.write, (w, b"x")).start()
        with trio.fail_after(5):
            await low.wait_readable(r)
        os.read(r, 1)
    assert yields.n == 2
