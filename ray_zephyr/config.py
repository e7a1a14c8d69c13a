"""Recipes: YAML files plus `key=value` overrides, validated into typed sections.

A recipe is found by path, or by name among the recipes shipped in `ray_zephyr/recipes/` (training; AIF and
evaluation recipes in its `aif/` and `eval/` folders), so it works from an installed package and from a
checkout sent with `ray job submit --working-dir`.
Unknown keys and wrong types are one-line errors that name the key and the valid choices.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ray_zephyr.errors import UserError

# Experiment trackers (ray_zephyr.tracking), the same three keys in training, AI-feedback and evaluation recipes
ReportTo = Annotated[list[Literal["tensorboard", "mlflow"]], Field(description=(
    "experiment trackers the job logs to (TRL's report_to), each an extra: pip install 'ray-zephyr[tensorboard]' / "
    "'[mlflow]'; training logs metrics.jsonl's lines (rank 0), the other jobs their summary"))]
RunName = Annotated[str | None, Field(description="the trackers' run name; default: output_dir's folder name")]
Project = Annotated[str | None, Field(description=(
    "the trackers' experiment (MLflow; MLFLOW_EXPERIMENT_NAME wins); default ray-zephyr"))]


class StrictSection(BaseModel):
    """The base of every recipe section, of every kind of recipe (training, AIF, evaluation): an unknown key or a
    wrong type is an error, not ignored or coerced, and a loaded recipe cannot be changed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # for a kind of recipe (its top-level section): where its shipped recipes live under recipes/ ("": there)
    shipped_folder: ClassVar[str] = ""


class SourceConfig(StrictSection):
    """One input of a data mixture."""

    path: str = Field(description='hub dataset id, local file or folder (jsonl/json/parquet), or "embedded"')
    split: str = Field("train", description=(
        "hub split; for local folders a file-name prefix; for embedded: train or test"))
    weight: float = Field(1.0, description=(
        "exactly round(weight x rows) of the source's rows are used, as in the handbook's mixer"))
    rows: int | None = Field(None, description="embedded only: how many rows to generate")
    revision: str | None = Field(None, description=(
        "hub only: a commit, tag or branch to pin the dataset to (as model.revision)"))
    format: Literal["auto", "messages", "text", "prompt_completion", "preference", "sharegpt", "alpaca", "unpaired"] = Field("auto", description=(
        "the rows' shape; auto: found from the first row's fields (docs/data.md lists each)"))
    columns: dict[str, str] = Field({}, description=(
        "the format's field name -> the field's name in these files, e.g. {prompt: question}"))

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {self.weight}")
        if self.rows is not None and self.path != "embedded":
            raise ValueError("rows is only for path: embedded")
        return self


class DataConfig(StrictSection):
    train: list[SourceConfig] = Field(description="the sources mixed into the training set")
    eval: list[SourceConfig] = Field([], description="held-out sources (besides eval_fraction)")
    eval_fraction: float = Field(0.0, description=(
        "rows of the train sources held out for eval (deterministic by seed)"))
    chat_template: str = Field("auto", description=(
        "auto (the tokenizer's own, Zephyr's if none), zephyr, smollm2 (SmolLM2-Instruct's own with the generation "
        "markers SFT needs), or a Jinja template"))
    add_bos: Literal["auto", "true", "false"] = Field("auto", description=(
        "true: every sequence starts with the tokenizer's BOS, as the original zephyr-7b-beta runs tokenized them; "
        "false: never; auto: as TRL 1.16 does (whatever the template or tokenizer gives)"))
    add_empty_system: bool = Field(False, description="insert an empty system turn when a conversation has none")
    max_length: int = Field(1024, description=(
        "tokens per sequence (SFT: whole conversation; DPO: prompt + completion)"))
    truncation_mode: Literal["keep_start", "keep_end"] = Field("keep_start", description=(
        "which end of a too-long sequence is kept (TRL's truncation_mode)"))
    max_prompt_length: int | None = Field(None, description=(
        "DPO: prompts cut to their last N tokens (the paper's 512); None: as TRL"))
    on_bad_row: Literal["fail", "skip"] = Field("fail", description=(
        "fail: stop at the first invalid row, naming file, row and reason; skip: drop it and count it by reason"))
    shuffle: bool = Field(True, description=(
        "a seeded shuffle of the training rows (an epoch's order is a function of seed and epoch)"))
    start_timeout_s: float = Field(3600.0, gt=0, description=(
        "the first batch may take this long (a cold autoscaling cluster first provisions nodes and pulls images; a "
        "progress line says what it waits for); then stall_timeout_s applies between batches"))
    stall_timeout_s: float = Field(600.0, gt=0, description=(
        "no batch for this long: fail with a message instead of hanging"))

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.train:
            raise ValueError("at least one train source is needed")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length), got {self.max_prompt_length}")
        return self

    @field_validator("add_bos", mode="before")
    @classmethod
    def _bool_as_text(cls, value: Any) -> Any:
        """YAML reads `add_bos: true` as a boolean."""
        return str(value).lower() if isinstance(value, bool) else value


