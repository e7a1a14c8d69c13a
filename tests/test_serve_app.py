"""The chat app on Ray Serve, bound to 127.0.0.1 with the tiny model, driven like a user would: the
official `openai` client (plain and streaming), raw HTTP for bad input, fuzzed bodies and the API key, a
bounded load test, autoscaling under load, and recovery after replicas are killed or stop answering
their health check. The bad-input table and the fuzz are shared with tests/test_vllm_serve.py."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Iterable

import httpx
import pytest
from openai import OpenAI

from ray_zephyr.runtime import free_ports
from ray_zephyr.serving.settings import ServeSettings

API_KEY = "test-key"
MODEL = "tiny"
APP = "chat"
HELLO = [{"role": "user", "content": "What is 2 plus 3?"}]
DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_BYTES = 64 * 1024


def _replica_actors(ray) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#ChatDeployment#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def replica_pids(ray) -> dict[str, int]:
    """Each replica's process id, asked of the replica itself."""
    return {name: ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda _: os.getpid()))
            for name in _replica_actors(ray)}


@pytest.fixture(scope="module")
def base_url(ray_session, embedded_model_dir):
    settings = ServeSettings(
        model=str(embedded_model_dir), model_name=MODEL, engine="transformers", api_key=API_KEY, num_gpus=0,
        min_replicas=1, max_replicas=2, target_ongoing_requests=2, max_ongoing_requests=32,
        upscale_delay_s=0, downscale_delay_s=600, default_max_tokens=DEFAULT_MAX_TOKENS,
        max_request_bytes=MAX_REQUEST_BYTES, health_check_period_s=1, health_check_timeout_s=5,
    )
    yield from serve_on_loopback(settings)


