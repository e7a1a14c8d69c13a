"""The transformers engine and the shared service, in-process on the tiny model: greedy decoding
matches `model.generate`, alone and in a batch, stop sequences and end-of-sequence finish a choice,
streaming adds up to the plain answer, incremental detokenization equals `tokenizer.decode`, and
requests joining and leaving the batch at different steps get the answers they get alone."""

from __future__ import annotations

import asyncio
import random
import warnings

import httpx
import pytest
import torch

from ray_zephyr.errors import UserError
from ray_zephyr.serving.api import build_api
from ray_zephyr.serving.decoding import Request
from ray_zephyr.serving.engine import Sampling
from ray_zephyr.serving.engines import load_engine
from ray_zephyr.serving.protocol import ChatRequest
from ray_zephyr.serving.service import ChatService
from ray_zephyr.serving.settings import ServeSettings

HELLO = [{"role": "user", "content": "Spell river backwards."}]


@pytest.fixture(scope="module")
def service(embedded_model_dir) -> ChatService:
    settings = ServeSettings(model=str(embedded_model_dir), engine="transformers", num_gpus=0)
    return ChatService(load_engine(settings), "tiny", max_n=4)


def _tokenize(service: ChatService, **fields):
    return service.tokenize_request(ChatRequest(model="tiny", messages=HELLO, **fields))


def _complete(service: ChatService, **fields):
    return asyncio.run(service.complete(_tokenize(service, **fields)))


def _stream_text(service: ChatService, **fields) -> tuple[list[str], list[str | None], int]:
    async def collect():
        texts, finish, usage = [""] * fields.get("n", 1), [None] * fields.get("n", 1), None
        async for chunk in service.stream(_tokenize(service, stream_options={"include_usage": True}, **fields)):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                finish[choice.index] = choice.finish_reason or finish[choice.index]
        return texts, finish, usage.completion_tokens

    return asyncio.run(collect())


def test_greedy_matches_transformers_generate(service):
    engine = service.engine
    prompt = _tokenize(service, max_tokens=12).prompt_ids
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    expected = engine.tokenizer.decode([t for t in out.tolist() if t not in engine.eos_ids], skip_special_tokens=True)

    answer = _complete(service, temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == expected
    assert answer.usage.completion_tokens == len(out)


def test_decoding_uses_the_installed_transformers_cache_argument(service):
    """transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (the old name warns, and goes in 5.40):
    prefill and batched decoding call the model without a deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        answer = _complete(service, temperature=0, max_tokens=6, n=2)
    assert answer.usage.completion_tokens > 2


def test_stop_sequence_is_cut_out_in_both_modes(service):
    greedy = _complete(service, temperature=0, max_tokens=16).choices[0].message.content
    stop = greedy[5:7]
    assert stop and len(greedy) > 8
    cut = _complete(service, temperature=0, max_tokens=16, stop=[stop]).choices[0]
    assert cut.message.content == greedy[:greedy.index(stop)] and cut.finish_reason == "stop"
    texts, finish, _ = _stream_text(service, temperature=0, max_tokens=16, stop=[stop])
    assert texts == [cut.message.content] and finish == ["stop"]


def test_end_of_sequence_finishes_a_choice(service):
    engine = service.engine
    prompt = _tokenize(service).prompt_ids
    with torch.inference_mode():
        third = engine.model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, -1].item()
    saved = engine.eos_ids  # make the third greedy token an end-of-sequence token
    engine.eos_ids = saved | {third}
    try:
        answer = _complete(service, temperature=0, max_tokens=16)
    finally:
        engine.eos_ids = saved
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and answer.usage.completion_tokens <= 3


def test_stream_adds_up_to_the_plain_answer(service):
    plain = _complete(service, n=3, seed=3, max_tokens=10, temperature=1.2)
    texts, finish, tokens = _stream_text(service, n=3, seed=3, max_tokens=10, temperature=1.2)
    assert texts == [c.message.content for c in plain.choices]
    assert finish == [c.finish_reason for c in plain.choices] == ["length"] * 3
    assert tokens == plain.usage.completion_tokens == 30


QUESTIONS = ["Spell river backwards.", "What is 2 plus 3?", "Sort 9 4 7 1 8 2 6.", "How many letters are in apple?"]


def _ask(service: ChatService, i: int, **fields):
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] * (1 + i % 3)}]
    return service.tokenize_request(ChatRequest(model="tiny", messages=messages, max_tokens=6 + 3 * i, **fields))


def test_batched_requests_get_the_answers_they_get_alone(service):
    """Prompts of different lengths, n of 1 to 3, joining the batch at different steps and leaving it at
    different lengths: the padded, shared KV cache must not change a single token."""
    fields = [dict(seed=i, n=1 + i % 3, temperature=1.0) for i in range(6)]
    alone = [_complete_tokenized(service, _ask(service, i, **f)) for i, f in enumerate(fields)]

    async def together():
        async def late(i: int):
            await asyncio.sleep(0.01 * i)  # join a batch already decoding
            return await service.complete(_ask(service, i, **fields[i]))

        return await asyncio.gather(*(late(i) for i in range(len(fields))))

    batched = asyncio.run(together())
    assert [[c.message.content for c in a.choices] for a in batched] == [[c.message.content for c in a.choices]
                                                                         for a in alone]
    assert [a.usage.completion_tokens for a in batched] == [a.usage.completion_tokens for a in alone]


def test_batched_greedy_matches_transformers_generate(service):
    engine = service.engine
    tokenized = [_ask(service, i, temperature=0) for i in range(4)]
    answers = asyncio.run(_gather(service, tokenized))
    for p, answer in zip(tokenized, answers):
        with torch.inference_mode():
            out = engine.model.generate(torch.tensor([p.prompt_ids]), max_new_tokens=p.sampling.max_tokens,
                                        do_sample=False)[0, len(p.prompt_ids):]
        assert answer.choices[0].message.content == engine.tokenizer.decode(
            [t for t in out.tolist() if t not in engine.eos_ids], skip_special_tokens=True)


def test_incremental_detokenization_equals_tokenizer_decode(service):
    """Random token ids (half UTF-8 characters, special tokens) fed one by one to a request as if
    sampled: the streamed pieces add up to `tokenizer.decode` of the same ids."""
    engine, rng = service.engine, random.Random(0)
    vocab = engine.model.config.vocab_size
    for _ in range(50):
        ids = [rng.choice([t for t in range(vocab) if t not in engine.eos_ids]) for _ in range(rng.randint(1, 30))]
        request = Request(engine.tokenizer, engine.eos_ids, [1], Sampling(max_tokens=len(ids), temperature=0))
        pieces = [request.advance(request.choices[0], token) for token in ids]
        text = "".join(p.text for p in pieces if p is not None)
        assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert request.finished


async def _gather(service: ChatService, tokenized: list):
    return await asyncio.gather(*(service.complete(p) for p in tokenized))


def _complete_tokenized(service: ChatService, tokenized):
    return asyncio.run(service.complete(tokenized))


def test_api_without_a_key_is_open(service):
    async def call():
        transport = httpx.ASGITransport(app=build_api(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/v1/models"), await http.get("/v1/nowhere")

    models, missing = asyncio.run(call())
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny"
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"model '.*/nothing' does not exist"):
        load_engine(ServeSettings(model=str(tmp_path / "nothing"), engine="transformers", num_gpus=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        load_engine(ServeSettings(model=str(tmp_path / "empty"), engine="transformers", num_gpus=0))
