"""One bounded pool of CPU threads per process for the runtime's threaded array passes.

Resampling, intensity normalisation and dtype conversion split big volumes into
cache-sized pieces and run them on threads (numpy releases the GIL). They all
share this one pool, sized once by ``--threads`` / ``Embedder(threads=...)``
(default: the cores this process may use, at most 16), so a server answering
many requests at once keeps at most that many helper threads busy instead of
starting a fresh pool per pass and oversubscribing its cores.

The calling thread works too: it and up to ``threads - 1`` pool workers take
groups of pieces from one shared list until it is empty, and the caller never
waits for a helper that has not started, so concurrent callers cannot starve
each other and a pass run from inside a worker simply runs inline.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import GvslInputError

#: Most threads one process uses by default (beyond this the passes are memory-bound).
MAX_DEFAULT_THREADS = 16
#: Voxels per work item of the threaded passes: a piece and its temporaries stay in the
#: CPU caches, and there are few enough pieces that threads rarely wait for the GIL.
CHUNK_VOXELS = 1 << 18
#: Below this many voxels threads cost more than they save.
PARALLEL_MIN_VOXELS = 1 << 20

_lock = threading.Lock()
_size: int | None = None
_pool: ThreadPoolExecutor | None = None
_in_worker = threading.local()


def default_threads() -> int:
    """The cores this process may run on, at most :data:`MAX_DEFAULT_THREADS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_THREADS))


def check_threads(threads: int | None, option: str = "--threads") -> int | None:
    """``threads`` if it is a usable count (None = the default), else one clear line."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise GvslInputError(f"{option} {threads}: give 1 or more CPU threads (leave it out to use every core)")
    return threads


def set_threads(threads: int | None) -> int:
    """Size the process's pool: ``threads`` >= 1, or None/0 for :func:`default_threads`.
    Returns the size. A pool of another size is retired (its running work finishes)."""
    global _pool, _size
    size = default_threads() if threads in (None, 0) else check_threads(threads) or default_threads()
    with _lock:
        if _pool is not None and size != _size:
            _pool.shutdown(wait=False)
            _pool = None
        _size = size
    return size


def thread_count() -> int:
    """Threads a pass may use: the configured size, else :func:`default_threads`."""
    return _size or default_threads()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="gvsl-cpu")
        return _pool


def run_pieces(fn: Callable[[int, int], None], pieces: Sequence[tuple[int, int]], parallel: bool = True) -> None:
    """Run ``fn(start, stop)`` for every piece, on up to :func:`thread_count` threads
    (this one included) when ``parallel``; each thread takes contiguous runs of pieces."""
    threads = min(thread_count(), len(pieces)) if parallel else 1
    if threads <= 1 or getattr(_in_worker, "active", False):
        for a, b in pieces:
            fn(a, b)
        return
    groups = [list(pieces[i::threads]) for i in range(threads)]
    take = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            with take:
                if not groups:
                    return
                group = groups.pop()
            try:
                for a, b in group:
                    fn(a, b)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)

    def helper() -> None:
        _in_worker.active = True
        try:
            work()
        finally:
            _in_worker.active = False

    pool = _executor(thread_count() - 1)
    helpers: list[Future] = []
    for _ in range(threads - 1):
        try:
            helpers.append(pool.submit(helper))
        except RuntimeError:  # the pool was just resized (set_threads): this caller does the rest
            break
    work()
    for f in helpers:
        if not f.cancel():  # started: it may be finishing a group
            f.result()
    if errors:
        raise errors[0]


def run_chunks(fn: Callable[[int, int], None], pieces: Sequence[tuple[int, int]], size: int) -> None:
    """Run ``fn(start, stop)`` for every piece of a pass over ``size`` voxels, on the pool
    when that many are worth threads (at least :data:`PARALLEL_MIN_VOXELS`), else inline."""
    run_pieces(fn, pieces, parallel=size >= PARALLEL_MIN_VOXELS)


__all__ = [
    "CHUNK_VOXELS",
    "MAX_DEFAULT_THREADS",
    "PARALLEL_MIN_VOXELS",
    "check_threads",
    "default_threads",
    "run_chunks",
    "run_pieces",
    "set_threads",
    "thread_count",
]
