"""What the Serve tests of both engines share (tests/test_serve_app.py with transformers, tests/test_vllm_serve.py
with vLLM): the app on loopback, the client's constants, the bad-input table, the fuzz, and finding replicas and
waiting for their replacements. A module of its own, not a test module, so that the two Serve test modules do not import each other."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterable

import httpx
from openai import OpenAI

from ray_zephyr.runtime import free_ports
from ray_zephyr.serving.settings import ServeSettings

API_KEY = "test-key"
MODEL = "tiny"
APP = "chat"
HELLO = [{"role": "user", "content": "What is 2 plus 3?"}]
DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_BYTES = 64 * 1024


def replica_actors(ray) -> list[str]:
    """The names of the app's replica actors (starting, running or stopping)."""
    prefix = f"SERVE_REPLICA::{APP}#ChatDeployment#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def replica_pids(ray) -> dict[str, int]:
    """Each replica's process id, asked of the replica itself."""
    return {name: ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda _: os.getpid()))
            for name in replica_actors(ray)}


def serve_on_loopback(settings: ServeSettings):
    """Run the app on 127.0.0.1 (a free port) for a module fixture: yields the base URL, then shuts Serve down."""
    from ray import serve

    from ray_zephyr.serving.app import build_app

    port = free_ports()[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def http_client(base_url: str) -> httpx.AsyncClient:
    """An async client with the API key, for many requests at once."""
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                             limits=httpx.Limits(max_connections=32))


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
    """`count` fuzzed bodies, 16 at a time: each gets a whole answer or a proper 4xx."""
    async def run() -> list[tuple[bytes, str | None]]:
        limit = asyncio.Semaphore(16)
        async with http_client(base_url) as http:
            async def one(raw: bytes):
                async with limit:
                    return raw, await _fuzz_one(http, raw)

            return await asyncio.gather(*(one(raw) for raw in fuzz_bodies(count)))

    failures = [(raw, problem) for raw, problem in asyncio.run(run()) if problem is not None]
    assert not failures, f"{len(failures)} of {count} fuzzed requests went wrong, e.g. {failures[0]}"


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
    while not old.isdisjoint(replica_actors(ray)) or not replica_actors(ray):
        assert time.monotonic() < deadline, f"Serve did not replace the replicas {sorted(old)} within {seconds} s"
        time.sleep(1)
    answer = _wait_for_an_answer(client, seconds, "the service did not answer after its replicas were replaced")
    assert answer.choices[0].message.role == "assistant"
