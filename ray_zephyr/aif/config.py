"""The AIF job's config: prompts, generators, judge, binarization, output; validated like the training recipes.

AIF (and evaluation) configs live in `ray_zephyr/recipes/aif/` (`eval/`), found by name like the training
recipes, so that training's recipe list stays training recipes only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ray_zephyr.config import RECIPES_DIR, SourceConfig, _Section, load_config
from ray_zephyr.errors import UserError
from ray_zephyr.serving.settings import ServeSettings, vllm_resources_problem


class EndpointConfig(_Section):
    """An OpenAI-compatible chat endpoint (a paid API, or our own Ray Serve app)."""

    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str  # the name the endpoint serves
    api_key_env: str | None = None  # environment variable holding the key; none: no key sent
    max_concurrency: int = Field(8, ge=1)  # requests in flight at once
    timeout_s: float = Field(60.0, gt=0)  # per request
    max_retries: int = Field(3, ge=0)  # on timeouts, connection errors, 429 and 5xx, with exponential backoff


class GeneratorConfig(_Section):
    """One model producing `n` completions per prompt, with its own sampling settings."""

    name: str  # how completions are labelled in the output
    engine: Literal["transformers", "vllm", "openai", "function"] = "transformers"
    model: str | None = None  # transformers/vllm: HF folder, hub id or "embedded"
    function: str | None = None  # function: "module:function"(prompt messages, n, seed) -> n completions
    endpoint: EndpointConfig | None = None  # openai
    n: int = Field(2, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)  # prompts per Ray Data batch
    concurrency: int = Field(1, ge=1)  # engine replicas (Ray Data actors); tasks at once for an endpoint or a function
    num_gpus: float = Field(0, ge=0)  # per replica
    vllm_engine_args: dict = {}  # vllm only: extra vLLM engine arguments, as in the Serve settings

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if self.engine == "openai" and self.endpoint is None:
            raise ValueError(f"generator {self.name!r}: engine openai needs an endpoint")
        if self.engine == "function" and (self.function is None or ":" not in self.function):
            raise ValueError(f"generator {self.name!r}: engine function needs function: 'module:function'")
        if self.engine in ("transformers", "vllm") and self.model is None:
            raise ValueError(f"generator {self.name!r}: engine {self.engine} needs a model")
        if self.engine == "vllm" and (problem := vllm_resources_problem(self.num_gpus, self.vllm_engine_args)):
            raise ValueError(f"generator {self.name!r}: {problem}")
        if self.vllm_engine_args and self.engine != "vllm":
            raise ValueError(f"generator {self.name!r}: vllm_engine_args are for engine vllm, not {self.engine}")
        return self

    def serve_settings(self) -> ServeSettings:
        """The settings our serving stack loads this generator's engine with (transformers or vllm)."""
        return ServeSettings(model=self.model, model_name=self.name, engine=self.engine, num_gpus=self.num_gpus,
                             max_n=self.n, vllm_engine_args=self.vllm_engine_args)


class JudgeConfig(_Section):
    """The teacher: an LLM behind an endpoint (UltraFeedback rating), or a Python callable for checkable tasks."""

    kind: Literal["llm", "programmatic"] = "llm"
    endpoint: EndpointConfig | None = None  # llm
    function: str | None = None  # programmatic: "module:function"(prompt messages, completion) -> score or ratings
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1)
    parse_retries: int = Field(2, ge=0)  # extra calls when an answer cannot be parsed, before it is counted as a drop

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.kind == "llm" and self.endpoint is None:
            raise ValueError("judge kind llm needs an endpoint")
        if self.kind == "programmatic" and (self.function is None or ":" not in self.function):
            raise ValueError("judge kind programmatic needs function: 'module:function'")
        return self


class AIFRecipe(_Section):
    seed: int = 42
    prompts: list[SourceConfig]
    generators: list[GeneratorConfig] = Field(min_length=1)
    judge: JudgeConfig
    binarize: Literal["zephyr", "argilla"] = "zephyr"  # highest overall vs random other / mean of aspects, ties dropped
    output_dir: str  # pairs.parquet, summary.json and the judge cache go here

    @model_validator(mode="after")
    def _check(self) -> AIFRecipe:
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names must be unique, got {names}")
        return self


def job_config_file(name_or_path: str, kind: str) -> Path:
    """A path as given, else a shipped `ray_zephyr/recipes/<kind>/<name>.yaml` (kind: aif or eval)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = RECIPES_DIR / kind
    shipped = folder / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if not shipped.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"{kind} recipe {name_or_path!r} not found: not a file, and not one of {', '.join(names)}")
    return Path(str(shipped))


def parse_job_config(description: str, kind: str, model: type[_Section], argv: list[str] | None = None):
    """`--config <file or shipped name> [key=value ...]` for the AIF and evaluation jobs, loaded and validated."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"{kind} recipe file, or a shipped one (ray_zephyr/recipes/{kind})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. output_dir=outputs/x")
    args = parser.parse_args(argv)
    return load_config(job_config_file(args.config, kind), args.overrides, model)


def load_aif_recipe(name_or_path: str, overrides: list[str] = ()) -> AIFRecipe:
    return load_config(job_config_file(name_or_path, "aif"), list(overrides), AIFRecipe)
