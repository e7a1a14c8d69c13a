"""The AIF job: prompts -> completions from every generator -> teacher ratings -> binarized pairs (parquet).

`python jobs/aif.py --config tiny-aif [key=value ...]` writes `<output_dir>/pairs.parquet` in the
HuggingFaceH4/ultrafeedback_binarized schema (`prompt`, `prompt_id`, `chosen`, `rejected`, `messages`,
`score_chosen`, `score_rejected`) plus `completions` (every completion with its ratings), and
`summary.json` (counts, tokens, drops by reason). Judge answers are cached in `<output_dir>/judge_cache.sqlite`:
a rerun after a crash pays only for the calls that never finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray_zephyr import tracking
from ray_zephyr.aif.binarize import Pair, binarize
from ray_zephyr.aif.config import AIFRecipe
from ray_zephyr.aif.judge import Judge
from ray_zephyr.aif.prompts import read_prompts
from ray_zephyr.aif.ratings import Rating
from ray_zephyr.cli import parse_recipe_args
from ray_zephyr.errors import UserError
from ray_zephyr.llm.cache import ResponseCache
from ray_zephyr.llm.client import check_endpoint
from ray_zephyr.llm.generate import check_generator, generate
from ray_zephyr.models import check_model_source
from ray_zephyr.seeding import seeded_rng

GENERATED = "generated.json"


@dataclass
class AIFSummary:
    prompts: int = 0
    completions: dict[str, int] = field(default_factory=dict)  # per generator
    generated_tokens: int = 0
    generation_seconds: dict[str, float] = field(default_factory=dict)  # per generator; they run at once
    generation_wall_seconds: float = 0.0
    judge_calls: int = 0  # requests sent to the teacher (each with the client's own retries)
    judge_cached: int = 0  # answers taken from the cache instead
    judge_parse_retries: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    rated: int = 0
    mean_score: dict[str, float] = field(default_factory=dict)  # per generator, over its rated completions
    unrated: dict[str, int] = field(default_factory=dict)  # by reason
    pairs: int = 0
    dropped_prompts: dict[str, int] = field(default_factory=dict)  # by reason

    def lines(self) -> list[str]:
        return [
            f"prompts {self.prompts}, completions {sum(self.completions.values())} "
            f"({', '.join(f'{k} {v}' for k, v in self.completions.items())}), {self.generated_tokens} tokens generated",
            f"judge: {self.judge_calls} calls, {self.judge_cached} cached, {self.judge_parse_retries} re-asked after "
            f"unparseable answers, {self.judge_prompt_tokens} + {self.judge_completion_tokens} tokens",
            f"rated {self.rated}, unrated {sum(self.unrated.values())} {self.unrated or ''}".rstrip(),
            f"mean score: {', '.join(f'{k} {v:.3f}' for k, v in self.mean_score.items()) or 'none rated'}",
            f"pairs {self.pairs}, prompts dropped {sum(self.dropped_prompts.values())} {self.dropped_prompts or ''}".rstrip(),
        ]


def _conversation(prompt: list[dict], text: str) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": text}]


def _pair_row(prompt: dict, completions: list[dict], pair: Pair) -> dict:
    chosen = _conversation(prompt["messages"], completions[pair.chosen]["text"])
    return {
        "prompt": prompt["messages"][-1]["content"],
        "prompt_id": prompt["id"],
        "chosen": chosen,
        "rejected": _conversation(prompt["messages"], completions[pair.rejected]["text"]),
        "messages": chosen,
        "score_chosen": pair.score_chosen,
        "score_rejected": pair.score_rejected,
        "completions": completions,
    }


def _each_generator(recipe: AIFRecipe, prompts: list[dict]) -> tuple[list[dict[str, list[dict]]], dict[str, float]]:
    """Every generator's pass, all at once: one Ray Data execution per generator, each from its own thread, so a
    cluster's GPUs serve every model's actors together instead of one generator's after another's (Ray schedules
    what the resources allow and queues the rest). Each generator's completions stay its own, seeded per row.
    Returns the passes in the recipe's order and each one's seconds."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(spec):
        start = time.perf_counter()
        return generate(prompts, spec, recipe.seed), time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=len(recipe.generators), thread_name_prefix="generator") as pool:
        done = [f.result() for f in [pool.submit(timed, spec) for spec in recipe.generators]]
    return [by_prompt for by_prompt, _ in done], {g.name: s for g, (_, s) in zip(recipe.generators, done)}


