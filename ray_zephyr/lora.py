"""LoRA and QLoRA with peft: the adapter added for training, 4-bit loading, adapter folders saved, loaded and merged.

peft (and bitsandbytes, for 4-bit) is an optional extra, `pip install 'ray-zephyr[lora]'`, imported only here and
only when a recipe or a served folder asks for it.

- Training: `add_adapter` injects LoRA layers in place into the causal LM (peft's `get_peft_model`, keeping its base
  model), so `TokenScorer` and DeepSpeed see an ordinary Hugging Face model whose only trainable parameters are the
  adapter's. The DPO reference of a LoRA run is that same model with the adapter switched off (`AdapterOff`), as TRL
  does with peft: no second model is held.
- Output: the adapter in peft's format (adapter_config.json + adapter_model.safetensors, with the tokenizer beside
  them), which names its base as the recipe did (`embedded`, a URI, a hub id, or an absolute path).
- Loading: a folder with adapter_config.json is loaded onto its base (itself possibly an adapter: DPO trained from the
  SFT adapter) and merged into it (peft's `merge_and_unload`), so every loader of a model folder also takes an
  adapter folder: training (the starting model, the precomputed reference), the merged output, the CPU engine.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ray_zephyr import gguf, storage
from ray_zephyr.config import LoraConfig
from ray_zephyr.errors import UserError
from ray_zephyr.models import resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'ray-zephyr[lora]'") from None
    return peft


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str:
    """The model an adapter folder was trained on, as its adapter_config.json names it."""
    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{Path(folder) / ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def adapter_rank(folder: str | Path) -> int:
    return int(json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["r"])


def load_merged(path: str, load_model: Callable[[str], nn.Module]) -> nn.Module:
    """The model at `path` (a name, folder or URI, as recipes take them) loaded by `load_model(local folder or hub
    id)`; an adapter folder is loaded onto its base, recursively, and merged into it."""
    folder = resolve_model_path(path)
    if not is_adapter(folder):
        return load_model(folder)
    base = load_merged(adapter_base(folder), load_model)
    return _peft().PeftModel.from_pretrained(base, folder).merge_and_unload()


def base_name(name_or_path: str, resolved: str) -> str:
    """How an adapter names its base so that every node finds it: `embedded`, a URI or a hub id as the recipe wrote
    it, a GGUF file (which each node dequantizes into its own cache) or a local folder by its absolute path."""
    if name_or_path == "embedded" or storage.is_uri(name_or_path) or not Path(resolved).exists():
        return name_or_path
    source = gguf.gguf_file(name_or_path)
    return str((source or Path(resolved)).resolve())


def four_bit_options(use_gpu: bool) -> dict:
    """`from_pretrained` keywords for QLoRA's frozen model: 4-bit NF4 computing in the training dtype, as the
    alignment-handbook loads it, placed on this worker's device (bitsandbytes quantizes as the weights arrive)."""
    try:
        import bitsandbytes  # noqa: F401 - transformers needs it to quantize
    except ImportError:
        raise UserError("model.load_in_4bit needs bitsandbytes: pip install 'ray-zephyr[lora]'") from None
    from transformers import BitsAndBytesConfig

    dtype = torch.bfloat16 if use_gpu else torch.float32
    device = torch.cuda.current_device() if use_gpu else "cpu"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": config, "device_map": {"": device}}


def add_adapter(lm: nn.Module, lora: LoraConfig, base: str, zero3: bool, seed: int) -> nn.Module:
    """`lm` with a fresh LoRA adapter injected in place (only its parameters trainable), naming `base` as its base.
    A 4-bit model is first prepared as peft prescribes (norms and embeddings kept in fp32). Under ZeRO-3 the adapter
    keeps the model's dtype, as TRL does (fp32 adapters beside bf16 weights break ZeRO-3's gathers, trl#6089);
    DeepSpeed keeps fp32 master weights of it either way. The adapter's random init is drawn from `seed`, so every
    worker (and every run of the recipe) starts from the same adapter."""
    peft = _peft()
    if getattr(lm, "is_loaded_in_4bit", False):
        lm = peft.prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)  # the engine enables it
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = peft.get_peft_model(lm, config, autocast_adapter_dtype=not zero3)
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = base
    return model.get_base_model()  # the same LM, LoRA layers inside; it keeps `peft_config`


def has_adapter(lm: nn.Module) -> bool:
    return bool(getattr(lm, "peft_config", None))


def save_adapter(lm: nn.Module, state: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Write the adapter of `lm` in peft's format into `folder`, from `state`: its trainable parameters by name
    (gathered from ZeRO partitions by the caller), so `PeftModel.from_pretrained(base, folder)` loads it."""
    peft = _peft()
    # save_embedding_layers=False: embeddings are never trained here, and "auto" would ask the hub about the base
    weights = peft.get_peft_model_state_dict(lm, state_dict=state, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in weights.items()}, str(Path(folder) / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = copy.copy(lm.peft_config[ADAPTER_NAME])
    config.inference_mode = True  # as peft saves it
    config.save_pretrained(str(folder))


class AdapterOff:
    """The resident DPO reference of a LoRA run: the policy's own forward with its adapter switched off, which is
    the starting model (the adapter only adds to the frozen weights), as TRL's DPO with peft does."""

    def __init__(self, policy, lm: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.policy = policy
        self.layers = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]

    def __call__(self, **inputs):
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            return self.policy(**inputs)
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)