class LoraConfig(StrictSection):
    """A LoRA adapter trained instead of the whole model (peft; `pip install ray-zephyr[lora]`)."""

    r: int = Field(16, ge=1, description="the adapter's rank")
    alpha: float = Field(16, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="the linear layers that get an adapter (peft's names), or all-linear")
    merge: bool = Field(False, description=(
        "also write <output_dir>/merged: the starting model with the adapter merged in"))


class ModelConfig(StrictSection):
    name_or_path: str = Field(description=(
        'hub id, local folder (a model, or a LoRA adapter: merged into its base), a .gguf file (or a folder holding '
        'one: dequantized once per node), a URI, or "embedded"'))
    tokenizer: str | None = Field(None, description="defaults to name_or_path")
    revision: str | None = Field(None, description="hub only: a commit, tag or branch of the model")
    trust_remote_code: bool = Field(False, description=(
        "run the model repository's own code (transformers' trust_remote_code)"))
    attn_implementation: str = Field("sdpa", description="transformers' attention: sdpa, eager or flash_attention_2")
    gradient_checkpointing: bool = Field(True, description=(
        "recompute activations in the backward (less memory, ~30% more compute)"))
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter on the frozen model")
    load_in_4bit: bool = Field(False, description="QLoRA: the frozen model in 4-bit NF4 (bitsandbytes); needs lora")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.load_in_4bit and self.lora is None:
            raise ValueError("load_in_4bit trains a LoRA adapter on 4-bit weights: set model.lora too")
        return self


