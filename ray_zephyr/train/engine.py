"""DeepSpeed from the recipe: the config, the model loaded partitioned, the engine, the consolidated save.

Everything here works in any process with torch.distributed initialised (a Ray Train worker, or one
process with world size 1 for benchmarks), so the training step does not depend on Ray.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch

from ray_zephyr.config import Recipe, TrainConfig
from ray_zephyr.errors import UserError
from ray_zephyr.train.losses import TokenScorer


def grad_accumulation_steps(train: TrainConfig) -> int:
    """global_batch_size = per_device_batch_size x num_workers x accumulation steps, exactly."""
    per_step = train.per_device_batch_size * train.num_workers
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of per_device_batch_size x "
            f"num_workers = {train.per_device_batch_size} x {train.num_workers} = {per_step}; change one of them"
        )
    return train.global_batch_size // per_step


def deepspeed_config(train: TrainConfig, training: bool = True) -> dict:
    """The DeepSpeed config: bf16 on GPU, fp32 on CPU; ZeRO stage and offload as the recipe says.

    `training=False` gives the config of a frozen engine (the resident DPO reference): no optimizer, and
    parameters partitioned only under ZeRO-3.
    """
    zero: dict = {"stage": train.zero_stage if training or train.zero_stage == 3 else 0}
    if train.zero_stage == 3:
        zero |= {"stage3_param_persistence_threshold": 0 if train.offload_params else 10_000}
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
            # DeepSpeed picks its fused CUDA Adam on GPU and its CPU Adam with offload; plain torch AdamW otherwise.
            torch_adam = not train.use_gpu and not train.offload_optimizer
            params = {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay}
            config["optimizer"] = {"type": "AdamW", "params": params | ({"torch_adam": True} if torch_adam else {})}
        else:  # rmsprop: a torch optimizer handed to DeepSpeed (see build_engine)
            config["zero_allow_untested_optimizer"] = True
            config["zero_force_ds_cpu_optimizer"] = False
    return config


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    return math.ceil(total_steps * train.warmup_ratio)


def scheduler_factory(train: TrainConfig, total_steps: int):
    """The lr schedule (transformers' cosine/linear/constant with warmup), built by DeepSpeed on its optimizer."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train.lr_scheduler]
    return lambda optimizer: get_scheduler(name, optimizer, warmup_steps(train, total_steps), total_steps)


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


def load_causal_lm(recipe: Recipe, model_path: str, use_gpu: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    m = recipe.model
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=m.revision,
            dtype=torch.bfloat16 if use_gpu else torch.float32,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load model {model_path!r}: {str(exc).splitlines()[0]}") from None


def build_engine(recipe: Recipe, model_path: str, total_steps: int):
    """The policy engine: model loaded (partitioned under ZeRO-3), optimizer and schedule from the recipe."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if recipe.train.use_gpu else "gloo")  # wraps torch's group
    train = recipe.train
    config = deepspeed_config(train)
    with zero3_loading(config):
        lm = load_causal_lm(recipe, model_path, train.use_gpu)
        if recipe.model.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
        model = TokenScorer(lm)
        optimizer = None
        if train.optimizer == "rmsprop":
            optimizer = torch.optim.RMSprop(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            optimizer=optimizer,
            lr_scheduler=scheduler_factory(train, total_steps),
            config=config,
        )
    return engine


def build_reference(recipe: Recipe, model_path: str):
    """A frozen copy of the starting model as a DeepSpeed inference engine (partitioned under ZeRO-3)."""
    import deepspeed

    config = deepspeed_config(recipe.train, training=False)
    with zero3_loading(config):
        model = TokenScorer(load_causal_lm(recipe, model_path, recipe.train.use_gpu)).eval().requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def save_hf_model(engine, tokenizer, dest: str, rank: int, before_last_file=None) -> None:
    """Gather the weights parameter by parameter (ZeRO-3) and publish a consolidated Hugging Face folder from
    rank 0 at `dest` (a local path or a URI): config, safetensors (parameters and persistent buffers),
    generation config and the tokenizer with its chat template. It is written to a local folder first and
    then published whole (`storage.publish_dir`), so a crash mid-save leaves nothing a later job would load."""
    import tempfile

    import deepspeed

    from ray_zephyr.storage import publish_dir

    lm = engine.module.lm
    zero3 = engine.zero_optimization_partition_weights()
    state = {}
    for name, param in lm.named_parameters():
        with deepspeed.zero.GatheredParameters([param]) if zero3 else nullcontext():
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank != 0:
        return
    persistent = set(lm.state_dict().keys())  # buffers are not partitioned; non-persistent ones are not saved
    state |= {name: buffer.detach().to("cpu", copy=True) for name, buffer in lm.named_buffers() if name in persistent}
    with tempfile.TemporaryDirectory() as folder:
        lm.config.use_cache = True
        lm.save_pretrained(folder, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        publish_dir(folder, dest, before_last_file=before_last_file)


def init_single_process(backend: str | None = None) -> None:
    """torch.distributed with world size 1, for driving the training step without Ray (benchmarks, tests)."""
    import os
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
