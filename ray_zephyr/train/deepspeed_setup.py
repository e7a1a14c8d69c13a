"""DeepSpeed from the recipe: the config, the model loaded partitioned, the engine, the consolidated save.

Everything here works in any process with torch.distributed initialised (a Ray Train worker, or one
process with world size 1 for benchmarks), so the training step does not depend on Ray.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import warnings
from contextlib import contextmanager, nullcontext

import torch

from ray_zephyr import lora
from ray_zephyr.config import Recipe, TrainConfig
from ray_zephyr.errors import UserError
from ray_zephyr.models import resolve_model_path
from ray_zephyr.train.scoring import TokenScorer

# What DeepSpeed 0.19 says in every run that asks nothing of the user, hidden (see `import_deepspeed`): its own
# calls of torch.distributed functions torch 2.13 renamed (a FutureWarning per collective, hundreds per run); "Setting
# accelerator to CPU" (on CPU, what the recipe asked for); and that ZeRO-3 cannot see the tensors inside the
# `TokenStats` our TokenScorer returns: its hooks there would gather the TokenScorer's own parameters, and it has
# none (they all sit in the wrapped model's modules, which return tensors; gradients equal TRL's, see the tests).
_TORCH_RENAMES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
_DEEPSPEED_NOTES = ("Setting accelerator to CPU", "unknown inputs or outputs type (<class 'ray_zephyr.train.scoring")


def _not_a_deepspeed_note(record: logging.LogRecord) -> bool:
    return not any(note in record.getMessage() for note in _DEEPSPEED_NOTES)


def import_deepspeed():
    """`deepspeed`, imported without MLflow: DeepSpeed's autotuner imports mlflow whenever it is installed (1.3 s of
    every training worker's start on 2 cores) only to log autotuning trials, and we never autotune. MLflow itself
    stays importable: our tracker (`train.report_to: [mlflow]`) imports it when a recipe asks. DeepSpeed's
    notes that ask nothing of the user (above) are hidden."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    warnings.filterwarnings("ignore", message=_TORCH_RENAMES, category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_not_a_deepspeed_note)  # a filter outlives DeepSpeed's logger setup
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner handles
    try:
        import deepspeed
    finally:
        if hide:
            del sys.modules["mlflow"]
    return deepspeed


def save_pretrained_quietly(model, folder) -> None:
    """`model.save_pretrained(folder)` in a process that has not imported DeepSpeed (a job's driver saving the
    embedded model or a dequantized GGUF into a fresh node's cache): transformers imports DeepSpeed there when it is
    installed (accelerate's unwrap looks for its engine), which would announce "Setting accelerator to CPU", and
    draws a bar for a one-shard save. Imported our way, and without the bar, the save says nothing."""
    from transformers.utils import logging as hf_logging

    import_deepspeed()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def init_distributed(backend: str) -> None:
    """DeepSpeed's communication over torch's process group. On CPU (gloo) DeepSpeed would first compile its
    shared-memory op with the system compiler (~45 s of both cores of a 2-core machine, once per machine and
    environment; ~1 min for a laptop's first run), which only its inference kernels' all-reduce uses: training's
    collectives go through torch.distributed. Marked incompatible, it is not built."""
    deepspeed = import_deepspeed()
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def grad_accumulation_steps(train: TrainConfig) -> int:
    """global_batch_size = per_device_batch_size x num_workers x accumulation steps, exactly."""
    per_step = train.per_device_batch_size * train.num_workers
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of per_device_batch_size x "
            f"num_workers = {train.per_device_batch_size} x {train.num_workers} = {per_step}; change one of them"
        )
    return train.global_batch_size // per_step


