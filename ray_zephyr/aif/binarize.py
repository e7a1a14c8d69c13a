"""Turning rated completions into one (chosen, rejected) pair per prompt.

- zephyr: as UltraFeedback was binarized for Zephyr, the completion with the highest overall score is
  chosen and one of the others, drawn at random (seeded per prompt), is rejected, even at an equal score.
- argilla: Argilla's fix, which ranks on the mean of the aspect ratings (the overall scores of UltraFeedback
  were found unreliable): the best mean is chosen, the rejected one is drawn among those with a strictly
  lower mean, and a prompt whose rated completions all tie is dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ray_zephyr.aif.ratings import Rating


@dataclass(frozen=True)
class Pair:
    chosen: int  # index into the prompt's completions
    rejected: int
    score_chosen: float
    score_rejected: float


def binarize(ratings: list[Rating | None], method: str, rng: random.Random) -> Pair | str:
    """The pair for one prompt's completions (None: unrated), or the reason there is none. `rng` is the prompt's
    own (`seeded_rng(seed, prompt_id)`), so the draw does not depend on the order prompts were processed in."""
    rated = [(i, r) for i, r in enumerate(ratings) if r is not None]
    if len(rated) < 2:
        return "fewer_than_2_rated"
    score = (lambda r: r.overall) if method == "zephyr" else (lambda r: r.mean)
    best = max(score(r) for _, r in rated)
    chosen = rng.choice([i for i, r in rated if score(r) == best])
    if method == "zephyr":
        others = [i for i, _ in rated if i != chosen]
    else:
        others = [i for i, r in rated if score(r) < best]
        if not others:
            return "tie"
    rejected = rng.choice(others)
    return Pair(chosen, rejected, score(ratings[chosen]), score(ratings[rejected]))
