"""Iterative on-policy DPO: rounds of generate -> judge -> binarize -> dDPO, each round trained from the last.

In round r the policy (the dSFT model in round 1, round r-1's dDPO model after it) answers the round's prompts as
the AIF recipe's policy generator (n samples each, beside any other generators); the AIF recipe's judge rates
every answer; binarization makes the pairs; dDPO trains round r's model from the policy on them. Feedback on the
policy's own samples is what Snorkel's PairRM-DPO (3 rounds), Self-Rewarding LMs, SPPO and RLHFlow's iterative
DPO added to Zephyr's one fixed dDPO. The reference of round r is its starting policy (`reference: previous`, as
Self-Rewarding LMs, Snorkel's recipe and SPPO do) or the dSFT model in every round (`reference: sft`, as RLHFlow's
iterative DPO does: its scripts pass `--ref_model $initial_model`).

    <output_dir>/recipe.json               the resolved recipes of this run; a rerun with others is refused
    <output_dir>/round-<r>/aif/            generated.json, judge_cache.sqlite, pairs.parquet, summary.json
    <output_dir>/round-<r>/dpo/            the dDPO run: model/, metrics.jsonl, its checkpoints
    <output_dir>/round-<r>/summary.json    the round's figures, written last: the round is done
    <output_dir>/summary.json, summary.txt every round side by side

Resume: a rerun skips the rounds that have their summary.json and the stages that finished (AIF: pairs.parquet
and summary.json; dDPO: the published model folder). An AIF stage that crashed reads its finished generation
pass back and asks the judge only what its cache does not hold; a dDPO stage resumes from its checkpoints like
any training run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ray_zephyr.aif.config import AIFRecipe
from ray_zephyr.config import Recipe, StrictSection, changed_keys, flatten, load_recipe
from ray_zephyr.errors import UserError
from ray_zephyr.seeding import seeded_int


class IterativeRecipe(StrictSection):
    shipped_folder: ClassVar[str] = "iterative"

    rounds: int = Field(3, ge=1, description="rounds of generate -> judge -> binarize -> dDPO")
    policy: str = Field(description="the dSFT model: round 1's policy (a folder, hub id, URI or .gguf file)")
    aif: str = Field(description=(
        "AIF recipe (file or shipped name): its prompts, generators, judge and binarization; the policy generator's "
        "model is set to each round's policy"))
    dpo: str = Field(description=(
        "dDPO recipe (file or shipped name): each round trains it from the round's policy on the round's pairs "
        "(its data.eval stays the recipe's)"))
    aif_overrides: list[str] = Field([], description="key=value overrides of the AIF recipe, e.g. generators.0.n=8")
    dpo_overrides: list[str] = Field([], description="key=value overrides of the dDPO recipe, e.g. train.lr=5e-7")
    policy_generator: str | None = Field(None, description="the AIF generator that is the policy; none: the first")
    prompts: Literal["fresh", "reuse"] = Field("fresh", description=(
        "fresh: the AIF prompts split into `rounds` disjoint parts, one per round (Snorkel's recipe); reuse: every "
        "round answers all of them, with its own sampling seeds"))
    reference: Literal["previous", "sft"] = Field("previous", description=(
        "previous: each round's reference is its starting policy; sft: the dSFT model in every round"))
    verifier: str | None = Field(None, description=(
        '"module:function"(messages, answer) -> score in [0, 1]: greedy task accuracy of the dSFT model and of every '
        "round's model on the dDPO recipe's eval prompts"))
    output_dir: str = Field(description="round-<r>/ folders, recipe.json and the summary go here (a local folder)")

    @model_validator(mode="after")
    def _check(self) -> IterativeRecipe:
        if self.verifier is not None and ":" not in self.verifier:
            raise ValueError("verifier must be 'module:function'")
        return self


STAGES = ("generate + judge", "dDPO", "evaluate")


def _round_dir(recipe: IterativeRecipe, r: int) -> Path:
    return Path(recipe.output_dir).resolve() / f"round-{r}"


def _policy(recipe: IterativeRecipe, r: int) -> str:
    return recipe.policy if r == 1 else str(_round_dir(recipe, r - 1) / "dpo" / "model")


def round_recipes(recipe: IterativeRecipe, r: int) -> tuple[AIFRecipe, Recipe]:
    """Round r's AIF and dDPO recipes: the policy generates, the pairs train, everything under round-<r>/."""
    out, policy = _round_dir(recipe, r), _policy(recipe, r)
    base = load_recipe(recipe.aif, recipe.aif_overrides, AIFRecipe)
    names = [g.name for g in base.generators]
    name = recipe.policy_generator or names[0]
    if name not in names:
        raise UserError(f"policy_generator {name!r} is not one of the AIF recipe's generators: {', '.join(names)}")
    if base.generators[names.index(name)].kind not in ("transformers", "vllm"):
        raise UserError(f"policy_generator {name!r} is of kind {base.generators[names.index(name)].kind}: the policy "
                        "must be a model the loop can swap (kind transformers or vllm)")
    aif = load_recipe(recipe.aif, [*recipe.aif_overrides, f"generators.{names.index(name)}.model={policy}",
                                   f"output_dir={out / 'aif'}", f"seed={base.seed + r - 1}"], AIFRecipe)
    reference = [f"dpo.reference_model={recipe.policy}"] if recipe.reference == "sft" and r > 1 else []
    dpo = load_recipe(recipe.dpo, [f"data.train=[{{path: {out / 'aif' / 'pairs.parquet'}}}]", *recipe.dpo_overrides,
                                   f"model.name_or_path={policy}", f"train.output_dir={out / 'dpo'}", *reference])
    if dpo.stage != "dpo":
        raise UserError(f"dpo recipe {recipe.dpo!r} is a {dpo.stage} recipe")
    return aif, dpo


