"""Which engine serves a folder: `load_engine` builds the one the settings name.

Apart from `engine.py` (the interface), so that the engines, which import the interface, are imported by
nothing they import. vLLM itself is imported only when its engine is built (an optional extra).
"""

from __future__ import annotations

from pathlib import Path

from ray_zephyr.errors import UserError
from ray_zephyr.lora import ADAPTER_CONFIG
from ray_zephyr.models import resolve_model_path
from ray_zephyr.serving.engine import Engine
from ray_zephyr.serving.settings import ServeSettings
from ray_zephyr.serving.transformers_engine import TransformersEngine
from ray_zephyr.serving.vllm_engine import VLLMEngine


def load_engine(settings: ServeSettings) -> Engine:
    """Build the configured engine. A local folder holds a Hugging Face model, or a LoRA adapter (peft format)
    that names its base model; a hub id is handed to the engine, which downloads it."""
    model_dir = resolve_model_path(settings.model)
    if Path(model_dir).exists() and not any((Path(model_dir) / name).is_file() for name in ("config.json", ADAPTER_CONFIG)):
        raise UserError(f"model {model_dir!r} is not a Hugging Face model folder nor a LoRA adapter folder (no "
                        f"config.json or {ADAPTER_CONFIG} in it)")
    if settings.engine == "vllm":
        return VLLMEngine(model_dir, settings.vllm_engine_args)
    return TransformersEngine(model_dir, max_batch_rows=settings.max_batch_rows)
