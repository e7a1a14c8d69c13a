"""Clear one-line errors before any compute: model path, batch arithmetic, storage, cluster size."""

from __future__ import annotations

import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.errors import UserError
from ray_zephyr.train.launch import check_cluster, preflight


def _recipe(tmp_path, *overrides):
    return load_recipe("tiny-sft", [f"train.output_dir={tmp_path}/out", *overrides])


def test_missing_model_path(tmp_path):
    recipe = load_recipe("tiny-dpo", [f"train.output_dir={tmp_path}/out"])  # outputs/tiny-sft/model, not made here
    with pytest.raises(UserError, match=r"model.name_or_path 'outputs/tiny-sft/model' does not exist \(run jobs/sft.py"):
        preflight(recipe)


def test_batch_not_divisible(tmp_path):
    with pytest.raises(UserError, match="global_batch_size=20 is not a multiple of .* 8 x 2 = 16"):
        preflight(_recipe(tmp_path, "train.global_batch_size=20"))


def test_storage_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to .*file"):
        preflight(_recipe(tmp_path, f"train.storage_path={tmp_path}/file/ckpt"))


def test_more_workers_than_the_cluster_has(ray_session, tmp_path):
    with pytest.raises(UserError, match=r"num_workers=64 needs 64 CPUs but the Ray cluster has \d+"):
        check_cluster(_recipe(tmp_path, "train.num_workers=64", "train.global_batch_size=512"))
    with pytest.raises(UserError, match="needs 2 GPUs but the Ray cluster has 0"):
        check_cluster(_recipe(tmp_path, "train.use_gpu=true"))
