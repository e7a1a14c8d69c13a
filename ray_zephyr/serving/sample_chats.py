"""A few chats with a model folder through the whole serving path: the chat app deployed on Ray Serve (transformers
engine, an API key on) on 127.0.0.1, asked through the official openai client, then deleted. The zephyr job and the
real-model runs (bench/smollm2_dpo.py) print what a user would get from `serve run`."""

from __future__ import annotations

import secrets
from pathlib import Path

from ray_zephyr.runtime import free_ports


def served_chats(model_dir: str | Path, prompts: list[str], model_name: str, own_serve: bool,
                 max_tokens: int = 32) -> list[tuple[str, str]]:
    """(prompt, greedy answer) for each prompt; `own_serve`: shut Serve down after (it was started here)."""
    from openai import OpenAI
    from ray import serve
    from ray.serve.context import _get_global_client

    from ray_zephyr.serving.app import build_app
    from ray_zephyr.serving.settings import ServeSettings

    key = secrets.token_hex(16)
    settings = ServeSettings(model=str(model_dir), model_name=model_name, engine="transformers", api_key=key,
                             num_gpus=0, min_replicas=1, max_replicas=1)
    serve.start(http_options={"host": "127.0.0.1", "port": free_ports()[0]})
    port = _get_global_client().http_config.port  # a Serve already running keeps the port it has
    try:
        serve.run(build_app(settings), name="sample-chats", route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=300)
        answers = []
        for prompt in prompts:
            reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, temperature=0)
            answers.append((prompt, reply.choices[0].message.content))
        return answers
    finally:
        serve.delete("sample-chats")
        if own_serve:
            serve.shutdown()
