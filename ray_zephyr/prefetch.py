"""Items pulled ahead in a background thread, with a stall timer: the training loop's micro-batches, and the
driver's and preview's Ray Data batches.

Its own module so that a training worker, which only reads its row file, does not import Ray Data for a queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator

import ray

from ray_zephyr.errors import DataStallError

QUEUE_DEPTH = 4  # items ready ahead of the consumer (training: micro-batches collated ahead)
_DONE = object()


def _cluster_cpus() -> str:
    if not ray.is_initialized():
        return "Ray is not running"
    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    return f"{free:g} of {total:g} logical CPUs free on {nodes} node{'s' * (nodes != 1)}"


def iter_with_stall_timeout(iterable: Iterable, timeout_s: float, what: str, start_timeout_s: float | None = None,
                            progress_every_s: float = 60.0) -> Iterator:
    """Yield from `iterable`; raise DataStallError if the first item takes longer than `start_timeout_s`
    (default: `timeout_s`) or a later one longer than `timeout_s`.

    A Ray Data pipeline whose tasks cannot be scheduled waits forever without a word; this turns that into
    an error that says what to change. The first item is timed apart: on a cold autoscaling cluster it waits for
    nodes to be provisioned and images pulled (minutes), and says so every `progress_every_s` while it waits.
    A thread pulls the items, up to QUEUE_DEPTH ahead of the consumer.
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
    item = _first(items, start_timeout_s or timeout_s, what, progress_every_s)
    while item is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item
        try:
            item = items.get(timeout=timeout_s)
        except queue.Empty:
            raise DataStallError(
                f"{what}: no data for {timeout_s:.0f}s, the pipeline is stalled ({_cluster_cpus()}); give Ray more "
                "CPUs (ray start --num-cpus) or use fewer train workers (data.stall_timeout_s sets the wait)"
            ) from None


def _first(items: queue.Queue, timeout_s: float, what: str, progress_every_s: float):
    """The first item, with a progress line every `progress_every_s` while it is awaited."""
    start = time.monotonic()
    while (left := timeout_s - (time.monotonic() - start)) > 0:
        try:
            return items.get(timeout=min(left, progress_every_s))
        except queue.Empty:
            if time.monotonic() - start < timeout_s:
                print(f"{what}: waiting for the first batch, {time.monotonic() - start:.0f}s so far "
                      f"({_cluster_cpus()})", flush=True)
    raise DataStallError(
        f"{what}: no first batch within {timeout_s:.0f}s ({_cluster_cpus()}); the cluster may lack the CPUs its "
        "data tasks need, or nodes did not come up (data.start_timeout_s sets the wait)"
    )
