"""The parts of serving that need no model: request validation, settings and Serve configs, the
vLLM request mapping (vLLM itself runs in tests/test_vllm_serve.py), and stop-sequence streaming
(sampling: tests/test_serve_sampling.py)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ray_zephyr.serving.decoding import find_stop, safe_end
from ray_zephyr.serving.engine import Sampling
from ray_zephyr.serving.protocol import OpenAIError, parse_request
from ray_zephyr.serving.settings import REPLICA_ENV, ServeSettings
from ray_zephyr.serving.vllm_engine import finish_reason, sampling_params_kwargs

ROOT = Path(__file__).resolve().parents[1]


def _parse(**fields):
    return parse_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode())


def test_request_defaults_and_normalisation():
    request = _parse(stop="END", max_completion_tokens=7, max_tokens=3,
                     messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                               {"role": "assistant", "content": "c", "name": "bot"},
                               {"role": "user", "content": "d"}])
    assert request.stop == ["END"] and request.token_limit == 7
    assert [m.content for m in request.messages] == ["be brief", "ab", "c", "d"]
    assert (request.temperature, request.top_p, request.n, request.stream, request.include_usage) == (1.0, 1.0, 1, False, False)
    assert _parse(stream=True, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize("fields, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "s"}]}, "messages[1].role"),
    ({"messages": [{"role": "tool", "content": "t"}]}, "messages[0].role"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"logprobs": True}, "logprobs"),
    ({"model": None}, "model"),
])
def test_bad_requests_name_the_param(fields, param):
    with pytest.raises(OpenAIError) as caught:
        _parse(**fields)
    assert caught.value.status == 400
    body = caught.value.body()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error" and param in body["message"]


def test_vllm_sampling_params_mapping():
    sampling = Sampling(max_tokens=32, temperature=0.7, top_p=0.9, n=3, stop=("\n\n", "</s>"), seed=5,
                        frequency_penalty=0.5, presence_penalty=-1.0, logit_bias=((7, 2.0),))
    assert sampling_params_kwargs(sampling) == {
        "n": 3, "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n", "</s>"], "seed": 5,
        "frequency_penalty": 0.5, "presence_penalty": -1.0, "logit_bias": {7: 2.0},
        "include_stop_str_in_output": False, "skip_special_tokens": True,
    }
    assert [finish_reason(r) for r in (None, "stop", "length")] == [None, "stop", "length"]
    with pytest.raises(OpenAIError) as aborted:  # an aborted answer is not a finished one
        finish_reason("abort")
    assert aborted.value.status == 503 and aborted.value.error.code == "aborted"


def test_developer_is_system_and_neutral_values_of_unsupported_fields_pass():
    request = _parse(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
                     response_format={"type": "text"}, tools=[], logprobs=False, tool_choice=None, user="u1")
    assert [m.role for m in request.messages] == ["system", "user"]


def test_settings_defaults_suit_a_7b_model_on_one_gpu_per_replica():
    options = ServeSettings().deployment_options()
    assert (options["health_check_period_s"], options["health_check_timeout_s"]) == (10, 30)
    assert options["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1, "runtime_env": {"env_vars": REPLICA_ENV}}
    # a replica takes what vLLM batches at once (its max_num_seqs), and Serve scales out at half of that
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 128,
                                             "upscale_delay_s": 30, "downscale_delay_s": 300}
    assert options["max_ongoing_requests"] == 256
    tuned = ServeSettings(vllm_engine_args={"max_num_seqs": 512})
    assert (tuned.max_ongoing_requests, tuned.target_ongoing_requests) == (512, 256)
    cpu = ServeSettings(engine="transformers", max_batch_rows=16)  # the CPU engine: its own batch bound
    assert (cpu.max_ongoing_requests, cpu.target_ongoing_requests) == (16, 8)
    assert ServeSettings(engine="transformers").num_gpus == 0  # the CPU engine holds no GPU by default
    assert ServeSettings(model="/x/zephyr-7b").served_name() == "zephyr-7b"
    assert ServeSettings(model="outputs/tiny-dpo/model").served_name() == "tiny-dpo"


@pytest.mark.parametrize("bad", [
    {"min_replicas": 3, "max_replicas": 2},
    {"target_ongoing_requests": 100, "max_ongoing_requests": 10},
    {"engine": "vllm", "num_gpus": 0},  # on CPU vLLM needs kv_cache_memory_bytes
    {"engine": "vllm", "num_gpus": 1, "vllm_engine_args": {"tensor_parallel_size": 2}},  # 2 ranks on 1 GPU
    {"engine": "transformers", "num_gpus": 1},  # it decodes on CPU: the GPU would sit idle
    {"engine": "tgi"},
    {"max_replicas": "many"},
    {"replicas": 2},
])
def test_settings_reject_nonsense(bad):
    with pytest.raises(ValidationError):
        ServeSettings(**bad)


def test_vllm_on_cpu_is_allowed_with_its_kv_cache_size():
    settings = ServeSettings(engine="vllm", num_gpus=0, vllm_engine_args={"kv_cache_memory_bytes": 1 << 30})
    assert settings.deployment_options()["ray_actor_options"]["num_gpus"] == 0


@pytest.mark.parametrize("name", ["config.yaml", "config.gpu.yaml"])
def test_serve_config_files_are_valid(name):
    from ray.serve.schema import ServeDeploySchema

    from ray_zephyr.serving.app import build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / name).read_text()))
    app = config.applications[0]
    assert app.import_path == "serve.app:build_app"
    module, _, attribute = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attribute) is build_app  # the shim serve/app.py re-exports it
    settings = ServeSettings.model_validate(app.args)
    if name == "config.yaml":
        assert config.http_options.host == "127.0.0.1"
        assert (settings.engine, settings.num_gpus) == ("transformers", 0)
    else:
        assert (settings.engine, settings.num_gpus) == ("vllm", 1)


@pytest.mark.parametrize("text, stop, sendable", [
    ("hello wor", ("world",), "hello "),  # 'wor' may still become the stop sequence
    ("hello wx", ("world",), "hello wx"),
    ("abc", (), "abc"),
    ("caf\ufffd", (), "caf"),  # half a UTF-8 character waits for the rest
    ("a##", ("###",), "a"),
])
def test_safe_end_holds_back_what_may_become_a_stop(text, stop, sendable):
    assert text[:safe_end(text, stop)] == sendable


def test_find_stop_takes_the_earliest():
    assert find_stop("one. two! three", ("!", ".")) == 3
    assert find_stop("nothing", ("!",)) is None


def test_a_model_that_does_not_exist_is_one_line_before_any_replica_starts():
    from ray_zephyr.errors import UserError
    from ray_zephyr.serving.app import build_app

    with pytest.raises(UserError, match=r"^model 'outputs/nope/model' does not exist \(run jobs/sft.py first"):
        build_app(ServeSettings(model="outputs/nope/model"))
