"""Judge prompts in FastChat's shape (`name`, `type`, `system_prompt`, `prompt_template`, `output_format`) and
the parsing of their verdicts: `[[rating]]` for single-answer grading, `[[A]]`/`[[B]]`/`[[C]]` for pairs.

Ours ship in `judge_prompts.jsonl` (written for this project, same names and placeholders as FastChat's, so
FastChat's own file can be given instead).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from ray_zephyr.errors import UserError
from ray_zephyr.llm.client import Unparseable

SHIPPED_JUDGE_PROMPTS = resources.files("ray_zephyr") / "evaluation" / "judge_prompts.jsonl"
REQUIRED_FIELDS = ("name", "system_prompt", "prompt_template")
_SCORE = (re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]"), re.compile(r"\[(\d+(?:\.\d+)?)\]"))  # FastChat's fallback too
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def load_judge_prompts(path: str | None, needed: tuple[str, ...]) -> dict[str, dict]:
    """The prompts by name; a missing file, a bad row or a missing prompt is a one-line UserError."""
    where = path or str(SHIPPED_JUDGE_PROMPTS)
    text = Path(path).read_text() if path else SHIPPED_JUDGE_PROMPTS.read_text()
    prompts = {}
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"judge prompts {where}, row {i}: not valid JSON ({exc.msg})") from None
        missing = [f for f in REQUIRED_FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise UserError(f"judge prompts {where}, row {i}: missing field {missing[0]!r}")
        prompts[row["name"]] = row
    absent = [n for n in needed if n not in prompts]
    if absent:
        raise UserError(f"judge prompts {where}: no prompt named {', '.join(absent)} (have {', '.join(prompts)})")
    return prompts


def judge_prompt_messages(prompt: dict, **fields: str) -> list[dict]:
    """The request to the judge: a FastChat-shaped judge prompt with its placeholders filled from `fields`."""
    return [{"role": "system", "content": prompt["system_prompt"]},
            {"role": "user", "content": prompt["prompt_template"].format(**fields)}]


def parse_score(text: str) -> float:
    """The 1-10 rating in `[[rating]]` (or `[rating]`); Unparseable('no_rating' / 'rating_out_of_range')."""
    for pattern in _SCORE:
        found = pattern.findall(text)
        if found:
            score = float(found[-1])
            if not 1 <= score <= 10:
                raise Unparseable("rating_out_of_range")
            return score
    raise Unparseable("no_rating")


def parse_verdict(text: str) -> str:
    """'A', 'B' or 'C' (tie) from `[[A]]`; Unparseable('no_verdict' / 'conflicting_verdicts')."""
    found = set(_VERDICT.findall(text))
    if not found:
        raise Unparseable("no_verdict")
    if len(found) > 1:
        raise Unparseable("conflicting_verdicts")
    return found.pop()