def _generate_all(recipe: AIFRecipe, prompts: list[dict], keep_in: Path | None, summary: AIFSummary
                  ) -> dict[str, list[dict]]:
    """Every generator's completions per prompt id (their seconds into `summary`). With `keep_in`, the finished
    pass is kept in <keep_in>/generated.json under a key of the seed, generators and prompt ids, and a rerun with
    the same key reads it back: a crash while judging does not sample again (and a resampled answer would miss the
    judge cache)."""
    key = hashlib.sha256(json.dumps([recipe.seed, [g.model_dump(mode="json") for g in recipe.generators],
                                     [p["id"] for p in prompts]]).encode()).hexdigest()
    path = keep_in / GENERATED if keep_in else None
    if path and path.is_file() and (saved := json.loads(path.read_text()))["key"] == key:
        return saved["completions"]
    completions: dict[str, list[dict]] = {p["id"]: [] for p in prompts}
    start = time.perf_counter()
    passes, summary.generation_seconds = _each_generator(recipe, prompts)
    summary.generation_wall_seconds = time.perf_counter() - start
    for by_prompt in passes:  # in the recipe's order, whichever finished first
        for prompt_id, outs in by_prompt.items():
            completions[prompt_id] += outs
    if path:
        path.with_suffix(".tmp").write_text(json.dumps({"key": key, "completions": completions}))
        path.with_suffix(".tmp").replace(path)
    return completions


def run_aif(recipe: AIFRecipe, prompts: list[dict] | None = None, keep_generated: bool = False) -> AIFSummary:
    """Generate, judge, binarize; `prompts` (`{id, messages}`) instead of the recipe's, and `keep_generated` to
    keep the generation pass for a rerun (`_generate_all`), are the iterative loop's (ray_zephyr/iterative.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_zephyr.runtime import init_ray

    tracking.check_installed(recipe.report_to)
    if recipe.judge.kind == "llm":
        check_endpoint(recipe.judge.endpoint, "judge")
    if recipe.judge.kind == "reward_model":
        check_model_source(recipe.judge.model, "judge.model")
    for spec in recipe.generators:
        check_generator(spec, f"generator {spec.name!r}")
    init_ray()  # after the checks (a no-op where Ray is up): a bad recipe fails in seconds
    summary = AIFSummary()
    prompts = read_prompts(recipe.prompts, recipe.seed) if prompts is None else prompts
    summary.prompts = len(prompts)
    out_dir = Path(recipe.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    completions = _generate_all(recipe, prompts, out_dir if keep_generated else None, summary)
    for spec in recipe.generators:
        summary.completions[spec.name] = sum(1 for outs in completions.values() for c in outs  # made, not failed
                                             if c["generator"] == spec.name and c.get("text") is not None)

    unrated: Counter = Counter(c["error"] for outs in completions.values() for c in outs if c.get("text") is None)
    summary.generated_tokens = sum(c.get("tokens") or 0 for outs in completions.values() for c in outs)
    items = [(p, c) for p in prompts for c in completions[p["id"]] if c.get("text") is not None]
    cache = ResponseCache(out_dir / "judge_cache.sqlite")
    try:
        judge = Judge(recipe.judge, cache)
        judged = judge.rate_all([(p["messages"], c["text"]) for p, c in items])
    finally:
        cache.close()
    for (_, completion), (rating, reason, replies) in zip(items, judged):
        completion.update(overall=rating.overall if rating else None, aspects=rating.aspects if rating else None,
                          unrated_reason=reason, judge_replies=replies)
    unrated += judge.unrated
    stats = judge.stats
    summary.judge_calls, summary.judge_cached = stats.calls, stats.cached
    summary.judge_prompt_tokens, summary.judge_completion_tokens = stats.prompt_tokens, stats.completion_tokens
    summary.judge_parse_retries = stats.reasks
    summary.rated, summary.unrated = len(items) - sum(judge.unrated.values()), dict(unrated)
    for spec in recipe.generators:
        scores = [c["overall"] for _, c in items if c["generator"] == spec.name and c["overall"] is not None]
        if scores:
            summary.mean_score[spec.name] = sum(scores) / len(scores)

    rows, dropped = [], Counter()
    for prompt in prompts:
        outs = completions[prompt["id"]]
        ratings = [Rating(c["aspects"], c["overall"]) if c.get("overall") is not None else None for c in outs]
        pair = binarize(ratings, recipe.binarize, seeded_rng(recipe.seed, prompt["id"]))
        if isinstance(pair, str):
            dropped[pair] += 1
        else:
            rows.append(_pair_row(prompt, outs, pair))
    summary.pairs, summary.dropped_prompts = len(rows), dict(dropped)
    (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    tracking.report_summary(recipe.report_to, recipe.run_name, recipe.project, recipe, str(out_dir), asdict(summary),
                            str(out_dir / "summary.json"))
    if not rows:
        raise UserError(f"no preference pairs: {'; '.join(summary.lines())} (see {out_dir / 'summary.json'})")
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "pairs.parquet")
    return summary


def main(argv: list[str] | None = None) -> AIFSummary:
    recipe, _ = parse_recipe_args("AI feedback: generate, judge and binarize preference pairs", argv, kind=AIFRecipe)
    summary = run_aif(recipe)
    for line in summary.lines():
        print(line, flush=True)
    print(f"wrote {Path(recipe.output_dir) / 'pairs.parquet'}", flush=True)
    return summary
