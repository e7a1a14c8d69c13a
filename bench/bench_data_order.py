"""Data delivery per epoch to each training worker: the numbered row file read by id (ours, `train/rows.py`)
vs the previous design, where every worker scanned the whole Ray dataset each epoch and sorted its own rows.

    python bench/bench_data_order.py [--rows 20000 200000] [--workers 4] [--old-timeout 900]

Rows are tokenized-SFT-shaped (input_ids and labels, 32-224 tokens). For each size it prints the seconds one
worker spends getting all of its micro-batches of one epoch (the mean over the workers, measured one after
the other so the 2 cores are not shared; the old design's cost is the same for every worker, so one is timed),
the driver's one-off cost of writing the row file, and the ratio. When the previous design does not finish
within --old-timeout seconds it prints that bound and the ratio as a lower bound.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import ray

from ray_zephyr.train.rows import Layout, RowFile, write_rows

MICRO_BATCH, ACCUMULATION = 8, 1


def synthetic_rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(32, 224, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = pa.array(rng.integers(0, 32000, offsets[-1]))
    ids = pa.ListArray.from_arrays(pa.array(offsets), tokens)
    return pa.table({"input_ids": ids, "labels": ids})


def old_design(ds: ray.data.Dataset, layout: Layout, epoch: int, rank: int) -> int:
    """The previous `sampler.Layout.rank_rows`: every worker maps over all N rows, keeps its own, sorts them."""
    usable = layout.steps_per_epoch * layout.global_batch
    perm = np.random.default_rng([layout.seed, epoch]).permutation(layout.rows)

    def select(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pos = perm[batch["sample_id"]]
        keep = (pos < usable) & ((pos // layout.micro_batch) % layout.world_size == rank)
        return {k: v[keep] for k, v in batch.items()} | {"position": pos[keep]}

    rows = ds.map_batches(select, batch_format="numpy").sort("position")
    return sum(len(b["sample_id"]) for b in rows.iter_batches(batch_size=layout.micro_batch, batch_format="numpy"))


def new_design(rows: RowFile, layout: Layout, epoch: int, rank: int) -> int:
    steps = layout.rank_micro_batches(epoch, rank, 0, rows.lengths, group_by_length=False)
    return sum(len(b["sample_id"]) for b in rows.micro_batches(ids for step in steps for ids in step))


def timed(deliver, *args, timeout: float) -> tuple[float | None, int]:
    """(seconds, rows delivered) of one worker's epoch; (None, 0) when it is not done within `timeout` seconds."""
    done: list = []
    start = time.perf_counter()
    thread = threading.Thread(target=lambda: done.append(deliver(*args)), daemon=True)
    thread.start()
    thread.join(timeout)
    return (time.perf_counter() - start, done[0]) if done else (None, 0)


def measure(n: int, workers: int, old_timeout: float) -> dict:
    table = synthetic_rows(n)
    layout = Layout(n, MICRO_BATCH, workers, ACCUMULATION, seed=0, shuffle=True)
    folder = tempfile.mkdtemp(prefix="rows-")
    start = time.perf_counter()
    write_rows(iter(table.to_batches(max_chunksize=1024)), folder)
    write_s = time.perf_counter() - start
    row_file = RowFile(folder)
    ds = ray.data.from_arrow(table.append_column("sample_id", pa.array(np.arange(n)))).materialize()
    out = {"rows": n, "workers": workers, "write_s": write_s}
    for name, deliver, source, ranks in (("new", new_design, row_file, workers), ("old", old_design, ds, 1)):
        seconds, delivered = [], 0
        for rank in range(ranks):  # the old design costs every worker the same full scan: one is timed
            took, rows = timed(deliver, source, layout, 1, rank, timeout=old_timeout if name == "old" else 1e9)
            if took is None:
                break
            seconds.append(took)
            delivered += rows
        else:
            assert delivered == layout.steps_per_epoch * layout.global_batch * ranks // workers
        out[f"{name}_s"] = float(np.mean(seconds)) if seconds else None
    out["ratio"] = out["old_s"] / out["new_s"] if out["old_s"] else old_timeout / out["new_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--old-timeout", type=float, default=900, help="give up on the previous design after this")
    args = parser.parse_args()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    warm = synthetic_rows(1000)  # Ray Data's first execution starts its worker processes: not part of an epoch
    old_design(ray.data.from_arrow(warm.append_column("sample_id", pa.array(np.arange(1000)))),
               Layout(1000, MICRO_BATCH, args.workers, ACCUMULATION, seed=0, shuffle=True), 0, 0)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.workers} workers, micro-batch {MICRO_BATCH}", flush=True)
    print("| rows | old: scan + sort, s/epoch/worker | ours: row file by id, s/epoch/worker | ratio | row file write (once) |")
    print("|---|---|---|---|---|")
    for n in args.rows:
        r = measure(n, args.workers, args.old_timeout)
        old, ratio = (f"{r['old_s']:.2f}", f"{r['ratio']:.0f}x") if r["old_s"] else (f"> {args.old_timeout:.0f} (stopped)",
                                                                                 f"> {r['ratio']:.0f}x")
        print(f"| {n} | {old} | {r['new_s']:.3f} | {ratio} | {r['write_s']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
