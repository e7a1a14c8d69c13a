"""What the LLM calls are made to: an OpenAI-compatible endpoint, and a generator (a model, an endpoint or a
Python function producing `n` completions per prompt), validated like every recipe section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ray_zephyr.config import StrictSection
from ray_zephyr.serving.settings import (
    ServeSettings,
    transformers_gpus_problem,
    vllm_resources_problem,
)


class EndpointConfig(StrictSection):
    """An OpenAI-compatible chat endpoint (a paid API, or our own Ray Serve app)."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = Field(description="the name the endpoint serves")
    api_key_env: str | None = Field(None, description="environment variable holding the key; none: no key sent")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="per request")
    max_retries: int = Field(3, ge=0, description=(
        "on timeouts, connection errors, 429 and 5xx, with exponential backoff"))


class GeneratorConfig(StrictSection):
    """One model producing `n` completions per prompt, with its own sampling settings."""

    name: str = Field(description="how completions are labelled in the output")
    kind: Literal["transformers", "vllm", "openai", "function"] = Field("transformers", description=(
        "transformers or vllm: a model run in Ray Data actors; openai: an OpenAI-compatible endpoint; function: a "
        "Python function"))
    model: str | None = Field(None, description=(
        'transformers/vllm: HF folder, hub id, .gguf file, URI or "embedded"'))
    function: str | None = Field(None, description='function: "module:function"(prompt messages, n, seed) -> n completions')
    endpoint: EndpointConfig | None = Field(None, description="openai")
    n: int = Field(2, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0, le=2, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's cumulative probability")
    max_tokens: int = Field(256, ge=1, description="tokens per completion at most")
    batch_size: int = Field(16, ge=1, description="prompts per Ray Data batch")
    concurrency: int = Field(1, ge=1, description=(
        "engine replicas (Ray Data actors); tasks at once for an endpoint or a function"))
    num_gpus: float = Field(0, ge=0, description="per replica")
    vllm_engine_args: dict = Field({}, description="vllm only: extra vLLM engine arguments, as in the Serve settings")

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if self.kind == "openai" and self.endpoint is None:
            raise ValueError(f"generator {self.name!r}: kind openai needs an endpoint")
        if self.kind == "function" and (self.function is None or ":" not in self.function):
            raise ValueError(f"generator {self.name!r}: kind function needs function: 'module:function'")
        if self.kind in ("transformers", "vllm") and self.model is None:
            raise ValueError(f"generator {self.name!r}: kind {self.kind} needs a model")
        if self.kind == "vllm" and (problem := vllm_resources_problem(self.num_gpus, self.vllm_engine_args)):
            raise ValueError(f"generator {self.name!r}: {problem}")
        if self.kind == "transformers" and (problem := transformers_gpus_problem(self.num_gpus)):
            raise ValueError(f"generator {self.name!r}: {problem}")
        if self.vllm_engine_args and self.kind != "vllm":
            raise ValueError(f"generator {self.name!r}: vllm_engine_args are for kind vllm, not {self.kind}")
        return self

    def serve_settings(self) -> ServeSettings:
        """The settings our serving stack loads this generator's engine with (kinds transformers and vllm)."""
        return ServeSettings(model=self.model, model_name=self.name, engine=self.kind, num_gpus=self.num_gpus,
                             max_n=self.n, vllm_engine_args=self.vllm_engine_args)
