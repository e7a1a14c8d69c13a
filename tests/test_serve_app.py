"""The chat app on Ray Serve, bound to 127.0.0.1 with the tiny model, driven like a user would: the
official `openai` client (plain and streaming), raw HTTP for bad input, fuzzed bodies and the API key, a
bounded load test, autoscaling under load, and recovery after replicas are killed or stop answering
their health check. The bad-input table and the fuzz are shared with tests/test_vllm_serve.py
(tests/serving_helpers.py).

One app for the module, and no test relies on what another did to it: every test that kills or freezes a
replica waits until the service answers again, and the one scale-up happens in a fixture that every test
sending many requests at once takes, so it starts from one replica whatever order the tests run in."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from openai import OpenAI
from serving_helpers import (
    API_KEY,
    APP,
    BAD_REQUESTS,
    DEFAULT_MAX_TOKENS,
    HELLO,
    MAX_REQUEST_BYTES,
    MODEL,
    check_bad_request,
    check_fuzz,
    http_client,
    replica_actors,
    replica_pids,
    serve_on_loopback,
    wait_for_replacements,
)

from ray_zephyr.serving.settings import ServeSettings


@pytest.fixture(scope="module")
def base_url(ray_session, embedded_model_dir):
    settings = ServeSettings(
        model=str(embedded_model_dir), model_name=MODEL, engine="transformers", api_key=API_KEY, num_gpus=0,
        min_replicas=1, max_replicas=2, target_ongoing_requests=2, max_ongoing_requests=32,
        upscale_delay_s=0, downscale_delay_s=600, default_max_tokens=DEFAULT_MAX_TOKENS,
        max_request_bytes=MAX_REQUEST_BYTES, health_check_period_s=1, health_check_timeout_s=5,
        graceful_shutdown_timeout_s=2,
    )
    yield from serve_on_loopback(settings)


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def prompt_tokens(embedded_model_dir) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    text = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|user|>\nWhat is 2 plus 3?") and text.endswith("<|assistant|>\n")  # the folder's template
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_chat_completion_with_openai_client(client, prompt_tokens):
    first = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=2, seed=7, temperature=0.9)
    again = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=2, seed=7, temperature=0.9)

    assert first.object == "chat.completion" and first.model == MODEL and first.id.startswith("chatcmpl-")
    assert [c.index for c in first.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in first.choices)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]  # seeded
    assert first.choices[0].message.content != first.choices[1].message.content  # n samples, not n copies
    assert first.usage.prompt_tokens == prompt_tokens
    assert 2 <= first.usage.completion_tokens <= 16
    assert first.usage.total_tokens == prompt_tokens + first.usage.completion_tokens


def test_streaming_matches_the_plain_answer(client, prompt_tokens):
    request = dict(model=MODEL, messages=HELLO, max_tokens=10, n=2, seed=11, temperature=1.0)
    plain = client.chat.completions.create(**request)
    stream = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})

    texts, finish, usage, roles = ["", ""], [None, None], None, set()
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
            roles.add(choice.delta.role)
    assert texts == [c.message.content for c in plain.choices]
    assert finish == [c.finish_reason for c in plain.choices]
    assert "assistant" in roles
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{base_url}/health")  # open without a key: load balancers probe it
    assert health.status_code == 200 and health.json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_required(base_url, headers):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    for response in (httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers),
                     httpx.get(f"{base_url}/v1/models", headers=headers),
                     httpx.get(f"{base_url}/v1//models", headers=headers),  # no path trick gets around the key
                     httpx.get(f"{base_url}/openapi.json", headers=headers)):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_an_openai_error_body(base_url, case):
    check_bad_request(base_url, case)


@pytest.mark.usefixtures("scaled_up")
def test_fuzzed_requests_get_an_answer_or_a_4xx(base_url):
    check_fuzz(base_url, 200)


def test_fields_are_honoured(client, embedded_model_dir):
    """developer = system, the penalties change greedy text, logit_bias forces a token, and with no
    max_tokens the answer stops at `default_max_tokens`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    river = tokenizer("river", add_special_tokens=False)["input_ids"][0]
    ask = dict(model=MODEL, temperature=0, max_tokens=12)
    as_system = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."}, *HELLO], **ask)
    as_developer = client.chat.completions.create(messages=[{"role": "developer", "content": "Be brief."}, *HELLO],
                                                  **ask)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens

    plain = client.chat.completions.create(messages=HELLO, **ask).choices[0].message.content
    penalized = client.chat.completions.create(messages=HELLO, frequency_penalty=2, presence_penalty=2, **ask)
    assert len(set(plain)) == 1 and len(set(penalized.choices[0].message.content)) > 1  # greedy repeats itself

    forced = client.chat.completions.create(model=MODEL, messages=HELLO, logit_bias={str(river): 100}, seed=1,
                                            response_format={"type": "text"}, user="someone")
    assert forced.choices[0].message.content == tokenizer.decode([river] * DEFAULT_MAX_TOKENS)
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == DEFAULT_MAX_TOKENS


