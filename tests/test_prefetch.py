"""The prefetch thread's timers: a slow first batch (a cold cluster) is waited for, with progress lines, up to
its own limit; a stall between batches fails after the stall timeout. No Ray needed: plain iterators."""

from __future__ import annotations

import time

import pytest

from ray_zephyr.errors import DataStallError
from ray_zephyr.prefetch import iter_with_stall_timeout


def _slow(first_after: float, then: list[float]):
    time.sleep(first_after)
    yield 0
    for i, pause in enumerate(then, 1):
        time.sleep(pause)
        yield i


def test_a_slow_first_batch_is_waited_for_with_progress_lines(capsys):
    got = list(iter_with_stall_timeout(_slow(2.5, [0.1, 0.1]), 1, "train data", start_timeout_s=30, progress_every_s=1))
    assert got == [0, 1, 2]
    waiting = [line for line in capsys.readouterr().out.splitlines() if "waiting for the first batch" in line]
    assert len(waiting) >= 2 and waiting[0].startswith("train data: waiting for the first batch, 1s so far (")


def test_no_first_batch_within_the_start_timeout_is_an_error():
    start = time.monotonic()
    with pytest.raises(DataStallError, match=r"train data: no first batch within 1s .*data.start_timeout_s"):
        list(iter_with_stall_timeout(_slow(30, []), 10, "train data", start_timeout_s=1))
    assert time.monotonic() - start < 5


def test_a_stall_between_batches_is_an_error_after_the_stall_timeout():
    start = time.monotonic()
    with pytest.raises(DataStallError, match=r"eval data: no data for 1s, the pipeline is stalled"):
        list(iter_with_stall_timeout(_slow(0, [0.1, 30]), 1, "eval data", start_timeout_s=60))
    assert time.monotonic() - start < 5


def test_the_first_batch_defaults_to_the_stall_timeout_and_errors_pass_through():
    with pytest.raises(DataStallError, match="no first batch within 1s"):
        list(iter_with_stall_timeout(_slow(30, []), 1, "x"))

    def broken():
        yield 1
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        list(iter_with_stall_timeout(broken(), 5, "x"))
