"""Recipes: shipped ones load with the paper's and the handbook's numbers; overrides and errors are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ray_zephyr.config import load_recipe, recipe_file, shipped_recipes
from ray_zephyr.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_recipes_load_with_zephyr_hyperparameters():
    assert {"tiny-sft", "tiny-dpo", "zephyr-7b-beta-sft", "zephyr-7b-beta-dpo", "zephyr-7b-beta-dpo-handbook"} <= set(
        shipped_recipes()
    )
    paper = load_recipe("zephyr-7b-beta-dpo")
    assert (paper.dpo.beta, paper.train.epochs, paper.train.optimizer, paper.train.lr_scheduler) == (0.1, 3, "rmsprop", "linear")
    assert (paper.train.lr, paper.data.max_length, paper.train.zero_stage) == (5e-7, 1024, 3)
    handbook = load_recipe("zephyr-7b-beta-dpo-handbook")
    assert (handbook.dpo.beta, handbook.train.epochs, handbook.train.optimizer, handbook.train.lr_scheduler) == (
        0.01, 1, "adamw", "cosine")
    sft = load_recipe("zephyr-7b-beta-sft")
    assert (sft.train.lr, sft.train.lr_scheduler, sft.data.max_length, sft.model.name_or_path) == (
        2e-5, "cosine", 2048, "mistralai/Mistral-7B-v0.1")
    assert sft.data.train[0].path == "HuggingFaceH4/ultrachat_200k" and sft.data.train[0].split == "train_sft"


def test_recipes_resolve_by_name_from_the_package_and_by_path(tmp_path):
    shipped = recipe_file("tiny-sft")
    assert shipped.parent.name == "recipes" and shipped.parent.parent.name == "ray_zephyr"
    copy = tmp_path / "mine.yaml"
    copy.write_text(shipped.read_text())
    assert load_recipe(str(copy), ["train.lr=0.5"]).train.lr == 0.5


def test_exponent_floats_are_numbers_in_overrides_and_files(tmp_path):
    assert load_recipe("tiny-sft", ["train.lr=1e-5"]).train.lr == 1e-5  # YAML 1.1 would read a string
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_file("tiny-sft").read_text().replace("lr: 3.0e-3", "lr: 3e-3"))
    assert load_recipe(str(recipe)).train.lr == 3e-3


def test_overrides_are_typed_and_reach_nested_lists():
    recipe = load_recipe("tiny-dpo", ["dpo.beta=0.05", "data.train.0.weight=0.5", "train.num_workers=1",
                                      "data.eval=[]", "data.eval_fraction=0.1", "model.gradient_checkpointing=true"])
    assert recipe.dpo.beta == 0.05 and recipe.data.train[0].weight == 0.5 and recipe.train.num_workers == 1
    assert recipe.data.eval == [] and recipe.data.eval_fraction == 0.1 and recipe.model.gradient_checkpointing is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'lr'?); valid keys in 'train': output_dir, "),
        ("data.train.0.wieght=0.5", "unknown key 'data.train.0.wieght' (did you mean 'weight'?); valid keys in 'data.train.0': path, split, weight, rows"),
        ("nope=1", "unknown key 'nope'; valid keys: stage, seed, model, data, train, dpo"),
        ("train.lr=fast", "train.lr: expected number, got 'fast' (str)"),
        ("train.num_workers=2.5", "train.num_workers: expected integer, got 2.5 (float)"),
        ("dpo.loss_type=dpop", "dpo.loss_type: must be 'sigmoid', 'ipo', 'hinge', 'apo_zero', 'apo_down', 'simpo', "
                               "'orpo', 'kto' or 'apo_zero_unpaired', got 'dpop'"),
        ("data.on_bad_row=ignore", "data.on_bad_row: must be 'fail' or 'skip', got 'ignore'"),
        ("data.train.0.weight=1.5", "weight must be in (0, 1], got 1.5"),
        ("train.lr", "override 'train.lr' is not key=value"),
        ("train.num_workers=0", "train.num_workers: must be greater than or equal to 1, got 0"),
        ("dpo.beta=0", "dpo.beta: must be greater than 0, got 0"),
        ("train.warmup_ratio=2", "train.warmup_ratio: must be less than or equal to 1, got 2"),
    ],
)
def test_bad_recipes_give_one_line_errors(override, message):
    with pytest.raises(UserError) as info:
        load_recipe("tiny-sft", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dpo.loss_type=[simpo, sigmoid]"], "loss_type simpo is an objective of its own and does not mix with other "
                                             "loss types"),
        (["dpo.loss_type=[kto, sigmoid]"], "loss_type kto is an objective of its own"),
        (["dpo.loss_type=kto", "dpo.reference=precomputed"], "loss_type kto computes its reference log-probs during "
                                                               "training"),
        (["dpo.desirable_weight=2.0"], "desirable_weight is KTO's; loss_type is sigmoid"),
        (["dpo.loss_type=kto", "dpo.rpo_alpha=1"], "rpo_alpha adds an NLL term to paired objectives; loss_type is kto"),
        (["dpo.loss_type=kto", "train.per_device_batch_size=1"], "loss_type kto needs train.per_device_batch_size >= 2"),
        (["dpo.loss_type=kto", "train.micro_batch_tokens=512"], "a token budget (train.micro_batch_tokens) can leave"),
        (["dpo.loss_type=[sigmoid, apo_zero]", "dpo.loss_weights=[1.0]"], "loss_weights has 1 weights for 2 loss types"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "label_smoothing applies to sigmoid and simpo only, not to ipo"),
        (["dpo.simpo_gamma=1.0"], "simpo_gamma is SimPO's margin; loss_type is sigmoid"),
        (["dpo.loss_type=orpo", "dpo.reference=resident"], "loss_type orpo uses no reference model"),
        (["dpo.loss_type=orpo", "dpo.rpo_alpha=1"], "rpo_alpha adds an NLL term, and orpo has its own"),
    ],
)
def test_preference_objective_keys_are_checked_in_one_line(overrides, message):
    with pytest.raises(UserError) as info:
        load_recipe("tiny-dpo", ["dpo.rpo_alpha=0", *overrides])
    assert message in str(info.value) and "\n" not in str(info.value)
    recipe = load_recipe("tiny-dpo", ["dpo.loss_type=[sigmoid, apo_zero]", "dpo.loss_weights=[0.8, 0.2]"])
    assert recipe.dpo.losses == [("sigmoid", 0.8), ("apo_zero", 0.2)] and recipe.dpo.uses_reference
    assert not load_recipe("tiny-dpo", ["dpo.loss_type=simpo"]).dpo.uses_reference
    kto = load_recipe("tiny-dpo", ["dpo.loss_type=apo_zero_unpaired", "dpo.rpo_alpha=0", "train.per_device_batch_size=1"])
    assert kto.data_kind == "kto" and kto.dpo.reference == "resident"  # unpaired APO-zero has no KL term: any batch


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(UserError, match="not a file, and not one of smollm2-135m-dpo, smollm2-135m-dpo-lora, tiny-dpo, tiny-sft"):
        load_recipe("tiny-sfx")


def test_one_loader_and_one_command_line_for_every_kind_of_recipe():
    from ray_zephyr.aif.config import AIFRecipe
    from ray_zephyr.cli import parse_recipe_args
    from ray_zephyr.evaluation.config import EvalRecipe

    assert shipped_recipes(AIFRecipe) == ["smollm2-135m-aif", "smollm2-135m-task-aif", "tiny-aif", "ultrafeedback-gpt4"]
    assert shipped_recipes(EvalRecipe) == ["mt-bench-gpt4"]
    aif = load_recipe("tiny-aif", ["generators.0.n=8"], AIFRecipe)
    assert isinstance(aif, AIFRecipe) and aif.generators[0].n == 8
    evaluation, _ = parse_recipe_args("eval", ["--config", "mt-bench-gpt4", "candidate.model=outputs/x/model"],
                                      kind=EvalRecipe)
    assert isinstance(evaluation, EvalRecipe) and evaluation.candidate.model == "outputs/x/model"
    with pytest.raises(UserError, match=r"eval recipe 'tiny-sft' not found: not a file, and not one of mt-bench-gpt4$"):
        load_recipe("tiny-sft", kind=EvalRecipe)
    with pytest.raises(UserError, match=r"unknown key 'candidate.modle' \(did you mean 'model'\?\)"):
        load_recipe("mt-bench-gpt4", ["candidate.modle=x"], EvalRecipe)


def test_the_iterative_recipe_resolves_each_rounds_aif_and_dpo_recipes(tmp_path):
    from ray_zephyr.iterative import IterativeRecipe, round_recipes

    assert shipped_recipes(IterativeRecipe) == ["smollm2-135m-iterative", "tiny-iterative"]
    recipe = load_recipe("tiny-iterative", [f"output_dir={tmp_path}", "reference=sft", "dpo_overrides=[train.lr=5e-4]"],
                         IterativeRecipe)
    aif, dpo = round_recipes(recipe, 2)
    assert aif.generators[0].model == str(tmp_path / "round-1" / "dpo" / "model") and aif.seed == 43
    assert aif.generators[1].kind == "function" and aif.output_dir == str(tmp_path / "round-2" / "aif")
    assert dpo.model.name_or_path == str(tmp_path / "round-1" / "dpo" / "model") and dpo.train.lr == 5e-4
    assert dpo.dpo.reference_model == "outputs/tiny-sft/model"  # reference=sft: the dSFT model in every round
    assert [s.path for s in dpo.data.train] == [str(tmp_path / "round-2" / "aif" / "pairs.parquet")]
    assert round_recipes(recipe, 1)[1].dpo.reference_model is None  # round 1 starts from the dSFT model itself
    with pytest.raises(UserError, match=r"policy_generator 'teacher' is of kind function: the policy must be a model"):
        round_recipes(recipe.model_copy(update={"policy_generator": "teacher"}), 1)
    with pytest.raises(UserError, match=r"train.padding_free on GPU needs model.attn_implementation=flash_attention_2"):
        load_recipe("zephyr-7b-beta-sft", ["train.padding_free=true"])  # sdpa would build an L x L mask per layer
    assert load_recipe("zephyr-7b-beta-sft", ["train.padding_free=true",
                                              "model.attn_implementation=flash_attention_2"]).train.padding_free
    with pytest.raises(UserError, match=r"dpo.reference_model with model.lora: a LoRA run's reference is its base"):
        load_recipe("tiny-dpo", ["dpo.reference_model=outputs/x/model", "model.lora={r: 8}"])


def test_cli_prints_one_line_error_and_exits_2():
    result = subprocess.run(
        [sys.executable, "jobs/preview.py", "--config", "tiny-sft", "train.lrr=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: command line (train.lrr=1): unknown key 'train.lrr' (did you mean 'lr'?); valid keys in 'train': "
        + ", ".join(__import__("ray_zephyr.config", fromlist=["TrainConfig"]).TrainConfig.model_fields)
    ]


def test_trl_names_point_to_ours_and_command_line_errors_say_so(tmp_path):
    with pytest.raises(UserError, match=r"^command line \(train.learning_rate=1e-5\): unknown key 'train.learning_rate' "
                                        r"\(TRL's learning_rate; here: train.lr\)"):
        load_recipe("tiny-sft", ["train.learning_rate=1e-5"])
    with pytest.raises(UserError, match=r"\(TRL's per_device_train_batch_size; here: train.per_device_batch_size\)"):
        load_recipe("tiny-sft", ["train.per_device_train_batch_size=4"])
    with pytest.raises(UserError, match=r"^command line \(train.epochs=two\): train.epochs: expected integer"):
        load_recipe("tiny-sft", ["train.epochs=two"])
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(Path(str(recipe_file("tiny-sft"))).read_text().replace("  epochs: 3", "  num_train_epochs: 3"))
    with pytest.raises(UserError, match=rf"^{recipe}: unknown key 'train.num_train_epochs' \(TRL's num_train_epochs; "
                                        r"here: train.epochs\)"):
        load_recipe(str(recipe), ["seed=1"])  # the typo is in the file, not in the override
    with pytest.raises(UserError, match=r"tiny-sft.yaml with data.shuffle=false, data.eval_fraction=2: data: eval_fraction"):
        load_recipe("tiny-sft", ["data.shuffle=false", "data.eval_fraction=2", "seed=1"])  # a check of the section
