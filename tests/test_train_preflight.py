"""Clear one-line errors before any compute: model path, batch arithmetic, storage, cluster size."""

from __future__ import annotations

import sys

import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.errors import UserError
from ray_zephyr.train.launch import check_cluster, preflight


def _recipe(tmp_path, *overrides):
    return load_recipe("tiny-sft", [f"train.output_dir={tmp_path}/out", *overrides])


def test_missing_model_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative outputs/tiny-sft/model, wherever a checkout has one
    recipe = load_recipe("tiny-dpo", [f"train.output_dir={tmp_path}/out"])  # outputs/tiny-sft/model, not made here
    with pytest.raises(UserError, match=r"model.name_or_path 'outputs/tiny-sft/model' does not exist \(run jobs/sft.py"):
        preflight(recipe)


def test_batch_not_divisible(tmp_path):
    with pytest.raises(UserError, match="global_batch_size=20 is not a multiple of .* 8 x 2 = 16"):
        preflight(_recipe(tmp_path, "train.global_batch_size=20"))


@pytest.mark.parametrize("tracker, extra", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_tracker_that_is_not_installed_is_named_with_its_extra(tmp_path, monkeypatch, tracker, extra):
    monkeypatch.setitem(sys.modules, tracker, None)  # Python's own way to make an import fail, as if not installed
    with pytest.raises(UserError, match=rf"train.report_to: {tracker} is not installed .*pip install 'ray-zephyr\[{extra}\]'"):
        preflight(_recipe(tmp_path, f"train.report_to=[{tracker}]"))


def test_storage_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to .*file"):
        preflight(_recipe(tmp_path, f"train.storage_path={tmp_path}/file/ckpt"))


def test_more_workers_than_the_cluster_has(ray_session, tmp_path):
    with pytest.raises(UserError, match=r"num_workers=64 needs 64 CPUs but the Ray cluster has \d+"):
        check_cluster(_recipe(tmp_path, "train.num_workers=64", "train.global_batch_size=512"))
    with pytest.raises(UserError, match=r"num_workers=2 x train.cpus_per_worker=8 needs 16 CPUs but the Ray cluster has \d+"):
        check_cluster(_recipe(tmp_path, "train.cpus_per_worker=8"))
    with pytest.raises(UserError, match="needs 2 GPUs but the Ray cluster has 0"):
        check_cluster(_recipe(tmp_path, "train.use_gpu=true", "train.padding_free=false"))  # sdpa: not padding-free on GPU


def test_every_job_checks_the_model_path_the_same_way_before_any_work(tmp_path):
    """preview (as README runs it, before SFT), serving and the training jobs: the same one line, no traceback."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from ray_zephyr.serving.engines import load_engine
    from ray_zephyr.serving.settings import ServeSettings

    start = time.monotonic()
    preview = Path(__file__).parents[1] / "jobs" / "preview.py"
    done = subprocess.run([sys.executable, str(preview), "--config", "tiny-dpo"], cwd=tmp_path,  # no outputs/ there
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        "model.name_or_path 'outputs/tiny-sft/model' does not exist (run jobs/sft.py first: it writes <output_dir>/model)")
    assert time.monotonic() - start < 60  # before Ray starts
    with pytest.raises(UserError, match=r"model 'outputs/nope/model' does not exist \(run jobs/sft.py first"):
        load_engine(ServeSettings(model="outputs/nope/model", engine="transformers", num_gpus=0))


def test_hub_ids_with_and_without_an_owner_pass_the_model_check():
    from ray_zephyr.models import check_model_source

    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "embedded"):
        check_model_source(name)
    with pytest.raises(UserError, match="'outputs/x/model' does not exist"):
        check_model_source("outputs/x/model")