def _chat_body(i: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"What is {i % 10} plus 1?"}], "max_tokens": 8,
            "seed": i, "stream": i % 4 == 0}


async def _post_ok(http: httpx.AsyncClient, body: dict) -> int:
    """200 if the answer is whole (a finish reason, or the stream's [DONE]); else the status code."""
    response = await http.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        return response.status_code
    whole = b"data: [DONE]" in response.content if body["stream"] else response.json()["choices"][0]["finish_reason"]
    return 200 if whole else -1


def _running_replicas() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments["ChatDeployment"].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def scaled_up(base_url) -> tuple[int, int, list[int]]:
    """Replicas running before and after 8 requests kept in flight (until a second replica runs, 90 s at most),
    and those requests' statuses. Every test sending many requests at once takes this fixture: it then runs
    before any such load, from the one replica that requests sent one at a time keep (target 2 per replica)."""

    async def run() -> tuple[int, list[int]]:
        done = asyncio.Event()
        async with http_client(base_url) as http:
            async def worker(w: int) -> list[int]:
                statuses, i = [], w
                while not done.is_set():
                    statuses.append(await _post_ok(http, _chat_body(i)))
                    i += 8
                return statuses

            workers = [asyncio.create_task(worker(w)) for w in range(8)]
            deadline, replicas = time.monotonic() + 90, await asyncio.to_thread(_running_replicas)
            while replicas < 2 and time.monotonic() < deadline:
                await asyncio.sleep(1)
                replicas = await asyncio.to_thread(_running_replicas)
            done.set()
            return replicas, [s for statuses in await asyncio.gather(*workers) for s in statuses]

    before = _running_replicas()
    after, statuses = asyncio.run(run())
    return before, after, statuses


def test_autoscaler_adds_a_replica_under_sustained_load(scaled_up):
    """Target 2 ongoing requests per replica, 8 in flight: Serve must go from 1 replica to its max of 2."""
    before, after, statuses = scaled_up
    assert before == 1
    assert after == 2, "the autoscaler did not add a replica within 90 s of sustained load"
    assert set(statuses) == {200}


@pytest.mark.usefixtures("scaled_up")
def test_load_200_requests_at_concurrency_32(base_url):
    async def run() -> list[int]:
        limit = asyncio.Semaphore(32)
        async with http_client(base_url) as http:
            async def one(i: int) -> int:
                async with limit:
                    return await _post_ok(http, _chat_body(i))

            return await asyncio.gather(*(one(i) for i in range(200)))

    started = time.monotonic()
    statuses = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert statuses.count(200) == 200, f"failed requests: {[s for s in statuses if s != 200]}"
    print(f"200 requests at concurrency 32: {elapsed:.1f}s, {200 / elapsed:.1f} req/s")


