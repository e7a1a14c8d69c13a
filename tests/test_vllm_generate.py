"""AI-feedback generation with a generator of `kind: vllm`, run on CPU by vLLM's CPU build, through the real job.

Like tests/test_vllm_serve.py (whose import skips, or fails under .ci/vllm-check, without vLLM), these run
only in `.ci/vllm-check`'s virtualenv. The generator is our serving stack's vLLM engine in a Ray Data actor
(as on a GPU node, with num_gpus 0): n samples per request, finish reasons, a too-long prompt counted as a
drop instead of failing the pass. That a fresh vLLM engine draws the same seeded samples is checked in
tests/test_vllm_serve.py, on the replicas Serve starts in place of killed ones.
"""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from ray_zephyr.aif.config import AIFRecipe
from tests.test_vllm_serve import ENGINE_ARGS, vllm_model_dir  # noqa: F401 (a fixture; this import skips without vLLM)

pytestmark = pytest.mark.vllm
MAX_MODEL_LEN = 256
MAX_TOKENS = 8


def test_aif_job_generates_with_vllm_on_cpu(ray_session, vllm_model_dir, tmp_path):  # noqa: F811
    from ray_zephyr.aif.run import run_aif

    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "What is 3 plus 4? " * MAX_MODEL_LEN}) + "\n")
    recipe = AIFRecipe.model_validate({
        "prompts": [{"path": "embedded", "split": "train", "rows": 6}, {"path": str(long_prompt)}],
        "generators": [
            {"name": "vllm", "kind": "vllm", "model": str(vllm_model_dir), "n": 3, "max_tokens": MAX_TOKENS,
             "temperature": 1.0, "batch_size": 4, "num_gpus": 0,
             "vllm_engine_args": {"kv_cache_memory_bytes": 128 << 20, "max_model_len": MAX_MODEL_LEN,
                                  **ENGINE_ARGS}},
            {"name": "teacher", "kind": "function", "function": "ray_zephyr.embedded:teacher", "n": 1},
        ],
        "judge": {"kind": "function", "function": "ray_zephyr.embedded:verify"},
        "binarize": "zephyr",
        "output_dir": str(tmp_path / "aif"),
    })
    summary = run_aif(recipe)
    assert summary.prompts == 7 and summary.completions == {"vllm": 6 * 3, "teacher": 7}  # made; the failed one:
    assert summary.unrated == {"context_length_exceeded": 1}  # the long prompt: one counted drop, the pass went on
    assert summary.pairs == 6 and sum(summary.dropped_prompts.values()) == 1
    assert 6 * 3 <= summary.generated_tokens <= 6 * 3 * MAX_TOKENS

    table = pq.read_table(tmp_path / "aif" / "pairs.parquet").to_pylist()
    samples = [[c for c in row["completions"] if c["generator"] == "vllm"] for row in table]
    assert all(len(s) == 3 for s in samples)
    assert any(len({c["text"] for c in s}) > 1 for s in samples)  # n samples, not n copies
    for completion in (c for s in samples for c in s):
        assert completion["finish_reason"] in ("stop", "length") and 1 <= completion["tokens"] <= MAX_TOKENS
        assert completion["finish_reason"] == "stop" or completion["tokens"] == MAX_TOKENS

    # No vLLM process outlives its pass (on a GPU it would hold device memory that the next generator's engine
    # needs): Ray Data ends the actors without calling their UDF's __del__, and vLLM's engine core exits with
    # its parent process.
    deadline = time.monotonic() + 60
    while (left := _vllm_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left


def _vllm_processes() -> list[str]:
    import psutil

    names = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if command.startswith("VLLM::"):  # vLLM titles its engine-core and worker processes so
            names.append(command)
    return names