def serve_on_loopback(settings: ServeSettings):
    """Run the app on 127.0.0.1 (a free port) for a module fixture: yields the base URL, then shuts Serve down."""
    from ray import serve

    from serve.app import build_app

    port = free_ports()[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


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


def _body(**changes) -> bytes:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def _nested(depth: int) -> bytes:
    return b'{"model": "%s", "messages": ' % MODEL.encode() + b"[" * depth + b"]" * depth + b"}"


# case: (body, status, param, code); a code of None is not checked
BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    "deeply nested JSON": (_nested(20_000), 400, None, "invalid_json"),
    "body too large": (_body(messages=[{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]), 413, None,
                       "request_too_large"),
    "not an object": (b"[1, 2]", 400, None, None),
    "missing messages": (_body(messages=...), 400, "messages", None),
    "empty messages": (_body(messages=[]), 400, "messages", None),
    "unknown role": (_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", None),
    "missing content": (_body(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    "two user turns": (_body(messages=HELLO * 2), 400, "messages[1].role", "invalid_turn_order"),
    "starts with assistant": (_body(messages=[{"role": "assistant", "content": "hi"}]), 400, "messages[0].role",
                              "invalid_turn_order"),
    "ends with assistant": (_body(messages=[*HELLO, {"role": "assistant", "content": "5"}]), 400, "messages",
                            "invalid_turn_order"),
    "max_tokens 0": (_body(max_tokens=0), 400, "max_tokens", None),
    "max_tokens negative": (_body(max_tokens=-3), 400, "max_tokens", None),
    "beyond the context": (_body(max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
    "prompt beyond the context": (_body(messages=[{"role": "user", "content": "apple " * 3000}]), 400, "messages",
                                  "context_length_exceeded"),
    "unknown model": (_body(model="gpt-4"), 404, "model", "model_not_found"),
    "n too large": (_body(n=1000), 400, "n", None),
    "temperature out of range": (_body(temperature=7), 400, "temperature", None),
    "penalty out of range": (_body(frequency_penalty=3), 400, "frequency_penalty", None),
    "logit_bias beyond the vocabulary": (_body(logit_bias={"999999": 1}), 400, "logit_bias", None),
    "logit_bias not a token id": (_body(logit_bias={"apple": 1}), 400, "logit_bias.apple", None),
    "too many stop sequences": (_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    "tools": (_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported"),
    "logprobs": (_body(logprobs=True), 400, "logprobs", "unsupported"),
    "response_format json": (_body(response_format={"type": "json_object"}), 400, "response_format", "unsupported"),
    "a field nobody knows": (_body(temprature=0.5), 400, "temprature", "unsupported"),
    "seed beyond 64 bits": (_body(seed=2**64), 400, "seed", None),
}


def post(base_url: str, raw: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{base_url}/v1/chat/completions", content=raw, headers=headers, timeout=60)


def check_bad_request(base_url: str, case: str) -> None:
    raw, status, param, code = BAD_REQUESTS[case]
    response = post(base_url, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert code is None or error["code"] == code


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_an_openai_error_body(base_url, case):
    check_bad_request(base_url, case)


def _mutations(rng: random.Random):
    """Values a careless or hostile client might send in any field."""
    junk = [None, True, -1, 0, 3, 2**70, 1.5, -0.5, "", "x", "\u0000", [], {}, [1, "a"], {"a": {"b": [None]}},
            [{"role": "user"}], [{"role": "user", "content": [{"type": "text"}]}], "\ud800"]
    return rng.choice(junk)


FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "seed",
          "stream", "stream_options", "frequency_penalty", "presence_penalty", "logit_bias", "response_format", "user",
          "tools", "logprobs", "top_logprobs", "functions", "foo"]


def fuzz_bodies(count: int, seed: int = 0) -> list[bytes]:
    """Valid requests with one to three fields replaced by junk, dropped or added, and a few broken bodies."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        body = {"model": MODEL, "messages": list(HELLO), "max_tokens": 4}
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(FIELDS)
            if rng.random() < 0.2:
                body.pop(field, None)
            else:
                body[field] = _mutations(rng)
        raw = json.dumps(body).encode()
        cut = rng.random()
        bodies.append(raw[: int(len(raw) * cut)] if cut < 0.1 else raw)
    return bodies


async def _fuzz_one(http: httpx.AsyncClient, raw: bytes) -> str | None:
    """None when the answer is whole or a proper 4xx, else what was wrong."""
    response = await http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    if 400 <= response.status_code < 500:
        error = response.json().get("error", {})
        return None if error.get("message") and error.get("type") == "invalid_request_error" else response.text
    if response.status_code != 200:
        return f"{response.status_code}: {response.text}"
    if response.headers["content-type"].startswith("text/event-stream"):
        return None if response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text else response.text
    choices = response.json()["choices"]
    return None if all(c["finish_reason"] in ("stop", "length") for c in choices) else response.text


def check_fuzz(base_url: str, count: int) -> None:
    async def run() -> list[tuple[bytes, str | None]]:
        limit = asyncio.Semaphore(16)
        async with _http(base_url) as http:
            async def one(raw: bytes):
                async with limit:
                    return raw, await _fuzz_one(http, raw)

            return await asyncio.gather(*(one(raw) for raw in fuzz_bodies(count)))

    failures = [(raw, problem) for raw, problem in asyncio.run(run()) if problem is not None]
    assert not failures, f"{len(failures)} of {count} fuzzed requests went wrong, e.g. {failures[0]}"


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


def _http(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                             limits=httpx.Limits(max_connections=32))


def test_autoscaler_adds_a_replica_under_sustained_load(base_url):
    """Target 2 ongoing requests per replica, 8 in flight: Serve must go from 1 replica to its max of 2.
    (The tests before this one send one request at a time, which keeps it at 1.)"""
    from ray import serve

    def running() -> int:
        deployment = serve.status().applications[APP].deployments["ChatDeployment"]
        return deployment.replica_states.get("RUNNING", 0)

    async def run() -> tuple[int, list[int]]:
        done = asyncio.Event()
        async with _http(base_url) as http:
            async def worker(w: int) -> list[int]:
                statuses, i = [], w
                while not done.is_set():
                    statuses.append(await _post_ok(http, _chat_body(i)))
                    i += 8
                return statuses

            workers = [asyncio.create_task(worker(w)) for w in range(8)]
            deadline, replicas = time.monotonic() + 90, await asyncio.to_thread(running)
            while replicas < 2 and time.monotonic() < deadline:
                await asyncio.sleep(1)
                replicas = await asyncio.to_thread(running)
            done.set()
            return replicas, [s for statuses in await asyncio.gather(*workers) for s in statuses]

    assert running() == 1
    replicas, statuses = asyncio.run(run())
    assert replicas == 2, "the autoscaler did not add a replica within 90 s of sustained load"
    assert set(statuses) == {200}


def test_load_200_requests_at_concurrency_32(base_url):
    async def run() -> list[int]:
        limit = asyncio.Semaphore(32)
        async with _http(base_url) as http:
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
    killed = _replica_actors(ray)
    assert killed
    for name in killed:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    wait_for_replacements(ray, client, killed, 120)


def _wait_for_an_answer(client: OpenAI, seconds: float, why: str):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
        except Exception:  # noqa: BLE001 - until the controller has replaced the replica
            assert time.monotonic() < deadline, why
            time.sleep(1)


def wait_for_replacements(ray, client: OpenAI, old: Iterable[str], seconds: float) -> None:
    """Until every replica in `old` is gone, new ones run, and the service answers again."""
    deadline, old = time.monotonic() + seconds, set(old)
    while not old.isdisjoint(_replica_actors(ray)) or not _replica_actors(ray):
        assert time.monotonic() < deadline, f"Serve did not replace the replicas {sorted(old)} within {seconds} s"
        time.sleep(1)
    answer = _wait_for_an_answer(client, seconds, "the service did not answer after its replicas were replaced")
    assert answer.choices[0].message.role == "assistant"


def test_a_replica_failing_its_health_check_is_replaced(ray_session, client):
    """A frozen replica (SIGSTOP: alive, but answering nothing) misses its health checks
    (`health_check_timeout_s` 5 here, 3 misses); Serve must stop it (force-killing it after its 20 s grace
    period), start another, and the service must answer."""
    name, pid = sorted(replica_pids(ray_session).items())[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for_replacements(ray_session, client, [name], 180)
    finally:
        try:  # if anything is left of it, let it die
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
