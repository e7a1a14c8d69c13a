"""What a run writes beside its checkpoints and model, under `train.output_dir` (a local path or a URI):

- `metrics.jsonl` (rank 0): a line per logged step and per evaluation; a step logged twice across a restart
  appears twice, the later line wins.
- `samples/rank<r>.jsonl`: the sample ids of every step, with the attempt that trained them: the audit trail
  behind "each sample exactly once per epoch".
- `summary.json` (rank 0, at the end): the last train metrics and the final evaluation, which the driver
  reads back (Ray Train's `Result.metrics` holds only what came with the last checkpoint).
- `workers/rank<r>.json`: where each worker ran (node, device) and what it holds (its share of the
  parameters under ZeRO-3, the checkpoint files it downloaded on resume).

On a local (or shared) filesystem lines are appended as they come, so a progress bar can follow them; an
object store cannot append, so there a file is rewritten whole at each `flush` (every logged step).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import ray
import torch

from ray_zephyr import storage

SUMMARY = "summary.json"


class JsonLines:
    """An append-only JSON-lines file in storage."""

    def __init__(self, path: str, keep_existing: bool):
        self.path, self.local = path, not storage.is_uri(path)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not keep_existing:
                Path(path).unlink(missing_ok=True)
            self.lines: list[str] = []
        else:
            self.lines = (storage.read_text(path) or "").splitlines() if keep_existing else []
        self.dirty = False

    def append(self, record: dict) -> None:
        line = json.dumps(record)
        if self.local:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        else:
            self.lines.append(line)
            self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            storage.write_text(self.path, "".join(line + "\n" for line in self.lines))
            self.dirty = False


class RunFiles:
    """One worker's side files; `resumed` keeps what an earlier attempt of this run wrote."""

    def __init__(self, output_dir: str, rank: int, attempt: str, resumed: bool, trackers=None):
        self.output_dir, self.rank, self.attempt, self.trackers = output_dir, rank, attempt, trackers
        self.metrics = JsonLines(storage.join(output_dir, "metrics.jsonl"), resumed) if rank == 0 else None
        self.samples = JsonLines(storage.join(output_dir, "samples", f"rank{rank}.jsonl"), resumed)
        self.summary = storage.join(output_dir, SUMMARY)
        if rank == 0 and not resumed and storage.exists(self.summary):  # an earlier run's, not ours
            fs, path = storage.filesystem(self.summary)
            fs.delete_file(path)

    def log(self, split: str, step: int, epoch: int, metrics: dict) -> None:
        if self.metrics is not None:
            record = {"split": split, "step": step, "epoch": epoch, **metrics, "time": time.time()}
            self.metrics.append(record)
            if self.trackers:
                self.trackers.log(record)

    def record_samples(self, epoch: int, step: int, ids: list[int]) -> None:
        self.samples.append({"attempt": self.attempt, "epoch": epoch, "step": step, "sample_ids": ids})

    def flush(self) -> None:
        for lines in (self.metrics, self.samples):
            if lines is not None:
                lines.flush()

    def write_summary(self, metrics: dict) -> None:
        if self.rank == 0:
            storage.write_text(self.summary, json.dumps(metrics, indent=1))

    def describe_worker(self, engine, **facts) -> None:
        """Write workers/rank<r>.json: node, device, and the parameters this rank holds (ZeRO-3 partitions them)."""
        params = list(engine.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        info = {"rank": self.rank, "attempt": self.attempt, "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(), "device": str(engine.device),
                "torch_threads": torch.get_num_threads(), "staging_dir": tempfile.gettempdir(),
                "parameters": total, "parameters_held": held, **facts}
        storage.write_text(storage.join(self.output_dir, "workers", f"rank{self.rank}.json"), json.dumps(info, indent=1))
