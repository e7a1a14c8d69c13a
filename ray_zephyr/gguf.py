"""GGUF model files (llama.cpp's format) as model sources: dequantized once per node into a Hugging Face folder.

A model given as a `.gguf` file, or as a folder holding one and no `config.json`, is checked here before any
compute (missing, truncated or not GGUF: a one-line error naming the file) and converted into the project's
model cache, keyed by the file's path, size and mtime; later uses on the node read that folder. transformers
dequantizes GGUF on load, but the model it returns refuses `save_pretrained` ("quantized with gguf and is not
serializable"), so its weights are copied into a model built from the same config without the quantization
config, which saves as an ordinary fp32 folder that ZeRO-3, vLLM and Serve all load.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import uuid
from pathlib import Path

from ray_zephyr.errors import UserError

MAGIC = b"GGUF"


def gguf_file(path: str) -> Path | None:
    """The GGUF file `path` names: itself if it ends in .gguf, the one in it if it is a folder with a .gguf and no
    config.json; None for anything else (an HF folder, a hub id)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = sorted(p.glob("*.gguf"))
    if len(found) > 1:
        raise UserError(f"{path} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}): name one")
    return found[0] if found else None


def check_gguf(file: Path, key: str = "model") -> None:
    """A one-line error unless `file` is a complete GGUF file: the magic, a readable header, every tensor's data
    inside the file (the reader maps each tensor: a truncated download fails here, not halfway through loading)."""
    if not file.is_file():
        raise UserError(f"{key} {str(file)!r} does not exist")
    with file.open("rb") as f:
        if f.read(4) != MAGIC:
            raise UserError(f"{key} {str(file)!r} is not a GGUF file (it does not start with {MAGIC!r})")
    stat = file.stat()
    problem = _read_problem(str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if problem:
        raise UserError(f"{key} {str(file)!r} {problem}")


@functools.lru_cache(maxsize=16)
def _read_problem(file: str, size: int, mtime_ns: int) -> str | None:
    """What is wrong with the file's header or tensor table, or None; once per file version and process (reading
    the header of a 100 MB file takes seconds, and a job resolves its model several times)."""
    try:
        import gguf
    except ImportError:
        return "is a GGUF file, which needs the gguf package: pip install gguf"
    try:
        tensors = gguf.GGUFReader(file).tensors
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError or OSError
        return f"is not a readable GGUF file (truncated or damaged: {str(exc).splitlines()[0]}); download it again"
    return None if tensors else "holds no tensors: it is not a model"


def cache_folder(file: Path) -> Path:
    """Where this node keeps `file` dequantized: a new size or mtime (the file rewritten) is a new folder."""
    from ray_zephyr.storage import cache_root

    stat = file.resolve().stat()
    key = hashlib.sha256(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    return cache_root() / f"gguf-{key}"


def dequantized(file: Path) -> Path:
    """An HF folder (fp32 weights, tokenizer with the file's chat template) holding `file`'s model, converted
    once per node; a file lock makes the other workers on the node wait for the first one's conversion."""
    from filelock import FileLock

    folder = cache_folder(file)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if (folder / "config.json").is_file():
            return folder
        staging = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            convert(file, staging)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def convert(file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_zephyr.train.deepspeed_setup import save_pretrained_quietly

    quantized = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # what makes save_pretrained refuse
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    save_pretrained_quietly(model, out)
    AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(out)
