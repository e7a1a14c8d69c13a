"""The chat app on Ray Serve, bound to 127.0.0.1 with the tiny model, driven like a user would: the
official `openai` client (plain and streaming), raw HTTP for bad input and the API key, a bounded load
test, autoscaling under load, and recovery after the replicas are killed."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from openai import OpenAI

from ray_zephyr.serving.settings import ServeSettings

API_KEY = "test-key"
MODEL = "tiny"
APP = "chat"
HELLO = [{"role": "user", "content": "What is 2 plus 3?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_actors(ray) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#ChatDeployment#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


@pytest.fixture(scope="module")
def base_url(ray_session, embedded_model_dir):
    from ray import serve

    from serve.app import build_app

    settings = ServeSettings(
        model=str(embedded_model_dir), model_name=MODEL, engine="transformers", api_key=API_KEY, num_gpus=0,
        min_replicas=1, max_replicas=2, target_ongoing_requests=2, max_ongoing_requests=32,
        upscale_delay_s=0, downscale_delay_s=600,
    )
    port = _free_port()
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


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "missing messages": (_body(messages=...), 400, "messages"),
    "empty messages": (_body(messages=[]), 400, "messages"),
    "unknown role": (_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
    "missing content": (_body(messages=[{"role": "user"}]), 400, "messages[0].content"),
    "two user turns": (_body(messages=HELLO * 2), 400, "messages[1].role"),
    "starts with assistant": (_body(messages=[{"role": "assistant", "content": "hi"}]), 400, "messages[0].role"),
    "ends with assistant": (_body(messages=[*HELLO, {"role": "assistant", "content": "5"}]), 400, "messages"),
    "max_tokens 0": (_body(max_tokens=0), 400, "max_tokens"),
    "max_tokens negative": (_body(max_tokens=-3), 400, "max_tokens"),
    "beyond the context": (_body(max_tokens=5000), 400, "max_tokens"),
    "prompt beyond the context": (_body(messages=[{"role": "user", "content": "apple " * 3000}]), 400, "messages"),
    "unknown model": (_body(model="gpt-4"), 404, "model"),
    "n too large": (_body(n=1000), 400, "n"),
    "temperature out of range": (_body(temperature=7), 400, "temperature"),
    "too many stop sequences": (_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    "tools": (_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    "seed beyond 64 bits": (_body(seed=2**64), 400, "seed"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_an_openai_error_body(base_url, case):
    raw, status, param = BAD_REQUESTS[case]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{base_url}/v1/chat/completions", content=raw, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


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

    deadline = time.monotonic() + 120
    while True:
        try:
            answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
            break
        except Exception:  # noqa: BLE001 - until the controller has replaced the replicas
            assert time.monotonic() < deadline, "the service did not come back after its replicas were killed"
            time.sleep(1)
    assert answer.choices[0].message.role == "assistant"
    assert set(_replica_actors(ray)).isdisjoint(killed)
