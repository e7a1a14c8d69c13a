"""Where models come from: a name or path becomes a local Hugging Face folder, and its tokenizer is loaded.

`embedded` is the toy model (made on first use in the project's cache), a URI (`s3://...`) this node's cached
copy (see `ray_zephyr.storage`), a `.gguf` file (or a folder holding one) this node's dequantized copy (see
`ray_zephyr.gguf`); a local folder or a hub id is passed through to transformers. Anything else (a path that does
not exist here, a bad GGUF file) is a one-line error before anything is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ray_zephyr import gguf, storage
from ray_zephyr.chat_template import check_trainable_template, set_chat_template
from ray_zephyr.config import Recipe
from ray_zephyr.embedded import MODEL_VERSION, save_embedded_model
from ray_zephyr.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # owner/name, or a bare legacy name (gpt2)


def embedded_model_dir() -> Path:
    return Path.home() / ".cache" / "ray_zephyr" / MODEL_VERSION


def check_model_source(name: str, key: str = "model") -> None:
    """A model that is none of `embedded`, a complete URI, an existing path or a hub id is a one-line error, before
    anything is loaded (every job that takes a model calls this, through `resolve_model_path`)."""
    if storage.is_uri(name):
        storage.check_complete(name)
        return
    gguf_file = gguf.gguf_file(name)
    if gguf_file is not None:
        gguf.check_gguf(gguf_file, key)
        return
    if name == "embedded" or Path(name).exists():
        return
    if not HUB_ID.match(name):
        hint = " (run jobs/sft.py first: it writes <output_dir>/model)" if name.rstrip("/").endswith("model") else ""
        raise UserError(f"{key} {name!r} does not exist{hint}")


def resolve_model_path(name_or_path: str, key: str = "model") -> str:
    """A local folder for `embedded`, a URI or a GGUF file; a local folder or a hub id as given (checked first;
    `key` names the setting in the error)."""
    check_model_source(name_or_path, key)
    if name_or_path == "embedded":
        return str(save_embedded_model(embedded_model_dir()))
    local = storage.local_copy(name_or_path)
    gguf_file = gguf.gguf_file(local)
    if gguf_file is not None:
        if local != name_or_path:
            gguf.check_gguf(gguf_file, key)  # a downloaded folder's file, checked once it is here
        return str(gguf.dequantized(gguf_file))
    return local


def _token_hint(exc: BaseException) -> str:
    """What to do when the hub refused a gated or private model (401/403): every node needs a token."""
    text = str(exc)
    if "gated repo" in text or "401 Client Error" in text or "403 Client Error" in text:
        return (" (a gated or private model: set HF_TOKEN, on every node, to a token of an account that accepted its "
                "licence; cluster/README.md shows how)")
    return ""


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The model's tokenizer with the recipe's chat template; a pad token if it has none."""
    from transformers import (
        AutoTokenizer,  # here: checking a model source needs no transformers (jobs check first)
    )

    source = recipe.model.tokenizer or recipe.model.name_or_path
    name = resolve_model_path(source, "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer {name!r}: {str(exc).splitlines()[0]}{_token_hint(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_chat_template(tokenizer, recipe.data.chat_template)
    if recipe.stage == "sft":
        check_trainable_template(tokenizer)
    return tokenizer
