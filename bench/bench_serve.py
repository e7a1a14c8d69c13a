"""Chat throughput at concurrency 16: the batching engine vs one request at a time, and Ray Serve's cost.

    python bench/bench_serve.py [--model FOLDER | --hidden-size 64 --layers 2] [--requests 100] [--rounds 3]
                                [--concurrency 16] [--max-tokens 128] [--engine transformers|vllm]

Three sides run the same requests (seeded, so all generate exactly the same tokens) through ChatService:
`unbatched` (the transformers engine with max_batch_rows=1: one request decodes at a time, as the engine
did before it batched), `in-process` (the batching engine) and `ray-serve` (the same, behind the HTTP
proxy, the replica hop and JSON over loopback). One replica, one torch thread and the same process
priority everywhere; the sides alternate in rounds. Prints requests/s, p50/p95 latency, the batching
speed-up (target >= 3) and the Serve / in-process throughput ratio (target >= 0.9).

`--engine vllm` measures the Serve / in-process ratio for vLLM instead (no unbatched side): run it with
vLLM's CPU build (the `.venv-vllm` that `.ci/vllm-check` builds) and a model of head_dim 64 (`--hidden-size
256`). vLLM decodes in an engine-core process of its own, so Serve's per-request work does not share the
decoding loop's GIL, as it does with the transformers engine (on 2 cores the ratio is the same:
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import torch

from ray_zephyr.embedded import chat_row, save_embedded_model
from ray_zephyr.errors import run_cli
from ray_zephyr.models import embedded_model_dir
from ray_zephyr.serving.engines import load_engine
from ray_zephyr.serving.protocol import parse_request
from ray_zephyr.serving.service import ChatService
from ray_zephyr.serving.settings import ServeSettings

MODEL_NAME = "bench"
RAY_WORKER_NICENESS = 15  # Ray's default for its worker processes (RAY_worker_niceness)


def bodies(count: int, max_tokens: int) -> list[bytes]:
    """One UltraChat-style question each (the embedded generator); seeded, so both sides do the same work."""
    return [
        json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": chat_row(0, "bench", i)["prompt"]}],
                    "max_tokens": max_tokens, "seed": i}).encode()
        for i in range(count)
    ]


def summary(name: str, latencies: list[float], elapsed: float, tokens: int) -> dict:
    cuts = statistics.quantiles(latencies, n=100)
    figures = {"rps": len(latencies) / elapsed, "p50_ms": cuts[49] * 1e3, "p95_ms": cuts[94] * 1e3,
               "tokens_per_s": tokens / elapsed}
    print(f"{name:<11} {figures['rps']:7.2f} req/s  p50 {figures['p50_ms']:7.1f} ms  p95 {figures['p95_ms']:7.1f} ms"
          f"  {figures['tokens_per_s']:7.1f} tokens/s  ({len(latencies)} requests, {elapsed:.1f} s)")
    return figures


async def drive(call, requests: list[bytes], concurrency: int) -> tuple[list[float], float, int]:
    """Run `call(body) -> completion tokens` over all requests, `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(body: bytes) -> int:
        async with limit:
            start = time.perf_counter()
            tokens = await call(body)
            latencies.append(time.perf_counter() - start)
            return tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(b) for b in requests))
    return latencies, time.perf_counter() - start, sum(tokens)


async def in_process(service: ChatService, requests: list[bytes], warmup: list[bytes], concurrency: int):
    async def call(body: bytes) -> int:
        completion = await service.complete(service.tokenize_request(parse_request(body)))
        return completion.usage.completion_tokens

    await drive(call, warmup, concurrency)
    return await drive(call, requests, concurrency)


async def through_serve(url: str, requests: list[bytes], warmup: list[bytes], concurrency: int):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        async def call(body: bytes) -> int:
            response = await http.post("/v1/chat/completions", content=body,
                                       headers={"Content-Type": "application/json"})
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        await drive(call, warmup, concurrency)
        return await drive(call, requests, concurrency)


def start_serve(settings: ServeSettings) -> str:
    from ray import serve

    from ray_zephyr.runtime import free_ports, init_ray
    from ray_zephyr.serving.app import build_app

    init_ray(join_existing=False)  # a private local Ray: this measures loopback on this machine
    port = free_ports()[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face folder; default: an embedded-style Llama of this size")
    parser.add_argument("--hidden-size", type=int, default=64, help="64 and 2 layers: the embedded model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=100, help="per round and side")
    parser.add_argument("--rounds", type=int, default=3, help="sides alternate, so load from elsewhere hits both")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128, help="a typical chat answer's length")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    args = parser.parse_args()
    model = args.model or str(save_embedded_model(
        embedded_model_dir().with_name(f"bench-h{args.hidden_size}-l{args.layers}"), args.hidden_size, args.layers))

    vllm_args = {"kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048, "enforce_eager": True}
    settings = ServeSettings(model=model, model_name=MODEL_NAME, engine=args.engine, num_gpus=0, num_cpus=1,
                             min_replicas=1, max_replicas=1, target_ongoing_requests=args.concurrency,
                             max_ongoing_requests=args.concurrency,
                             vllm_engine_args=vllm_args if args.engine == "vllm" else {})
    requests = bodies(args.requests, args.max_tokens)
    warmup = requests[: args.concurrency]
    print(f"model {model}, {args.rounds} rounds x {args.requests} requests per side, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}, {args.engine} engine on CPU, 1 torch thread")

    from ray import serve

    os.environ["OMP_NUM_THREADS"] = "1"  # vLLM's engine-core process, in-process and in the replica alike
    url = start_serve(settings)
    # Same conditions as the replica: one torch thread (Ray sets OMP_NUM_THREADS=1 for num_cpus=1) and
    # Ray's worker niceness (15), so that other load on the machine weighs on both sides alike.
    torch.set_num_threads(1)
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    service = ChatService(load_engine(settings), MODEL_NAME, settings.max_n)
    unbatched = None if args.engine == "vllm" else ChatService(
        load_engine(settings.model_copy(update={"max_batch_rows": 1})), MODEL_NAME, settings.max_n)
    runs = {"unbatched": [], "in-process": [], "ray-serve": []} if unbatched else {"in-process": [], "ray-serve": []}

    async def alternate() -> None:  # one event loop for every round: vLLM's output handler lives on the first one
        for _ in range(args.rounds):
            if unbatched:
                runs["unbatched"].append(await in_process(unbatched, requests, warmup, args.concurrency))
            runs["in-process"].append(await in_process(service, requests, warmup, args.concurrency))
            runs["ray-serve"].append(await through_serve(url, requests, warmup, args.concurrency))

    try:
        asyncio.run(alternate())
    finally:
        serve.shutdown()
    figures = {
        name: summary(name, [x for r in rounds for x in r[0]], sum(r[1] for r in rounds), sum(r[2] for r in rounds))
        for name, rounds in runs.items()
    }
    # Same requests on both sides, so a round's throughput ratio is the ratio of its wall times.
    per_round = [local[1] / served[1] for local, served in zip(runs["in-process"], runs["ray-serve"])]
    print(f"load average over the last minute: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work skews "
          "all sides; a figure counts only from a quiet machine, load < 1.5)")
    if unbatched:
        print(f"batching speed-up in-process / unbatched: "
              f"{figures['in-process']['rps'] / figures['unbatched']['rps']:.2f} (target >= 3)")
    print(f"throughput ratio serve / in-process: {figures['ray-serve']['rps'] / figures['in-process']['rps']:.3f} "
          f"(per round: {', '.join(f'{r:.3f}' for r in per_round)}; target >= 0.9)")


if __name__ == "__main__":
    run_cli(main)
