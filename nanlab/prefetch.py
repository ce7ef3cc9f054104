"""Prefetch: prepare the next batches in a background thread while the current step runs.

`Prefetcher(items, prepare, depth)` iterates like ``map(prepare, items)``: the same values in the
same order. A thread takes each item (e.g. a host batch: numpy batching or a Grain iterator's
next batch) and runs ``prepare`` on it (e.g. ``device_put`` on the mesh and normalization, both
dispatched asynchronously), at most `depth` finished results ahead of the consumer. The training
loop therefore never waits for host batching while the device has a step to run; host memory
holds at most depth + 1 batches. An exception in the thread (bad data) is raised by the `next`
that would have returned that item. Depth 0 prepares each item in the caller's thread, on demand.

Only the standard library here: the caller brings the work.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

__all__ = ["Prefetcher"]

_POLL_S = 0.1  # how often a blocked producer checks whether it was closed


class Prefetcher:
    """``map(prepare, items)``, computed up to `depth` items ahead in a background thread.

    Args:
      items: any iterable (consumed by the thread when depth > 0).
      prepare: applied to each item.
      depth: finished results buffered ahead; 0: no thread.

    Close it (or use ``with``) to stop the thread; closing does not close `items`.
    """

    def __init__(self, items: Iterable[Any], prepare: Callable[[Any], Any], depth: int = 2):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"prefetch depth must be an int >= 0, got {depth!r}")
        self._items: Iterator[Any] = iter(items)
        self._prepare = prepare
        self.depth = depth
        self._closed = threading.Event()
        self._done = False
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="nanlab-prefetch", daemon=True)
            self._thread.start()

    def _put(self, entry: tuple[bool, Any]) -> bool:
        """Queue `entry` unless closed first; whether it was queued."""
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if self._closed.is_set() or not self._put((True, self._prepare(item))):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put((False, error))
            return
        self._put((False, StopIteration()))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._done or self._closed.is_set():
            raise StopIteration
        if self._thread is None:
            try:
                return self._prepare(next(self._items))
            except StopIteration:
                self._done = True
                raise
        ok, value = self._queue.get()
        if ok:
            return value
        self._done = True
        raise value

    def close(self) -> None:
        """Stops the thread (after the item it is preparing) and drops what it buffered."""
        self._closed.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while thread.is_alive():
            try:  # unblock a producer waiting for room
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            thread.join(timeout=_POLL_S)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
