"""Fault injection for the tests, in one place: `RAY_ZEPHYR_FAULT=<point>:<step>`.

- `after_step:S`: the last worker dies (the process exits) once, when the loop is done with global step S (its
  samples recorded, any checkpoint or report of it made); Ray Train then
  restarts the worker group from the last checkpoint.
- `mid_save:S`: the process writing the final model dies once every file but the last is written, after
  step S, so the tests can check that no half-written model folder is left for later jobs.

The driver reads the variable (`planned`) and hands the fault to the workers in their plan (a local Ray's
workers do not see variables set after it started). The loop never checks for it: `after_steps` wraps the
loop's step iterator, and `mid_save` is the model writer's `before_last_file` hook. "Once" is kept by a marker
file under the output folder, so the restarted run goes through.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ray_zephyr import storage

FAULT_ENV = "RAY_ZEPHYR_FAULT"
MARKER = ".fault-injected"
T = TypeVar("T")


@dataclass(frozen=True)
class Fault:
    point: str  # after_step | mid_save
    step: int

    def fire(self, output_dir: str, attempt: str) -> None:
        """Exit this process, unless it happened before in this run."""
        marker = storage.join(output_dir, MARKER)
        if storage.exists(marker):
            return
        storage.write_text(marker, attempt)
        os._exit(1)


def planned() -> Fault | None:
    point, _, step = os.environ.get(FAULT_ENV, "").partition(":")
    return Fault(point, int(step)) if point and step else None


def after_steps(fault: Fault | None, steps: Iterable[T], first_step: int, output_dir: str, attempt: str,
                last_rank: bool) -> Iterator[T]:
    """`steps` (global steps first_step + 1, ...); on the last rank, dies once the loop is done with step
    `fault.step` (its samples recorded, any report of it made), also when it is the last step of the slice."""
    for step, item in enumerate(steps, first_step + 1):
        yield item
        if fault and fault.point == "after_step" and step == fault.step and last_rank:
            fault.fire(output_dir, attempt)


def mid_save(fault: Fault | None, step: int, output_dir: str, attempt: str):
    """The model writer's `before_last_file` hook for the `mid_save` fault at `step`, or None."""
    if fault and fault.point == "mid_save" and fault.step == step:
        return lambda: fault.fire(output_dir, attempt)
    return None