class TrainConfig(StrictSection):
    output_dir: str = Field(description=(
        "model, metrics, sample audit: a local folder, or a URI (s3://, gs://, abfss://, ...)"))
    storage_path: str | None = Field(None, description=(
        "Ray Train checkpoints: local folder or URI; default output_dir/ray"))
    staging_dir: str | None = Field(None, description=(
        "a local folder on every node for what is written before it is uploaded (each rank's ZeRO checkpoint state, "
        "~44 GB per 8-GPU node at 7B, and the model being published): a large local disk, not the container's "
        "/tmp; none: TMPDIR, else /tmp"))
    shared_filesystem: bool = Field(False, description=(
        "a local output_dir is mounted on every node (e.g. KubeRay's shared volume)"))
    resume: Literal["auto", "fresh"] = Field("auto", description=(
        "auto: resume matching checkpoints; fresh: delete them, start over"))
    report_to: ReportTo = []
    run_name: RunName = None
    project: Project = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field("PACK", description=(
        "of the workers over nodes"))
    padding_free: bool = Field(False, description=(
        "padding-free micro-batches: each one a single sequence of its rows' tokens"))
    group_by_length: bool = Field(False, description=(
        "order each global batch longest first, so micro-batches hold similar lengths"))
    num_workers: int = Field(1, ge=1, description="Ray Train workers, one GPU each with use_gpu")
    use_gpu: bool = Field(False, description="train on GPUs (NCCL); false: CPU over gloo")
    cpus_per_worker: int = Field(1, ge=1, description=(
        "CPUs each Ray Train worker reserves; Ray sets its OMP_NUM_THREADS (torch's CPU threads) to it, which "
        "CPU-offloaded Adam, the rank-0 merge and CPU training use"))
    epochs: int = Field(1, ge=1, description="passes over the training rows")
    max_steps: int = Field(-1, description="stop after this many optimizer steps; -1: epochs decide")
    global_batch_size: int = Field(8, ge=1, description="rows per optimizer step, over all workers")
    per_device_batch_size: int = Field(8, ge=1, description=(
        "rows per micro-batch on each worker; global_batch_size / (num_workers x this) is the gradient accumulation"))
    micro_batch_tokens: int | None = Field(None, ge=1, description=(
        "a token budget per micro-batch: each worker's per_device_batch_size x accumulation rows of a step are cut "
        "into micro-batches of at most this many tokens (train/rows.py) instead of per_device_batch_size rows each"))
    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description=(
        "the learning-rate schedule after warm-up"))
    warmup_ratio: float = Field(0.1, ge=0, le=1, description=(
        "share of the steps spent warming the learning rate up from 0"))
    optimizer: Literal["adamw", "rmsprop", "paged_adamw"] = Field("adamw", description=(
        "paged_adamw: bitsandbytes' PagedAdamW32bit"))
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    zero_stage: Literal[2, 3] = Field(3, description=(
        "DeepSpeed ZeRO stage: 3 partitions parameters, gradients and optimizer state; 2 only gradients and "
        "optimizer state"))
    zero_options: dict[str, int | float | bool] = Field({}, description=(
        "extra DeepSpeed zero_optimization keys (bucket sizes, ...)"))
    offload_optimizer: bool = Field(False, description="keep the optimizer state in CPU memory (DeepSpeed offload)")
    offload_params: bool = Field(False, description="keep the parameters in CPU memory (ZeRO-3 only)")
    log_every_steps: int = Field(10, ge=1, description=(
        "write train metrics to metrics.jsonl every this many steps (and at the last)"))
    eval_every_steps: int = Field(0, ge=0, description="0: only at the end")
    eval_on_start: bool = Field(False, description=(
        "also evaluate before the first step (the start model's eval loss and metrics: TRL's eval_on_start)"))
    checkpoint_every_steps: int = Field(0, ge=0, description=(
        "0: no mid-run checkpoints (the final model is always saved)"))
    max_failures: int = Field(3, ge=0, description=(
        "worker-group restarts Ray Train makes from the last checkpoint before the run fails"))


DPOLoss = Literal["sigmoid", "ipo", "hinge", "apo_zero", "apo_down", "simpo", "orpo", "kto", "apo_zero_unpaired"]
REFERENCE_FREE = ("simpo", "orpo")  # objectives of their own (TRL's CPO/SimPO and ORPO trainers): no reference model
UNPAIRED = ("kto", "apo_zero_unpaired")  # TRL's KTOTrainer: unpaired rows (prompt, completion, label)
OF_THEIR_OWN = REFERENCE_FREE + UNPAIRED  # objectives that do not mix with other loss types


