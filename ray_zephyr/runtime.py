"""Starting or joining Ray.

On a cluster (`ray job submit`, RAY_ADDRESS, or a `ray start` head on this machine) we join it as is; other
Ray instances that happen to run on the machine (another program's private local Ray) are not joined.
Otherwise we start a local Ray whose logical CPUs are sized deliberately: with Ray's default of one
logical CPU per core, two Train workers on a 2-core laptop take every CPU and the Ray Data tasks that
feed them never get scheduled (a silent deadlock). Logical CPUs are a scheduling budget, not cores.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from pathlib import Path

import ray
from ray._private.services import find_bootstrap_address

import ray_zephyr

LOCAL_LOGICAL_CPUS = 8
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
VERBOSE_ENV = "RAY_ZEPHYR_VERBOSE"  # set by a job's --verbose: Ray's own INFO logs back on
_started_here = False


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_log_level() -> str:
    """Ray's own logs in every process of the job (Data's operator progress, Train's per-rank result lines, the
    placement-group cleaner's state-API retries on a local Ray without a dashboard): errors only, since the jobs
    print their own progress; INFO with --verbose. Ray Train's controller keeps its INFO lines (where the workers
    run; each failure, with its traceback, and whether the run restarts). The session's log files keep everything."""
    return "INFO" if verbose() else "ERROR"


def quiet_model_loading() -> None:
    """In a job's model-loading actor (an AI-feedback generator or reward model): transformers' "Loading weights"
    bar off, unless --verbose; it reaches the job's output once per actor and tells nothing there."""
    if not verbose():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def init_ray(num_cpus: int | None = None, join_existing: bool = True) -> None:
    """Join the cluster this job runs on (RAY_ADDRESS, as `ray job submit` sets, or the head `ray start` made on
    this machine), else start a local Ray; always a new local one when join_existing=False."""
    if ray.is_initialized():
        return
    # verbose: Ray's own logging as it comes (a logging config, even at INFO, drops the "(actor pid=...)" prefix of
    # the lines workers print)
    logs = None if verbose() else ray.LoggingConfig(log_level=ray_log_level())
    if not verbose():
        importlib.import_module("ray.data")  # which configures its logger (INFO), turned down here
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the driver's operator progress lines
    if join_existing and (os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)):
        try:
            ray.init(log_to_driver=True, logging_config=logs)
            _say(f"Joined the Ray cluster at {ray.get_runtime_context().gcs_address}")
            return
        except ConnectionError:  # a stale address of a head that has gone
            if os.environ.get("RAY_ADDRESS"):
                raise
    cpus = num_cpus or max(LOCAL_LOGICAL_CPUS, 2 * (os.cpu_count() or 1))
    # Ray Train's controller polls its workers every 2 s by default, so a finished run on a local Ray waited ~5 s
    # more before fit() returned; the runs a laptop makes are short, and a poll costs a few small RPCs.
    os.environ.setdefault(TRAIN_POLL_ENV, "0.25")
    # Ray Train's preemption watcher (an actor per run) polls for nodes being drained, as spot nodes of a cluster
    # are; one machine's own Ray has no node to lose but itself, and Ray's core warned at each run that the
    # watcher's arguments sit in the object store. On a cluster it stays on.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # Workers of a local Ray inherit the environment: let them import ray_zephyr from a checkout, installed or not.
    root = str(Path(ray_zephyr.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True, logging_config=logs)
    _say(f"Started a local Ray instance ({cpus} logical CPUs on {os.cpu_count()} cores)")
    global _started_here
    _started_here = True


def _say(line: str) -> None:
    """What Ray's own INFO line would have said, when its logs are off."""
    if not verbose():
        print(line, file=sys.stderr, flush=True)


def fixed_size() -> bool:
    """A local Ray started here cannot grow; a cluster we joined may autoscale."""
    return _started_here


def local_cores() -> int | None:
    """The machine's cores when Ray is the local one started here, whose logical CPUs outnumber them (see above):
    CPU-bound actor pools are capped at this, since more actors only share the same cores (on 2 cores, 8
    tokenizer actors ran 1.3x slower than 2: docs/benchmarks.md). None on a cluster, where a logical CPU is a core."""
    return (os.cpu_count() or 1) if _started_here else None



def free_ports(n: int = 1) -> list[int]:
    """`n` distinct TCP ports free on the loopback now (all bound at once, so no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
