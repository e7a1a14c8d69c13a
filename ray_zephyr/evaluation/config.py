"""The evaluation recipe: the model under test (`candidate`), the judge, and which benchmarks to run; loaded by
`ray_zephyr.config.load_recipe` from a file or `ray_zephyr/recipes/eval/`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from ray_zephyr.config import Project, ReportTo, RunName, StrictSection
from ray_zephyr.llm.config import EndpointConfig, GeneratorConfig


class MTBenchConfig(StrictSection):
    questions: str = Field("HuggingFaceH4/mt_bench_prompts", description=(
        "hub dataset id, or a local jsonl (FastChat's question.jsonl)"))
    revision: str | None = Field(None, description="hub only: a commit, tag or branch to pin the questions to")
    judge_prompts: str | None = Field(None, description=(
        "a jsonl in FastChat's judge-prompt shape; default: ours (evaluation/judge_prompts.jsonl)"))
    max_tokens: int = Field(1024, ge=1, description="per answer turn")
    limit: int | None = Field(None, ge=1, description="first N questions only (a quick run)")


class AlpacaEvalConfig(StrictSection):
    baseline: str = Field(description="a json list of {instruction, output}: the baseline model's answers")
    judge_prompts: str | None = Field(None, description="the pairwise judge's prompt file; default: ours")
    max_tokens: int = Field(1024, ge=1, description="per answer")
    limit: int | None = Field(None, ge=1, description="first N instructions only")


class EvalRecipe(StrictSection):
    shipped_folder: ClassVar[str] = "eval"

    seed: int = Field(42, description="seeds the candidate's sampling")
    candidate: GeneratorConfig = Field(description="the model under test (n is ignored: one answer per turn)")
    judge: EndpointConfig
    judge_max_tokens: int = Field(512, ge=1, description="tokens per judge reply at most")
    parse_retries: int = Field(2, ge=0, description=(
        "re-asks when a verdict cannot be parsed, before it is counted as a drop"))
    max_ungraded_fraction: float = Field(0.05, ge=0, le=1, description=(
        "above this share of turns (MT-Bench) or pairs (AlpacaEval) the judge could not grade, the job fails with "
        "the counts (the partial scores still go to results.json)"))
    mt_bench: MTBenchConfig | None = Field(None, description="run MT-Bench (omit to skip)")
    alpaca_eval: AlpacaEvalConfig | None = Field(None, description="run AlpacaEval (omit to skip)")
    output_dir: str = Field(description="answers, judgments and the summary go here")
    report_to: ReportTo = []
    run_name: RunName = None
    project: Project = None

    @model_validator(mode="after")
    def _check(self) -> EvalRecipe:
        if self.mt_bench is None and self.alpaca_eval is None:
            raise ValueError("nothing to evaluate: set mt_bench, alpaca_eval or both")
        return self
