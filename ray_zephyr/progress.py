"""Progress as the driver shows it: a bar on a terminal, and a plain line every few seconds where there is none
(Ray job logs, CI), so a long job is never silent. A training run's bar follows the step log and metrics.jsonl the
rank-0 worker writes under the output folder (a local path or a URI); the judges count their ratings (`progress`)."""

from __future__ import annotations

import asyncio
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
    """`run_training(recipe)`, its optimizer steps shown on `stream` (default stderr) with the last logged loss, lr
    and tokens/s, the rate and the time left."""
    from ray_zephyr.train.launch import run_training

    output = recipe.train.output_dir
    show = progress(label, "step", stream)
    done = threading.Event()
    poll = 5.0 if storage.is_uri(output) else 0.5  # an object store is read whole at each look

    def look() -> None:
        step = last_record(storage.join(output, "samples", "rank0.jsonl")).get("step")
        if step:
            show.update(step, train_stats(last_record(storage.join(output, "metrics.jsonl"), split="train")))

    def follow() -> None:
        while not done.wait(min(poll, show.every)):
            look()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        result = run_training(recipe, on_start=show.start)
        done.set()
        thread.join()
        look()  # the last steps, which a run shorter than one look would otherwise never show
        return result
    finally:
        done.set()
        thread.join()
        show.close()


def train_stats(record: dict) -> dict[str, str]:
    """What the progress shows of a logged train step: its loss, learning rate and tokens/s."""
    formats = {"loss": "{:.4f}", "lr": "{:.2e}", "tokens/s": "{:.0f}"}
    return {name: form.format(record[name]) for name, form in formats.items() if record.get(name) is not None}


def progress(label: str, unit: str, stream: TextIO | None = None) -> _Bar | _Lines:
    """A bar on a terminal, else plain lines every RAY_ZEPHYR_PROGRESS_EVERY_S seconds: `start(total)`, then
    `update(done, stats)`, then `close()`."""
    stream = stream or sys.stderr
    if stream.isatty():
        return _Bar(label, unit, stream)
    return _Lines(label, unit, stream, float(os.environ.get(EVERY_ENV, "30")))


async def gather_shown(label: str, unit: str, awaitables: list) -> list:
    """`asyncio.gather(*awaitables)`, its progress shown as each one finishes."""
    shown, done = progress(label, unit), 0
    shown.start(len(awaitables))

    async def counted(awaitable):
        nonlocal done
        result = await awaitable
        done += 1
        shown.update(done)
        return result

    try:
        return list(await asyncio.gather(*(counted(a) for a in awaitables)))
    finally:
        shown.close()


class _Bar:
    every = 0.5

    def __init__(self, label: str, unit: str, stream: TextIO):
        from tqdm import tqdm

        self.label = label
        self.bar = tqdm(desc=f"{label} (preparing)", total=None, unit=unit, file=stream, leave=True, mininterval=0.5)

    def start(self, total: int) -> None:
        self.bar.reset(total=total)

    def update(self, step: int, stats: dict[str, str] | None = None) -> None:
        self.bar.set_description(self.label, refresh=False)
        if stats:
            self.bar.set_postfix(stats, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """`<label>: step 12/40 (30%), loss 1.2340, lr 3.00e-03, tokens/s 2853, 0.80 steps/s, 35 s left`, at most every
    `every` seconds and at the end."""

    def __init__(self, label: str, unit: str, stream: TextIO, every: float):
        self.label, self.unit, self.stream, self.every = label, unit, stream, every
        self.total, self.started, self.last_shown, self.shown_step, self.state = None, None, 0.0, 0, (0, {})

    def start(self, total: int) -> None:
        self.total, self.started = total, time.monotonic()
        self._print(f"{self.label}: {total} {self.unit}s")

    def update(self, step: int, stats: dict[str, str] | None = None) -> None:
        self.state = step, stats or {}
        if time.monotonic() - self.last_shown >= self.every:
            self._show()

    def close(self) -> None:
        if self.state[0] > self.shown_step:
            self._show()

    def _show(self) -> None:
        step, stats = self.state
        elapsed = time.monotonic() - (self.started or time.monotonic())
        rate = step / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.unit} {step}/{self.total} ({100 * step / self.total:.0f}%)" if self.total
                 else f"{self.label}: {self.unit} {step}"]
        parts += [f"{name} {value}" for name, value in stats.items()]
        if rate > 0:
            parts.append(f"{rate:.2f} {self.unit}s/s")
            if self.total:
                parts.append(f"{(self.total - step) / rate:.0f} s left")
        self._print(", ".join(parts))
        self.last_shown, self.shown_step = time.monotonic(), step

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
