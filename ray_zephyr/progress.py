"""A training run's progress as the driver shows it: a bar on a terminal, and a plain line every few seconds where
there is none (Ray job logs, CI), so a long run is never silent. Both follow the step log and metrics.jsonl the
rank-0 worker writes under the output folder (a local path or a URI)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import TextIO

from ray_zephyr import storage

EVERY_ENV = "RAY_ZEPHYR_PROGRESS_EVERY_S"  # seconds between plain progress lines (default 30)


def last_record(path: str, **match) -> dict:
    """The last JSON line of `path` whose fields equal `match` ({} if there is none yet)."""
    text = storage.read_text(path) or ""
    records = (json.loads(line) for line in reversed(text.splitlines()) if line.strip())
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), {})


def train_with_progress(recipe, label: str, stream: TextIO | None = None):
    """`run_training(recipe)`, its optimizer steps shown on `stream` (default stderr) with the last loss, the rate
    and the time left."""
    from ray_zephyr.train.launch import run_training

    stream = stream or sys.stderr
    output = recipe.train.output_dir
    show = _Bar(label, stream) if stream.isatty() else _Lines(label, stream, float(os.environ.get(EVERY_ENV, "30")))
    done = threading.Event()
    poll = 5.0 if storage.is_uri(output) else 0.5  # an object store is read whole at each look

    def follow() -> None:
        while not done.wait(min(poll, show.every)):
            step = last_record(storage.join(output, "samples", "rank0.jsonl")).get("step")
            if step:
                show.update(step, last_record(storage.join(output, "metrics.jsonl"), split="train").get("loss"))

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        return run_training(recipe, on_start=show.start)
    finally:
        done.set()
        thread.join()
        show.close()


class _Bar:
    every = 0.5

    def __init__(self, label: str, stream: TextIO):
        from tqdm import tqdm

        self.label = label
        self.bar = tqdm(desc=f"{label} (preparing data)", total=None, unit="step", file=stream, leave=True,
                        mininterval=0.5)

    def start(self, total: int) -> None:
        self.bar.reset(total=total)

    def update(self, step: int, loss: float | None) -> None:
        self.bar.set_description(self.label, refresh=False)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """`<label>: step 12/40 (30%), loss 1.234, 0.8 steps/s, 35 s left`, at most every `every` seconds and at the end."""

    def __init__(self, label: str, stream: TextIO, every: float):
        self.label, self.stream, self.every = label, stream, every
        self.total, self.started, self.last_shown, self.shown_step, self.state = None, None, 0.0, 0, (0, None)

    def start(self, total: int) -> None:
        self.total, self.started = total, time.monotonic()
        self._print(f"{self.label}: training {total} steps")

    def update(self, step: int, loss: float | None) -> None:
        self.state = step, loss
        if time.monotonic() - self.last_shown >= self.every:
            self._show()

    def close(self) -> None:
        if self.state[0] > self.shown_step:
            self._show()

    def _show(self) -> None:
        step, loss = self.state
        elapsed = time.monotonic() - (self.started or time.monotonic())
        rate = step / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: step {step}/{self.total} ({100 * step / self.total:.0f}%)" if self.total
                 else f"{self.label}: step {step}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s")
            if self.total:
                parts.append(f"{(self.total - step) / rate:.0f} s left")
        self._print(", ".join(parts))
        self.last_shown, self.shown_step = time.monotonic(), step

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
