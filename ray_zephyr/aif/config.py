"""The AIF recipe: prompts, generators, judge, binarization, output; loaded by `ray_zephyr.config.load_recipe`.

AIF recipes ship in `ray_zephyr/recipes/aif/` (evaluation's in `eval/`), found by name like the training
recipes, so that training's recipe list stays training recipes only.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ray_zephyr.config import SourceConfig, StrictSection
from ray_zephyr.llm.config import EndpointConfig, GeneratorConfig


class JudgeConfig(StrictSection):
    """The teacher: an LLM behind an endpoint (UltraFeedback rating), or a Python function for checkable tasks."""

    kind: Literal["llm", "function"] = "llm"
    endpoint: EndpointConfig | None = None  # llm
    function: str | None = None  # function: "module:function"(prompt messages, completion) -> score or ratings
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1)
    parse_retries: int = Field(2, ge=0)  # extra calls when an answer cannot be parsed, before it is counted as a drop

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.kind == "llm" and self.endpoint is None:
            raise ValueError("judge kind llm needs an endpoint")
        if self.kind == "function" and (self.function is None or ":" not in self.function):
            raise ValueError("judge kind function needs function: 'module:function'")
        return self


class AIFRecipe(StrictSection):
    shipped_folder: ClassVar[str] = "aif"

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