def deepspeed_config(train: TrainConfig, training: bool = True, hidden_size: int | None = None) -> dict:
    """The DeepSpeed config: bf16 on GPU, fp32 on CPU; ZeRO stage and offload as the recipe says.

    `training=False` gives the config of a frozen engine (the resident DPO reference): no optimizer, and
    parameters partitioned only under ZeRO-3. With the model's `hidden_size`, ZeRO-3's buffers are sized as the HF
    Trainer's "auto" sizes them (what TRL and the handbook's runs use): DeepSpeed's own defaults (a 500M-element
    reduce bucket, 2 GB in fp32) are sized for billions of parameters and made a 135M model's step take 1.5x the
    memory of TRL's (docs/benchmarks.md, real weights).
    """
    zero: dict = {"stage": train.zero_stage if training or train.zero_stage == 3 else 0}
    if train.zero_stage == 3:
        zero |= {"stage3_param_persistence_threshold": 0 if train.offload_params else 10 * (hidden_size or 1000)}
        if hidden_size:
            zero |= {"reduce_bucket_size": hidden_size * hidden_size,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size)}
        if train.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if training and train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    zero |= train.zero_options  # e.g. reduce_bucket_size, stage3_prefetch_bucket_size, overlap_comm
    config = {
        "train_micro_batch_size_per_gpu": train.per_device_batch_size,
        "gradient_accumulation_steps": grad_accumulation_steps(train),
        "train_batch_size": train.global_batch_size,
        "bf16": {"enabled": train.use_gpu},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if training:
        config["gradient_clipping"] = train.max_grad_norm
        if train.optimizer == "adamw":
            config["optimizer"] = {"type": "AdamW", "params": adamw_params(train)}
        else:  # rmsprop, paged_adamw: an optimizer handed to DeepSpeed (see client_optimizer)
            config["zero_allow_untested_optimizer"] = True
            config["zero_force_ds_cpu_optimizer"] = False
    return config


def adamw_params(train: TrainConfig) -> dict:
    """DeepSpeed's AdamW, with the implementation chosen so that none is compiled on a GPU node. Left to itself,
    DeepSpeed picks its FusedAdam on GPU, a CUDA op that PyPI's deepspeed ships as source and JIT-builds with nvcc
    at `deepspeed.initialize` (a GPU image need not have nvcc, or one matching its torch). torch's fused AdamW
    (`torch_adam` + `fused`) is a prebuilt CUDA kernel of the same update. With the optimizer offloaded, DeepSpeed's
    CPU Adam (a C++ op built with the node's compiler on first use) is the one ZeRO-Offload runs. On CPU, torch's
    plain AdamW: TRL's `adamw_torch`, so the parity tests compare the same update."""
    params = {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay}
    if train.offload_optimizer:
        return params
    return params | {"torch_adam": True} | ({"fused": True} if train.use_gpu else {})


def hidden_size(model_path: str) -> int | None:
    """The model's hidden size, from its config (an adapter's: its base's); None where it has none."""
    from transformers import AutoConfig

    folder = resolve_model_path(model_path)
    if lora.is_adapter(folder):
        folder = resolve_model_path(lora.adapter_base(folder))
    return getattr(AutoConfig.from_pretrained(folder), "hidden_size", None)


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    return math.ceil(total_steps * train.warmup_ratio)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The learning rate at `step` over its peak: a linear warmup, then transformers' cosine (half a cycle), linear
    or constant schedule. Written out rather than taken from `transformers.get_scheduler`, whose module imports
    peft and bitsandbytes (3 s of every training worker's start on 2 cores); tests/test_train_step.py checks it
    equals get_scheduler at every step."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))  # half a cycle, in transformers' order


def scheduler_factory(train: TrainConfig, total_steps: int):
    """The lr schedule of the recipe, built by DeepSpeed on its optimizer."""
    warmup = warmup_steps(train, total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, train.lr_scheduler, warmup=warmup, total=total_steps))


@contextmanager
def zero3_loading(config: dict):
    """Turn transformers' DeepSpeed switch on while a model loads and its engine is built, so ZeRO-3 partitions
    the weights as they load (deepspeed.zero.Init) and no process ever holds the whole model. The switch is
    process-global: it is turned off again so that later loads in the same process are ordinary."""
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    handle = HfDeepSpeedConfig(config)  # noqa: F841 - transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def load_causal_lm(recipe: Recipe, model_path: str, use_gpu: bool, quantized: bool = True) -> torch.nn.Module:
    """The model at `model_path` (4-bit with `model.load_in_4bit` unless `quantized=False`); a LoRA adapter folder
    is loaded onto its base and merged into it (`ray_zephyr.lora.load_merged`)."""
    from transformers import AutoModelForCausalLM

    m = recipe.model
    four_bit = lora.four_bit_options(use_gpu) if quantized and m.load_in_4bit else {}

    def load(folder: str) -> torch.nn.Module:
        try:
            return AutoModelForCausalLM.from_pretrained(
                folder,
                revision=m.revision,
                dtype=torch.bfloat16 if use_gpu else torch.float32,
                attn_implementation=m.attn_implementation,
                trust_remote_code=m.trust_remote_code,
                **four_bit,
            )
        except (OSError, ValueError, ImportError) as exc:
            raise UserError(f"cannot load model {folder!r}: {str(exc).splitlines()[0]}") from None

    return lora.load_merged(model_path, load)


def client_optimizer(train: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """The optimizer DeepSpeed is handed, where it does not build its own (adamw).

    paged_adamw is the handbook's `paged_adamw_32bit`: bitsandbytes' PagedAdamW32bit, whose state lives in CUDA
    unified memory that pages to the host under memory pressure (on CPU, bitsandbytes runs it unpaged)."""
    if train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "paged_adamw":
        try:
            from bitsandbytes.optim import PagedAdamW32bit
        except ImportError:
            raise UserError("train.optimizer=paged_adamw needs bitsandbytes: pip install 'ray-zephyr[lora]'") from None
        return PagedAdamW32bit(params, lr=train.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=train.weight_decay)
    return None


def build_engine(recipe: Recipe, model_path: str, total_steps: int):
    """The policy engine: model loaded (partitioned under ZeRO-3), optimizer and schedule from the recipe; with
    `model.lora`, a LoRA adapter on the frozen model, and only the adapter is optimized."""
    deepspeed = import_deepspeed()

    init_distributed("nccl" if recipe.train.use_gpu else "gloo")  # wraps torch's group
    train = recipe.train
    config = deepspeed_config(train, hidden_size=hidden_size(model_path))
    zero3 = config["zero_optimization"]["stage"] == 3
    if zero3 and lora.is_adapter(resolve_model_path(model_path)):
        raise UserError(f"model.name_or_path {recipe.model.name_or_path!r} is a LoRA adapter, merged into its base as "
                        "it loads, which ZeRO-3's partitioned loading cannot do: use train.zero_stage=2, or start "
                        "from its merged folder (model.lora.merge=true writes <output_dir>/merged)")
    with zero3_loading(config):
        lm = load_causal_lm(recipe, model_path, train.use_gpu)
        if recipe.model.gradient_checkpointing:
            # LoRA under ZeRO-3 needs reentrant checkpointing, which TRL forces too (trl#2514)
            reentrant = zero3 and recipe.model.lora is not None
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        lm.config.use_cache = False
        if recipe.model.lora:
            lm = lora.add_adapter(lm, recipe.model.lora, lora.base_name(recipe.model.name_or_path, model_path), zero3,
                                  recipe.seed)
        model = TokenScorer(lm)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=client_optimizer(train, params),
            lr_scheduler=scheduler_factory(train, total_steps),
            config=config,
        )
    return engine


def build_reference(recipe: Recipe, model_path: str, policy=None):
    """A frozen copy of the starting model as a DeepSpeed inference engine (partitioned under ZeRO-3); for a LoRA
    run, the `policy` engine with its adapter switched off."""
    deepspeed = import_deepspeed()

    if recipe.model.lora:
        return lora.AdapterOff(policy, policy.module.lm)
    config = deepspeed_config(recipe.train, training=False, hidden_size=hidden_size(model_path))
    with zero3_loading(config):
        model = TokenScorer(load_causal_lm(recipe, model_path, recipe.train.use_gpu)).eval().requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def save_hf_model(engine, tokenizer, dest: str, rank: int, before_last_file=None) -> None:
    """Gather the weights parameter by parameter (ZeRO-3) and publish a consolidated Hugging Face folder from
    rank 0 at `dest` (a local path or a URI): config, safetensors (parameters and persistent buffers),
    generation config and the tokenizer with its chat template. For a LoRA run only the adapter is gathered and
    the folder holds it in peft's format, with the tokenizer. It is written to a local folder first and
    then published whole (`storage.publish_dir`), so a crash mid-save leaves nothing a later job would load."""
    import tempfile

    deepspeed = import_deepspeed()

    from ray_zephyr.storage import publish_dir

    lm = engine.module.lm
    adapter = lora.has_adapter(lm)
    zero3 = engine.zero_optimization_partition_weights()
    state = {}
    for name, param in lm.named_parameters():
        if adapter and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param]) if zero3 else nullcontext():
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as folder:
        if adapter:
            lora.save_adapter(lm, state, folder)
        else:
            persistent = set(lm.state_dict().keys())  # buffers are not partitioned; non-persistent ones are not saved
            state |= {n: b.detach().to("cpu", copy=True) for n, b in lm.named_buffers() if n in persistent}
            lm.config.use_cache = True
            lm.save_pretrained(folder, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        publish_dir(folder, dest, before_last_file=before_last_file)


def save_merged(recipe: Recipe, adapter_dir: str, tokenizer, dest: str) -> None:
    """Publish at `dest` the published adapter at `adapter_dir` merged into its base, unquantized (a QLoRA adapter
    merges into the bf16 base it was trained on in 4-bit), as an ordinary Hugging Face folder (`model.lora.merge`)."""
    import tempfile

    from ray_zephyr.storage import publish_dir

    model = load_causal_lm(recipe, adapter_dir, recipe.train.use_gpu, quantized=False)
    with tempfile.TemporaryDirectory() as folder:
        model.config.use_cache = True
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        publish_dir(folder, dest)


def init_single_process(backend: str | None = None) -> None:
    """torch.distributed with world size 1, for driving the training step without Ray (benchmarks, tests)."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return
    from ray_zephyr.runtime import free_ports

    port = free_ports()[0]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    init_distributed(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
