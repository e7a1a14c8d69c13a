"""Fault injection for the tests, in one place: `RAY_ZEPHYR_FAULT=<point>:<step>`.

- `after_step:S`: the last worker dies (the process exits) once, after global step S; Ray Train then
  restarts the worker group from the last checkpoint.
- `mid_save:S`: the process writing the final model dies once every file but the last is written, after
  step S, so the tests can check that no half-written model folder is left for later jobs.

The driver reads the variable (`planned`) and hands the plan to the workers in their config (a local Ray's
workers do not see variables set after it started). "Once" is kept by a marker file under the output
folder, so the restarted run goes through. Without a plan every call is a no-op.
"""

from __future__ import annotations

import os

from ray_zephyr import storage

FAULT_ENV = "RAY_ZEPHYR_FAULT"
MARKER = ".fault-injected"


def planned() -> tuple[str, int] | None:
    value = os.environ.get(FAULT_ENV, "")
    point, _, step = value.partition(":")
    return (point, int(step)) if point and step else None


def maybe_fail(plan: tuple[str, int] | None, point: str, step: int, output_dir: str, attempt: str,
               last_rank: bool = True) -> None:
    """Exit this process if the plan says so for (point, step) and it has not happened in this run yet."""
    if plan is None or tuple(plan) != (point, step) or not last_rank:
        return
    marker = storage.join(output_dir, MARKER)
    if storage.exists(marker):
        return
    storage.write_text(marker, attempt)
    os._exit(1)
