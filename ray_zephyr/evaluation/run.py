"""The judged evaluation job: `python jobs/evaluate.py --config <eval recipe> [key=value ...]`.

Writes `<output_dir>/results.json` (MT-Bench scores per turn, category and overall; AlpacaEval raw and
length-controlled win rates), the per-turn and per-pair judgments as jsonl, and `mt_bench.png`.
Judge answers are cached in `<output_dir>/judge_cache.sqlite`, so a rerun pays only for new calls.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from ray_zephyr import tracking
from ray_zephyr.cli import parse_recipe_args
from ray_zephyr.errors import UserError
from ray_zephyr.evaluation import alpaca_eval, mt_bench
from ray_zephyr.evaluation.config import EvalRecipe
from ray_zephyr.llm.cache import ResponseCache
from ray_zephyr.llm.client import ChatClient, check_endpoint
from ray_zephyr.llm.generate import check_generator


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_evaluation(recipe: EvalRecipe) -> dict:
    tracking.check_installed(recipe.report_to)
    from ray_zephyr.runtime import init_ray

    check_generator(recipe.candidate, "candidate")
    check_endpoint(recipe.judge, "judge")
    init_ray()  # after the checks (a no-op where Ray is up): a bad recipe fails in seconds
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if recipe.mt_bench is not None:
        questions = mt_bench.load_questions(recipe.mt_bench.questions, recipe.mt_bench.revision)[
            : recipe.mt_bench.limit]
        answers = mt_bench.answer_questions(questions, recipe)
    if recipe.alpaca_eval is not None:
        baseline = alpaca_eval.load_baseline(recipe.alpaca_eval.baseline, recipe.alpaca_eval.limit)
        outputs = alpaca_eval.answer_instructions(baseline, recipe)

    async def judge() -> tuple[list | None, list | None]:
        client = ChatClient(recipe.judge, cache)
        try:
            return (await mt_bench.grade(questions, answers, recipe, client) if recipe.mt_bench else None,
                    await alpaca_eval.judge_pairs(baseline, outputs, recipe, client) if recipe.alpaca_eval else None)
        finally:
            await client.close()
            results["judge"] = {"calls": client.stats.calls, "cached": client.stats.cached,
                                "reasks": client.stats.reasks, "prompt_tokens": client.stats.prompt_tokens,
                                "completion_tokens": client.stats.completion_tokens}

    cache = ResponseCache(out / "judge_cache.sqlite")
    try:
        graded, pairs = asyncio.run(judge())
    finally:
        cache.close()
    if graded is not None:
        _write_jsonl(out / "mt_bench_judgments.jsonl", graded)
        results["mt_bench"] = mt_bench.scores(graded)
        mt_bench.plot(results["mt_bench"], out / "mt_bench.png")
    if pairs is not None:
        _write_jsonl(out / "alpaca_eval_judgments.jsonl", pairs)
        results["alpaca_eval"] = alpaca_eval.win_rates(pairs, baseline)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    tracking.report_summary(recipe.report_to, recipe.run_name, recipe.project, recipe, str(out), results,
                            str(out / "results.json"))
    problems = [problem for problem in (
        graded is not None and _too_ungraded("MT-Bench", "turns", graded, "score", recipe.max_ungraded_fraction),
        pairs is not None and _too_ungraded("AlpacaEval", "pairs", pairs, "winner", recipe.max_ungraded_fraction),
    ) if problem]
    if problems:
        raise UserError(f"{'; '.join(problems)}; the partial scores are in {out / 'results.json'}")
    return results


def _too_ungraded(benchmark: str, unit: str, judgments: list[dict], key: str, limit: float) -> str | None:
    """Why a benchmark's score cannot stand (too many items the judge could not grade), or None."""
    missing = Counter(j["reason"] for j in judgments if j[key] is None)
    share = sum(missing.values()) / len(judgments)
    if share <= limit:
        return None
    return (f"{benchmark}: {sum(missing.values())} of {len(judgments)} {unit} ungraded ({share:.0%}: {dict(missing)}), "
            f"above max_ungraded_fraction {limit:g}")


def main(argv: list[str] | None = None) -> dict:
    recipe, _ = parse_recipe_args("Judged evaluation: MT-Bench and AlpacaEval style", argv, kind=EvalRecipe)
    results = run_evaluation(recipe)
    if "mt_bench" in results:
        m = results["mt_bench"]
        print(f"MT-Bench: overall {m['overall']:.2f} (turn 1 {m['turn_1']}, turn 2 {m['turn_2']}), "
              f"graded {m['graded']}, ungraded {m['ungraded']}", flush=True)
    if "alpaca_eval" in results:
        a = results["alpaca_eval"]
        print(f"AlpacaEval: win rate {a['win_rate']:.3f}, length-controlled {a['length_controlled_win_rate']:.3f} "
              f"over {a['pairs']} pairs, unjudged {a['unjudged']}", flush=True)
    print(f"wrote {Path(recipe.output_dir) / 'results.json'}", flush=True)
    return results
