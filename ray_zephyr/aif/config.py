"""The AIF recipe: prompts, generators, judge, binarization, output; loaded by `ray_zephyr.config.load_recipe`.

AIF recipes ship in `ray_zephyr/recipes/aif/` (evaluation's in `eval/`), found by name like the training
recipes, so that training's recipe list stays training recipes only.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ray_zephyr.config import Project, ReportTo, RunName, SourceConfig, StrictSection
from ray_zephyr.llm.config import EndpointConfig, GeneratorConfig


class JudgeConfig(StrictSection):
    """The teacher: an LLM behind an endpoint (UltraFeedback rating), a reward model, or a Python function."""

    kind: Literal["llm", "reward_model", "function"] = Field("llm", description=(
        "llm: a model behind an OpenAI-compatible endpoint rates each completion; reward_model: a sequence-"
        "classification reward model scores it (Ray Data actors); function: a Python function scores it"))
    endpoint: EndpointConfig | None = Field(None, description="llm")
    model: str | None = Field(None, description=(
        "reward_model: HF folder, hub id or URI of a ...ForSequenceClassification reward model (e.g. "
        "Skywork/Skywork-Reward-V2-Qwen3-0.6B)"))
    max_length: int = Field(4096, ge=1, description=(
        "reward_model: tokens of prompt + completion at most; longer ones are counted, not cut"))
    batch_size: int = Field(16, ge=1, description="reward_model: completions per forward")
    concurrency: int = Field(1, ge=1, description="reward_model: Ray Data actors, each with its own copy")
    num_gpus: float = Field(0, ge=0, description="reward_model: per actor (0: CPU)")
    function: str | None = Field(None, description='function: "module:function"(prompt messages, completion) -> score or ratings')
    temperature: float = Field(0.0, ge=0, le=2, description="the judge's sampling temperature")
    max_tokens: int = Field(256, ge=1, description="tokens per judge reply at most")
    parse_retries: int = Field(2, ge=0, description=(
        "extra calls when an answer cannot be parsed, before it is counted as a drop"))

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.kind == "llm" and self.endpoint is None:
            raise ValueError("judge kind llm needs an endpoint")
        if self.kind == "function" and (self.function is None or ":" not in self.function):
            raise ValueError("judge kind function needs function: 'module:function'")
        if self.kind == "reward_model" and self.model is None:
            raise ValueError("judge kind reward_model needs model: a sequence-classification reward model")
        reward_keys = {"model", "max_length", "batch_size", "concurrency", "num_gpus"} & self.model_fields_set
        if reward_keys and self.kind != "reward_model":
            raise ValueError(f"judge {', '.join(sorted(reward_keys))} are for kind reward_model, not {self.kind}")
        return self


class AIFRecipe(StrictSection):
    shipped_folder: ClassVar[str] = "aif"

    seed: int = Field(42, description="seeds the sampling seeds per prompt and the binarization draws")
    prompts: list[SourceConfig]
    generators: list[GeneratorConfig] = Field(min_length=1)
    judge: JudgeConfig
    binarize: Literal["zephyr", "argilla"] = Field("zephyr", description=(
        "highest overall vs random other / mean of aspects, ties dropped"))
    output_dir: str = Field(description="pairs.parquet, summary.json and the judge cache go here")
    report_to: ReportTo = []
    run_name: RunName = None
    project: Project = None

    @model_validator(mode="after")
    def _check(self) -> AIFRecipe:
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names must be unique, got {names}")
        return self
