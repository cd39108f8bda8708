"""The bitmap allocator's search hint (the known-used interval) never changes what a search finds.

``BitmapAllocator.find_run`` remembers the items an earlier search walked over as used and starts
the next search with a goal inside them at their end.  Each search below is made twice - once with
the hint cleared (the plain search from the goal) and once with it - over random allocations, frees
inside and outside the interval, commits (pending frees become reusable) and aborted operations.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovfs.alloc import BitmapAllocator
from sovfs.errors import NoSpace
from sovfs.fs import FileSystem
from tests.sovfs.conftest import fresh


class _Abort(Exception):
    pass


def _search_both(a: BitmapAllocator, goal: int, want: int) -> tuple[int, int] | None:
    """The hinted search, after checking it against the plain one; None when nothing is free."""
    saved = (a._known_lo, a._known_hi)
    a._known_lo = a._known_hi = 0
    try:
        plain: tuple[int, int] | None = a.find_run(goal, want)
    except NoSpace:
        plain = None
    a._known_lo, a._known_hi = saved
    try:
        hinted: tuple[int, int] | None = a.find_run(goal, want)
    except NoSpace:
        hinted = None
    assert hinted == plain, f"goal {goal} want {want} hint {saved}"
    return hinted


def _allocate_then_fail(fs: FileSystem, a: BitmapAllocator, goal: int) -> None:
    with fs.journal.op() as tx:
        for _ in range(3):
            found = _search_both(a, goal, 1)
            if found is not None:
                a.mark_used(tx, *found)
        raise _Abort


_op = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 2000), st.sampled_from([1, 1, 1, 2, 8])),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.just(1)),
    st.tuples(st.just("commit"), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 2000), st.just(1)),
)


@pytest.mark.parametrize("which", ["block", "inode"])
@settings(max_examples=30, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=60))
def test_hinted_search_finds_what_the_plain_search_finds(which: str, ops: list[tuple[str, int, int]]) -> None:
    # 4 MiB: 1,024 blocks and 1,024 inodes - searches cross used stretches and the end
    _dev, fs = fresh(4 << 20)
    try:
        # blocks: journaled frees stay pending until the commit; inodes: frees are immediate
        a = fs.balloc if which == "block" else fs.ialloc
        assert a.defer_frees == (which == "block")
        held: list[int] = []
        goal0 = fs.sb.data_start if which == "block" else 0
        for kind, x, want in ops:
            if kind == "alloc":
                found = _search_both(a, goal0 + x, want)
                if found is not None:
                    with fs.journal.op() as tx:
                        a.mark_used(tx, *found)
                    held.extend(range(found[0], found[0] + found[1]))
            elif kind == "free" and held:
                item = held.pop(x % len(held))
                with fs.journal.op() as tx:
                    a.release(tx, item)
            elif kind == "commit":
                fs.journal.commit()
            elif kind == "abort":
                # an operation that allocates three items and then fails: they come back free
                with pytest.raises(_Abort):
                    _allocate_then_fail(fs, a, goal0 + x)
            _search_both(a, goal0 + x, 1)
    finally:
        fs.close()


def test_files_created_one_after_another_skip_what_earlier_searches_walked() -> None:
    """The case the hint is for: every new file asks for the same goal.  The interval grows with
    each allocation, and a free inside it is found again."""
    _dev, fs = fresh(8 << 20)
    try:
        a = fs.balloc
        goal = fs.sb.data_start
        got = []
        for _ in range(50):
            with fs.journal.op() as tx:
                got.append(a.alloc_one(tx, goal))
        assert got == sorted(got) and len(set(got)) == 50
        assert a._known_lo <= goal and a._known_hi == got[-1]
        with fs.journal.op() as tx:
            a.release(tx, got[10])
        assert a._known_hi == got[10]  # the interval stops at the freed item
        fs.journal.commit()  # the free becomes reusable (and the interval is forgotten)
        with fs.journal.op() as tx:
            assert a.alloc_one(tx, goal) == got[10]
    finally:
        fs.close()


@pytest.mark.parametrize("threshold", [True, False])
def test_a_file_rewritten_after_a_large_delete_takes_the_freed_space(threshold: bool) -> None:
    """Freed blocks are unusable until their transaction commits, so a file written right after a
    large delete would go past them into space never used before (a sparse image file grows on the
    host).  A delete that leaves at least ``pending_commit`` blocks pending asks for a commit before
    the next operation, and the rewrite takes the old file's blocks again."""
    _dev, fs = fresh(32 << 20)
    try:
        fs.balloc.pending_commit = 256 if threshold else 1 << 62
        data = b"d" * (2 << 20)
        places = []
        for _ in range(3):
            a = fs.create(1, b"big")
            fs.write(a.ino, 0, data)
            exts = fs.inodes.map_range(fs.inodes.get(a.ino), 0, len(data) // fs.bs)
            places.append([(p, n) for _lg, n, p, _u in exts])
            fs.unlink(1, b"big")
            assert fs.balloc.pending_count >= len(data) // fs.bs
        if threshold:
            assert places[0] == places[1] == places[2]
        else:
            starts = [p[0][0] for p in places]
            assert starts[0] < starts[1] < starts[2]  # each rewrite moved past the pending blocks
    finally:
        fs.close()