class DPOConfig(StrictSection):
    beta: float = Field(0.1, gt=0, description=(
        "DPO's beta: how far the policy may move from the reference; SimPO's beta (its paper: 2 to 10); ORPO's "
        "lambda, the odds-ratio term's weight"))
    loss_type: DPOLoss | list[DPOLoss] = Field("sigmoid", description=(
        "sigmoid (DPO), ipo, hinge, apo_zero, apo_down, as TRL's DPOTrainer computes them, or a list of them mixed "
        "by loss_weights; simpo (TRL's CPOTrainer, loss_type simpo, cpo_alpha 0) or orpo (TRL's ORPOTrainer): "
        "reference-free, no reference pass; kto or apo_zero_unpaired (TRL's KTOTrainer): unpaired rows (prompt, "
        "completion, label; pairs are split into a desirable and an undesirable row), a resident reference"))
    loss_weights: list[float] | None = Field(None, description=(
        "one weight per loss_type entry (TRL's loss_weights); none: 1 each"))
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin (TRL's simpo_gamma)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO (sigmoid and simpo only)")
    desirable_weight: float = Field(1.0, gt=0, description=(
        "KTO's weight of the desirable rows' losses (TRL's desirable_weight; with unbalanced data, the KTO paper's "
        "eq. 8 bounds it)"))
    undesirable_weight: float = Field(1.0, gt=0, description="KTO's weight of the undesirable rows' losses")
    reference: Literal["precomputed", "resident"] = Field("precomputed", description=(
        "precomputed: the reference log-probs computed once before training, into the row file; resident: a frozen "
        "reference model beside the policy on every worker (kto's, always: unset, it is chosen); simpo and orpo use "
        "none (the job says so)"))
    reference_model: str | None = Field(None, description=(
        "the reference model, as model.name_or_path takes it; none: the starting model (iterative DPO's reference=sft "
        "keeps the dSFT model here while each round starts from the last)"))
    rpo_alpha: float = Field(0.0, ge=0, description=(
        "weight of an NLL term on the chosen answers (RPO); 0 = plain DPO"))

    @property
    def losses(self) -> list[tuple[str, float]]:
        """(loss type, weight) pairs."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        return list(zip(types, self.loss_weights or [1.0] * len(types), strict=True))

    @property
    def uses_reference(self) -> bool:
        return self.losses[0][0] not in REFERENCE_FREE

    @property
    def unpaired(self) -> bool:
        """KTO's objectives, trained on unpaired rows (`data.formats`: the `kto` formats)."""
        return self.losses[0][0] in UNPAIRED

    @model_validator(mode="before")
    @classmethod
    def _kto_reference(cls, values):
        """KTO's reference log-probs are computed during training: unset, `reference` is resident for it."""
        if isinstance(values, dict) and "reference" not in values:
            types = values.get("loss_type")
            first = types[0] if isinstance(types, list) and types else types
            if first in UNPAIRED:
                values = {**values, "reference": "resident"}
        return values

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if not types:
            raise ValueError("loss_type is an empty list: name at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} weights for {len(types)} loss types")
        own = [t for t in types if t in OF_THEIR_OWN]
        if own and len(types) > 1:
            raise ValueError(f"loss_type {own[0]} is an objective of its own and does not mix with other loss types; "
                             f"give it alone")
        free = [t for t in types if t in REFERENCE_FREE]
        kto_keys = sorted({"desirable_weight", "undesirable_weight"} & self.model_fields_set)
        if kto_keys and types[0] not in UNPAIRED:
            raise ValueError(f"{kto_keys[0]} is KTO's; loss_type is {', '.join(types)}")
        if types[0] in UNPAIRED and self.reference == "precomputed":
            raise ValueError(f"loss_type {types[0]} computes its reference log-probs during training (its KL term "
                             f"pairs each prompt with another completion of the same micro-batch, known only then): "
                             f"set dpo.reference=resident")
        if types[0] in UNPAIRED and self.rpo_alpha:
            raise ValueError(f"rpo_alpha adds an NLL term to paired objectives; loss_type is {types[0]}")
        if self.label_smoothing and types not in (["sigmoid"], ["simpo"]):
            raise ValueError(f"label_smoothing applies to sigmoid and simpo only, not to {', '.join(types)}")
        if "simpo_gamma" in self.model_fields_set and types != ["simpo"]:
            raise ValueError(f"simpo_gamma is SimPO's margin; loss_type is {', '.join(types)}")
        if free and self.reference == "resident":
            raise ValueError(f"loss_type {free[0]} uses no reference model: reference=resident would load one for "
                             f"nothing")
        if free and self.reference_model:
            raise ValueError(f"loss_type {free[0]} uses no reference model: remove reference_model")
        if types == ["orpo"] and self.rpo_alpha:
            raise ValueError("rpo_alpha adds an NLL term, and orpo has its own (weight 1); remove rpo_alpha")
        return self


class Recipe(StrictSection):
    stage: Literal["sft", "dpo"] = Field(description="which job runs it: sft (jobs/sft.py) or dpo (jobs/dpo.py)")
    seed: int = Field(42, description=(
        "seeds the data order, the hold-out, the mixture and the weights' initialisation of adapters"))
    model: ModelConfig = Field(description="the model to start from")
    data: DataConfig = Field(description="the training (and eval) data")
    train: TrainConfig = Field(description="how training runs")
    dpo: DPOConfig = Field(DPOConfig(), description="the DPO objective (dpo stage only)")

    @property
    def data_kind(self) -> str:
        """The rows this recipe trains on: sft (chats), dpo (pairs) or kto (unpaired rows, KTO's objectives)."""
        return "kto" if self.stage == "dpo" and self.dpo.unpaired else self.stage

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.model.load_in_4bit and self.train.zero_stage == 3:
            raise ValueError("model.load_in_4bit needs train.zero_stage=2: ZeRO-3 does not partition 4-bit weights "
                             "(each worker holds the 4-bit model; ZeRO-2 partitions the adapter's gradients and "
                             "optimizer state)")
        if self.train.use_gpu and self.train.padding_free and not self.model.attn_implementation.startswith("flash"):
            raise ValueError(f"train.padding_free on GPU needs model.attn_implementation=flash_attention_2 (its varlen "
                             f"kernel keeps the packed rows apart); with {self.model.attn_implementation}, transformers "
                             "builds a tokens x tokens mask of each packed micro-batch (16k tokens: 16k x 16k per "
                             "layer) and runs out of memory. Or use train.group_by_length=true instead")
        if self.data_kind == "kto" and self.dpo.losses[0][0] == "kto":
            if self.train.per_device_batch_size < 2:
                raise ValueError("loss_type kto needs train.per_device_batch_size >= 2: its KL term pairs each prompt "
                                 "with another completion of the same micro-batch (TRL's KTOTrainer asks the same)")
            if self.train.micro_batch_tokens:
                raise ValueError("loss_type kto pairs the rows of each micro-batch for its KL term: a token budget "
                                 "(train.micro_batch_tokens) can leave a row alone in one; remove it")
        if self.dpo.reference_model and self.model.lora:
            raise ValueError("dpo.reference_model with model.lora: a LoRA run's reference is its base model with the "
                             "adapter off; train without lora to use another reference")
        return self


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` (no dot) as a string; recipes mean a number, as in YAML 1.2."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


RECIPES_DIR = resources.files("ray_zephyr") / "recipes"
RecipeKind = TypeVar("RecipeKind", bound=StrictSection)  # a kind of recipe: Recipe, AIFRecipe, EvalRecipe


def _shipped_dir(kind: type[StrictSection]):
    return RECIPES_DIR / kind.shipped_folder if kind.shipped_folder else RECIPES_DIR


def shipped_recipes(kind: type[StrictSection] = Recipe) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _shipped_dir(kind).iterdir() if p.name.endswith(".yaml"))


def recipe_file(name_or_path: str, kind: type[StrictSection] = Recipe) -> Path:
    """A recipe path as given, else a shipped recipe of this kind by name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _shipped_dir(kind) / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    label = f"{kind.shipped_folder} recipe" if kind.shipped_folder else "recipe"
    names = ", ".join(shipped_recipes(kind))
    raise UserError(f"{label} {name_or_path!r} not found: not a file, and not one of {names}")


def load_recipe(name_or_path: str, overrides: Sequence[str] = (), kind: type[RecipeKind] = Recipe) -> RecipeKind:
    """The one loader of every kind of recipe (training `Recipe`, `AIFRecipe`, `EvalRecipe`): a file or a shipped
    name, `key=value` overrides applied to the YAML, validated into `kind`."""
    path = recipe_file(name_or_path, kind)
    try:
        raw = _yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: expected a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        error = _first_error(exc)
        where = _dotted(error["loc"])
        keys = {o.partition("=")[0]: o for o in overrides}
        given = next((o for k, o in keys.items() if where == k or where.startswith(k + ".")), None)
        # a section's own check (loc = the section, or the root) may come from the file or from overrides inside it
        inside = [o for k, o in keys.items() if not where or k.startswith(where + ".")]
        source = f"command line ({given})" if given else f"{path} with {', '.join(inside)}" if inside else str(path)
        raise UserError(f"{source}: {_describe(error, kind)}") from None


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the raw recipe; the value is parsed as YAML (1e-5, true, [..], {..})."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override {override!r} is not key=value (e.g. train.lr=1e-5)")
    try:
        value = _yaml(text)
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        index = int(part) if part.isdigit() else part
        try:
            child = node[index]
        except (KeyError, IndexError, TypeError):
            if isinstance(node, dict):
                child = node[index] = {}
            else:
                raise UserError(f"override {key!r}: {'.'.join(parts[: i + 1])} does not exist") from None
        node = child
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"override {key!r}: cannot set {last!r} inside a {type(node).__name__}")


def flatten(value, prefix: str = "") -> dict:
    """A recipe's dump as {dotted key: value}, to compare two runs key by key."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def changed_keys(saved: dict, current: dict) -> list[str]:
    """`key: old -> new` for every flat key whose value differs (what a refused resume names)."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def validate_recipe(raw: dict, source: str = "recipe", kind: type[RecipeKind] = Recipe) -> RecipeKind:
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {_describe(_first_error(exc), kind)}") from None


# TRL's TrainingArguments names a user brings along -> where the same setting lives in a training recipe
TRL_NAMES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "lr_scheduler_type": "train.lr_scheduler",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation = global_batch_size / (num_workers x "
                                   "per_device_batch_size))",
    "logging_steps": "train.log_every_steps", "eval_steps": "train.eval_every_steps",
    "eval_on_start": "train.eval_on_start",
    "save_steps": "train.checkpoint_every_steps", "model_name_or_path": "model.name_or_path",
    "max_seq_length": "data.max_length", "packing": "train.padding_free (padding-free batches)",
    "report_to": "train.report_to", "run_name": "train.run_name",
}


def _first_error(exc: ValidationError) -> dict:
    """The first error, its location without pydantic's union-member tags (`literal[...]`): keys only."""
    error = exc.errors()[0]
    return error | {"loc": tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))}


def _describe(error: dict, root: type[BaseModel] = Recipe) -> str:
    """One line for the first validation error: where, what, and what is allowed."""
    loc = error["loc"]
    where = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        section = _model_at(root, loc[:-1])
        fields = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if root is Recipe and (ours := TRL_NAMES.get(str(loc[-1]))):
            hint = f" (TRL's {loc[-1]}; here: {ours})"
        inside = f" in {_dotted(loc[:-1])!r}" if loc[:-1] else ""
        return f"unknown key {where!r}{hint}; valid keys{inside}: {', '.join(fields)}"
    if kind == "missing":
        return f"missing required key {where!r}"
    if kind == "literal_error":
        return f"{where}: {error['msg'].replace('Input should be', 'must be')}, got {error['input']!r}"
    if kind == "value_error":
        return f"{where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}"
    expected = error["msg"].replace("Input should be a valid ", "expected ").replace("Input should be ", "must be ")
    return f"{where}: {expected}, got {error['input']!r} ({type(error['input']).__name__})"


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section class that `loc` points into (list indices pass through to the item type)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        args = typing.get_args(annotation)
        current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None
