"""The UltraFeedback rating scheme, written from the paper's description (Cui et al., 2023, section 2).

UltraFeedback had GPT-4 rate each completion on four aspects, 1 to 5 (instruction-following,
truthfulness, honesty, helpfulness), and give an overall score from a critique; Zephyr binarized on the
overall score, Argilla's fix on the mean of the aspects. Our prompt asks for the same five numbers as
fixed lines so the answer can be parsed without a second model, and a parse failure has a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ray_zephyr.llm.client import Unparseable

ASPECTS = ("instruction_following", "truthfulness", "honesty", "helpfulness")
ASPECT_RANGE = (1, 5)
OVERALL_RANGE = (1, 10)

JUDGE_SYSTEM = "You are a strict, fair evaluator of AI assistants. You follow the output format exactly."
JUDGE_TEMPLATE = """Rate the assistant's answer to the conversation below.

Rate four aspects from 1 (worst) to 5 (best):
- Instruction following: does the answer do what the user asked, in the form and scope asked?
- Truthfulness: is it free of factual errors, contradictions and invented content?
- Honesty: does it state uncertainty where it should, and not claim what it cannot know?
- Helpfulness: is it correct, informative and useful for the user's purpose?
Then give an overall score from 1 (useless) to 10 (excellent) that weighs the answer as a whole.

[Conversation]
{conversation}

[Answer]
{answer}

Reply with exactly these five lines and nothing else:
Instruction following: <1-5>
Truthfulness: <1-5>
Honesty: <1-5>
Helpfulness: <1-5>
Overall: <1-10>"""

_LINE = {aspect: re.compile(rf"^\W*{aspect.replace('_', '[ _-]')}\W*?[:=][\s*_]*(\d+(?:\.\d+)?)", re.I | re.M)
         for aspect in (*ASPECTS, "overall")}


@dataclass(frozen=True)
class Rating:
    """Aspect scores and the overall score of one completion."""

    aspects: dict[str, float]
    overall: float

    @property
    def mean(self) -> float:
        return sum(self.aspects.values()) / len(self.aspects)


def rating_messages(prompt: list[dict], answer: str) -> list[dict]:
    """The request to the LLM teacher: rate `answer` to the conversation `prompt` on the UltraFeedback aspects."""
    conversation = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(conversation=conversation, answer=answer)}]


def parse_rating(text: str) -> Rating:
    """The five numbers from a judge answer, or Unparseable('missing_<aspect>' / 'out_of_range_<aspect>')."""
    scores = {}
    for aspect, pattern in _LINE.items():
        found = pattern.search(text)
        if found is None:
            raise Unparseable(f"missing_{aspect}")
        value = float(found.group(1))
        low, high = OVERALL_RANGE if aspect == "overall" else ASPECT_RANGE
        if not low <= value <= high:
            raise Unparseable(f"out_of_range_{aspect}")
        scores[aspect] = value
    overall = scores.pop("overall")
    return Rating(aspects=scores, overall=overall)


def function_rating(result) -> Rating:
    """A judge of kind function returns a number (the overall score, also its only aspect) or a Rating."""
    if isinstance(result, Rating):
        return result
    if isinstance(result, bool | int | float):
        return Rating(aspects={"score": float(result)}, overall=float(result))
    raise Unparseable(f"function_judge_returned_{type(result).__name__}")