def test_service_answers_again_after_its_replicas_are_killed(ray_session, client):
    ray = ray_session
    killed = replica_actors(ray)
    assert killed
    for name in killed:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    wait_for_replacements(ray, client, killed, 120)


def test_a_replica_failing_its_health_check_is_replaced(ray_session, client):
    """A frozen replica (SIGSTOP: alive, but answering nothing) misses its health checks
    (`health_check_timeout_s` 5 here, 3 misses); Serve must stop it (force-killing it after its grace period,
    `graceful_shutdown_timeout_s`, 2 s here), start another, and the service must answer. A replica still starting
    (the previous test's replacements may be) runs no health checks yet, so the frozen one is picked once every
    replica runs."""
    from ray import serve

    details = serve.context._get_global_client().get_serve_details()
    config = details["applications"][APP]["deployments"]["ChatDeployment"]["deployment_config"]
    assert config["graceful_shutdown_timeout_s"] == 2  # ServeSettings reached Serve (its default is 20)
    deadline = time.monotonic() + 120
    while set(states := serve.status().applications[APP].deployments["ChatDeployment"].replica_states) != {"RUNNING"}:
        assert time.monotonic() < deadline, f"the replicas did not all reach RUNNING within 120 s: {states}"
        time.sleep(1)
    name, pid = sorted(replica_pids(ray_session).items())[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for_replacements(ray_session, client, [name], 180)
    finally:
        try:  # if anything is left of it, let it die
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _scrape(name: str, **labels: str) -> float:
    """The sum over every series of `name` with these labels on this node's Prometheus endpoint (Ray's metrics)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    total = 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def test_serving_metrics_move_with_real_requests(base_url, client, prompt_tokens):
    """Requests by status, tokens in and out, time to first token and per output token, requests in flight:
    scraped from Ray's Prometheus endpoint after real requests (counted once each, 401 and 404 included)."""
    names = {"ok": ("ray_rz_chat_requests_total", {"status": "200"}),
             "unauthorized": ("ray_rz_chat_requests_total", {"status": "401"}),
             "not_found": ("ray_rz_chat_requests_total", {"status": "404"}),
             "prompt": ("ray_rz_chat_prompt_tokens_total", {}),
             "completion": ("ray_rz_chat_completion_tokens_total", {}),
             "first_token": ("ray_rz_chat_time_to_first_token_seconds_count", {}),
             "per_token": ("ray_rz_chat_time_per_output_token_seconds_count", {})}

    def read() -> dict[str, float]:
        return {key: _scrape(name, model=MODEL, **labels) for key, (name, labels) in names.items()}

    # Ray exports what replicas record every 10 s (a shorter interval costs every Ray process CPU, which on 2 cores
    # slowed the whole suite down by half): wait until the earlier tests' last requests are in the baseline
    before, steady_since = read(), time.monotonic()
    while time.monotonic() - steady_since < 12:
        time.sleep(2)
        now = read()
        if now != before:
            before, steady_since = now, time.monotonic()
    answers = [client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0.9, seed=i)
               for i in range(2)]
    streamed = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True,
                                                   stream_options={"include_usage": True}))
    assert httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                      json={"model": MODEL, "messages": HELLO}, timeout=60).status_code == 401
    with pytest.raises(Exception, match="does not exist"):
        client.chat.completions.create(model="nope", messages=HELLO)
    completion_tokens = sum(a.usage.completion_tokens for a in answers) + streamed[-1].usage.completion_tokens
    expected = {"ok": 3, "unauthorized": 1, "not_found": 1, "prompt": 3 * prompt_tokens,
                "completion": completion_tokens, "first_token": 3}
    deadline, delta = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        after = read()
        delta = {key: after[key] - before[key] for key in names}
        if all(delta[key] >= value for key, value in expected.items()):
            break
        time.sleep(2)
    assert {key: delta[key] for key in expected} == expected
    assert 1 <= delta["per_token"] <= 3  # answers of one token have no time per output token
    assert _scrape("ray_rz_chat_requests_in_flight", model=MODEL) == 0
