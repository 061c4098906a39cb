"""Ordered results with bounded look-ahead on threads: the pipelining of stage one (inputs load
while the teacher runs; several forwards at once) without holding more than a few batches."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def ordered(calls: Iterable[Callable[[], T]], pool: Executor, ahead: int) -> Iterator[T]:
    """Each call's result in order, while up to ``ahead`` later calls run on ``pool``: bounded
    look-ahead, so memory holds a few batches, never a whole shard's inputs."""
    pending: deque = deque()
    try:
        for call in calls:
            pending.append(pool.submit(call))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # abandoned (an error, Ctrl-C): drop the calls not yet started
        for future in pending:
            future.cancel()


def prefetched(loads: Iterable[Callable[[], T]]) -> Iterator[T]:
    """Each load's result in order, the next one running on a thread while the caller works on
    the current one (including across shard boundaries, when given several shards' loads)."""
    with ThreadPoolExecutor(1, thread_name_prefix="kdcache-prefetch") as pool:
        yield from ordered(loads, pool, ahead=1)


