"""Items pulled ahead in a background thread, with a stall timer: the training loop's micro-batches, and the
driver's and preview's Ray Data batches.

Its own module so that a training worker, which only reads its row file, does not import Ray Data for a queue.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import ray

from ray_zephyr.errors import DataStallError

QUEUE_DEPTH = 4  # items ready ahead of the consumer (training: micro-batches collated ahead)
_DONE = object()


def iter_with_stall_timeout(iterable: Iterable, timeout_s: float, what: str) -> Iterator:
    """Yield from `iterable`, but raise DataStallError if no item arrives for `timeout_s` seconds.

    A Ray Data pipeline whose tasks cannot be scheduled waits forever without a word; this turns that into
    an error that says what to change. A thread pulls the items, up to QUEUE_DEPTH ahead of the consumer.
    """
    items: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)

    def produce() -> None:
        try:
            for item in iterable:
                items.put(item)
            items.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            items.put(exc)

    threading.Thread(target=produce, daemon=True, name=f"stall-watch:{what}").start()
    while True:
        try:
            item = items.get(timeout=timeout_s)
        except queue.Empty:
            free = ray.available_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0
            total = ray.cluster_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0
            raise DataStallError(
                f"{what}: no data for {timeout_s:.0f}s, the pipeline is stalled ({free:g} of {total:g} logical CPUs "
                "free for Ray Data tasks); give Ray more CPUs (ray start --num-cpus) or use fewer train workers"
            ) from None
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
