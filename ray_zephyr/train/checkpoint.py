"""Checkpoints: every rank's ZeRO state, the data position, and the fingerprint of the run.

- Save: each worker writes its own ZeRO files into a temporary folder and reports it to Ray Train, which puts
  every worker's files into one checkpoint folder `<storage_path>/<run name>/step_NNNNNNNN` (local or URI).
- LoRA: a checkpoint holds the adapter and its optimizer state, not the frozen model (loaded again from the
  starting model on resume).
- Load: each rank copies only the files it reads — its own ZeRO shards and the shared ones, not the other
  ranks' (at 7B on object storage that is 1/W of the optimizer state per worker, not all of it).
- Fingerprint: what fixes the data order and the optimisation (the recipe without output paths and
  bookkeeping, the batch layout, the row counts). Resuming from checkpoints with another fingerprint would
  silently splice two different runs; the driver refuses it with one line naming what changed, before any
  compute (`train.resume=fresh` deletes the old checkpoints and starts over).
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
from ray.train import CheckpointConsistencyMode

from ray_zephyr import lora, storage
from ray_zephyr.config import Recipe, changed_keys, flatten
from ray_zephyr.errors import UserError
from ray_zephyr.train.rows import Layout

TAG = "zero"
FINGERPRINT_FILE = "fingerprint.json"
RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")
# Keys that change where a run writes or how it is watched, not what it computes.
BOOKKEEPING = {"train.output_dir", "train.storage_path", "train.staging_dir", "train.shared_filesystem", "train.resume", "train.max_failures",
               "train.log_every_steps", "train.eval_every_steps", "train.checkpoint_every_steps",
               "train.placement_strategy", "train.report_to", "train.run_name", "train.project", "data.stall_timeout_s", "data.start_timeout_s", "data.on_bad_row", "model.lora.merge"}


@dataclass
class Position:
    """Where training stands: a checkpoint after global step s resumes at the step after it."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    num_tokens: float = 0.0


def fingerprint(recipe: Recipe, layout: Layout, eval_rows: int) -> dict:
    """Flat {key: value} of everything that decides which rows each step trains on and how."""
    keys = flatten(recipe.model_dump(mode="json"))
    keys |= flatten(asdict(layout), "layout.") | {"layout.eval_rows": eval_rows}
    return {k: v for k, v in sorted(keys.items()) if k not in BOOKKEEPING}


def run_name(output_dir: str) -> str:
    """The Ray Train run name: the output folder's name plus a hash of its full path or URI, so two runs with
    the same folder name under one shared `storage_path` never resume each other's checkpoints."""
    import hashlib

    path = storage.absolute(output_dir)
    return f"{path.rstrip('/').rsplit('/', 1)[-1]}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def check_resumable(run_dir: str, expected: dict, resume: str) -> None:
    """Before training: a run folder with checkpoints of another configuration is an error (or, with
    resume=fresh, deleted); a matching one is resumed by Ray Train."""
    saved = [storage.read_text(storage.join(run_dir, name, FINGERPRINT_FILE))
             for name in sorted({p.split("/", 1)[0] for p in storage.listing(run_dir)}) if name.startswith("step_")]
    saved = [json.loads(text) for text in saved if text]
    if resume == "fresh" or not saved:
        storage.delete_dir(run_dir)
        return
    found = saved[-1]
    if changed := changed_keys(found, expected):
        raise UserError(f"{run_dir} has checkpoints of a different run ({'; '.join(changed)}); use another "
                        "train.output_dir, or train.resume=fresh to delete them and start over")


def save_state(engine, folder: str, position: Position) -> None:
    """This rank's ZeRO state and the position into `folder` (a LoRA run's without the frozen model)."""
    engine.save_checkpoint(folder, tag=TAG, client_state={"position": asdict(position)},
                           exclude_frozen_parameters=lora.has_adapter(engine.module.lm))


def load_state(engine, folder: str) -> Position:
    """The state `save_state` wrote into `folder`, loaded into `engine`; returns the position."""
    _, client_state = engine.load_checkpoint(folder, tag=TAG, load_module_strict=not lora.has_adapter(engine.module.lm))
    return Position(**client_state["position"])


def save_and_report(engine, metrics: dict, position: Position, fingerprint: dict, rank: int) -> None:
    """Report `metrics` to Ray Train with a checkpoint of this rank's state; returns once it is committed, so a
    worker that dies right after resumes from here."""
    with tempfile.TemporaryDirectory() as folder:
        save_state(engine, folder, position)
        if rank == 0:
            Path(folder, FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step_{position.global_step:08d}")
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


@contextmanager
def _own_files(checkpoint: ray.train.Checkpoint, rank: int):
    """A local folder with the checkpoint's files that `rank` reads: in place on a local filesystem, else
    downloaded without the other ranks' ZeRO shards. Yields (folder, the files downloaded)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path, []
        return
    uri_fs, root = checkpoint.filesystem, checkpoint.path

    def mine(relative: str) -> bool:
        match = RANK_FILE.search(relative.rsplit("/", 1)[-1])
        return match is None or int(match.group(1)) == rank

    with tempfile.TemporaryDirectory() as folder:
        files = uri_fs.get_file_info(pafs.FileSelector(root, recursive=True))
        fetched = []
        for info in files:
            relative = info.path[len(root.rstrip("/")) + 1 :]
            if info.type == pafs.FileType.File and mine(relative):
                Path(folder, relative).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(info.path, str(Path(folder, relative)), source_filesystem=uri_fs,
                                destination_filesystem=pafs.LocalFileSystem())
                fetched.append(relative)
        yield folder, fetched


def load(engine, rank: int) -> tuple[Position, list[str]] | None:
    """This rank's state from Ray Train's latest checkpoint (None on a fresh start); returns the position and
    the files it had to download."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with _own_files(checkpoint, rank) as (folder, fetched):
        return load_state(engine, folder), fetched