def round_prompts(recipe: IterativeRecipe, r: int) -> list[dict]:
    """Round r's prompts: all of the AIF recipe's (reuse), or every `rounds`-th of them in a seeded order (fresh)."""
    from ray_zephyr.aif.prompts import read_prompts

    base = load_recipe(recipe.aif, recipe.aif_overrides, AIFRecipe)  # its seed, not the round's: one pool
    prompts = read_prompts(base.prompts, base.seed)
    if recipe.prompts == "reuse":
        return prompts
    order = sorted(prompts, key=lambda p: seeded_int(base.seed, "iterative-split", p["id"]))
    part = order[r - 1::recipe.rounds]
    if not part:
        raise UserError(f"prompts=fresh: {len(prompts)} prompts cannot be split over {recipe.rounds} rounds")
    return part


def check_resumable(recipe: IterativeRecipe) -> None:
    """A rerun into the same output_dir must be the same run: the loop's settings and round 1's resolved AIF and
    dDPO recipes (what the names and overrides came to) are kept in recipe.json; another is refused with the keys
    that differ. Keys that only say where things go or how a run is watched may change, as in training."""
    from ray_zephyr.train.checkpoint import BOOKKEEPING

    aif, dpo = round_recipes(recipe, 1)
    loop = recipe.model_dump(mode="json", exclude={"aif", "dpo", "aif_overrides", "dpo_overrides", "output_dir"})
    watched = {"report_to", "run_name", "project"}
    current = flatten({"iterative": loop, "aif": aif.model_dump(mode="json", exclude=watched),
                       "dpo": {k: v for k, v in flatten(dpo.model_dump(mode="json")).items() if k not in BOOKKEEPING}})
    path = Path(recipe.output_dir) / "recipe.json"
    if path.is_file() and (changed := changed_keys(json.loads(path.read_text()), current)):
        raise UserError(f"{path.parent} holds rounds of another recipe ({'; '.join(changed[:3])}); use another "
                        "output_dir, or delete it to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1))


def _dpo_figures(metrics_file: str) -> dict:
    from ray_zephyr.report import read_metrics

    metrics = read_metrics(metrics_file)
    last_eval = metrics["eval"][-1] if metrics["eval"] else {}
    return {"dpo_steps": metrics["train"][-1]["step"] if metrics["train"] else 0,
            "dpo_train_loss": metrics["train"][-1].get("loss") if metrics["train"] else None,
            "dpo_eval_loss": last_eval.get("eval_loss"),
            "dpo_eval_reward_accuracy": last_eval.get("eval_rewards/accuracies"),
            "dpo_eval_reward_margin": last_eval.get("eval_rewards/margins")}


def task_prompts(recipe: IterativeRecipe, dpo: Recipe) -> list[dict]:
    """The prompts of the dDPO recipe's held-out pairs, which the verifier checks each round's model on."""
    from ray_zephyr.aif.prompts import read_prompts

    return read_prompts(dpo.data.eval, dpo.seed) if recipe.verifier and dpo.data.eval else []


def task_accuracy(recipe: IterativeRecipe, dpo: Recipe, model_dir: str) -> float | None:
    from ray_zephyr.evaluation.task_accuracy import greedy_task_accuracy

    prompts = task_prompts(recipe, dpo)
    return greedy_task_accuracy(model_dir, prompts, recipe.verifier) if prompts else None


def run_round(recipe: IterativeRecipe, r: int, train: Callable[[Recipe, str], object]) -> dict:
    """One round, each stage skipped when it finished before; returns the round's figures."""
    from ray_zephyr.aif.run import run_aif

    out = _round_dir(recipe, r)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    aif, dpo = round_recipes(recipe, r)
    aif_dir, seconds = Path(aif.output_dir), {}
    begin = time.perf_counter()
    if not ((aif_dir / "pairs.parquet").is_file() and (aif_dir / "summary.json").is_file()):
        run_aif(aif, round_prompts(recipe, r), keep_generated=True)
    summary = json.loads((aif_dir / "summary.json").read_text())
    seconds["generate + judge"] = time.perf_counter() - begin
    begin = time.perf_counter()
    model_dir = Path(dpo.train.output_dir) / "model"
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        train(dpo, f"round {r} dDPO")
    seconds["dDPO"] = time.perf_counter() - begin
    begin = time.perf_counter()
    accuracy = task_accuracy(recipe, dpo, str(model_dir))
    seconds["evaluate"] = time.perf_counter() - begin
    policy_name = recipe.policy_generator or aif.generators[0].name
    figures = {
        "round": r, "policy": _policy(recipe, r), "model": str(model_dir), "prompts": summary["prompts"],
        "completions": sum(summary["completions"].values()), "pairs": summary["pairs"],
        "policy_mean_score": summary["mean_score"].get(policy_name),  # the judge on the round's starting policy
        **_dpo_figures(str(Path(dpo.train.output_dir) / "metrics.jsonl")),
        "task_accuracy": accuracy, "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(figures, indent=2))
    return figures


ROWS = (  # (figure, label) of the final table, one column per round
    ("prompts", "prompts"), ("pairs", "pairs"),
    ("policy_mean_score", "judge's mean score of the samples of the policy it starts from"),
    ("dpo_steps", "dDPO steps"), ("dpo_eval_loss", "dDPO eval loss (last eval)"),
    ("dpo_eval_reward_accuracy", "dDPO eval reward accuracy (last eval)"),
    ("dpo_eval_reward_margin", "dDPO eval reward margin (last eval)"),
    ("task_accuracy", "greedy task accuracy of the round's model"),
)


def rounds_table(start_accuracy: float | None, rounds: list[dict]) -> str:
    """Every round's figures side by side (markdown, readable in a terminal); the dSFT model's accuracy first."""
    def cell(value) -> str:
        return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    header = ["figure", "dSFT", *(f"round {f['round']}" for f in rounds)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in ROWS:
        start = cell(start_accuracy) if key == "task_accuracy" else ""
        lines.append("| " + " | ".join([label, start, *(cell(f.get(key)) for f in rounds)]) + " |")
    seconds = [" + ".join(f"{v:.0f}" for v in f["seconds"].values()) for f in rounds]
    lines.append("| " + " | ".join([f"seconds ({' + '.join(STAGES)})", "", *seconds]) + " |")
    return "\n".join(lines)


def run_rounds(recipe: IterativeRecipe, train: Callable[[Recipe, str], object]) -> tuple[str, dict]:
    """All rounds (resuming where a crash left off), then the side-by-side table; `train(recipe, label)` runs one
    dDPO recipe (with a progress bar, in the jobs). Returns the table and the summary written to summary.json."""
    check_resumable(recipe)
    out = Path(recipe.output_dir)
    _, first_dpo = round_recipes(recipe, 1)
    start_file = out / "dsft_task_accuracy.json"  # the dSFT model's figure, once
    if not start_file.is_file():
        start_file.write_text(json.dumps(task_accuracy(recipe, first_dpo, _policy(recipe, 1))))
    start = json.loads(start_file.read_text())
    rounds = [run_round(recipe, r, train) for r in range(1, recipe.rounds + 1)]
    table = rounds_table(start, rounds)
    numbers = {"dsft_task_accuracy": start, "task_prompts": len(task_prompts(recipe, first_dpo)), "rounds": rounds,
               "model": rounds[-1]["model"]}
    (out / "summary.json").write_text(json.dumps(numbers, indent=2))
    (out / "summary.txt").write_text(table + "\n")
    return table, numbers


def main(argv: list[str] | None = None) -> dict:
    """`python jobs/iterative_dpo.py --config <iterative recipe> [key=value ...]`; keys starting `aif.` or `dpo.`
    are added to the AIF or dDPO overrides (`dpo.train.lr=5e-7`)."""
    import argparse

    from ray_zephyr.cli import add_verbose_flag, apply_verbose_flag
    from ray_zephyr.config import shipped_recipes
    from ray_zephyr.progress import train_with_progress
    from ray_zephyr.runtime import init_ray

    parser = argparse.ArgumentParser(description="Iterative on-policy DPO: rounds of generate, judge, binarize, dDPO")
    parser.add_argument("--config", required=True,
                        help=f"iterative recipe file, or a shipped one: {', '.join(shipped_recipes(IterativeRecipe))}")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the iterative recipe (rounds=2), or with aif./dpo. of a stage's recipe")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    apply_verbose_flag(args)
    own = [o for o in args.overrides if not o.startswith(("aif.", "dpo."))]
    stage = {s: [o.removeprefix(f"{s}.") for o in args.overrides if o.startswith(f"{s}.")] for s in ("aif", "dpo")}
    recipe = load_recipe(args.config, own, IterativeRecipe)
    recipe = recipe.model_copy(update={"aif_overrides": [*recipe.aif_overrides, *stage["aif"]],
                                       "dpo_overrides": [*recipe.dpo_overrides, *stage["dpo"]]})
    init_ray()
    table, numbers = run_rounds(recipe, lambda dpo, label: train_with_progress(dpo, label))
    print(table, flush=True)
    print(f"model: {numbers['model']}\nsummary: {Path(recipe.output_dir) / 'summary.json'}", flush=True)
    return numbers
