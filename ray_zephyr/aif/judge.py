"""Rating every completion: an LLM teacher through `ChatClient`, a reward model (`reward_model`), or a Python
function for checkable tasks.

An answer that cannot be parsed is asked again (`parse_retries` times, each a new cached request, see
`ChatClient.ask`) and then counted by reason; a call that fails after the client's retries is counted by its
failure. A completion without a rating is never given a score.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from ray_zephyr.aif.config import JudgeConfig
from ray_zephyr.aif.ratings import (
    Rating,
    function_rating,
    parse_rating,
    rating_messages,
)
from ray_zephyr.aif.reward_model import TOO_LONG, reward_scores
from ray_zephyr.llm.cache import ResponseCache
from ray_zephyr.llm.client import CallStats, ChatClient, Unparseable
from ray_zephyr.llm.functions import load_function
from ray_zephyr.progress import gather_shown, progress

Judged = tuple[Rating | None, str | None, list[str]]  # a rating or why there is none, and the raw judge replies


class Judge:
    def __init__(self, config: JudgeConfig, cache: ResponseCache | None = None):
        self.config = config
        self.unrated: Counter = Counter()
        self._client = ChatClient(config.endpoint, cache) if config.kind == "llm" else None
        self._function = load_function(config.function) if config.kind == "function" else None

    @property
    def stats(self) -> CallStats:
        return self._client.stats if self._client else CallStats()

    def rate_all(self, items: list[tuple[list[dict], str]]) -> list[Judged]:
        """Ratings of (prompt messages, completion) pairs, in order, with a progress bar (Ray Data's for a reward
        model)."""
        if self.config.kind == "llm":
            return asyncio.run(self._rate_with_llm(items))
        if self.config.kind == "reward_model":
            return [self._count((function_rating(s), None, []) if s is not None else (None, TOO_LONG, []))
                    for s in reward_scores(items, self.config)]
        shown, rated = progress("judge", "rating"), []
        shown.start(len(items))
        for prompt, answer in items:
            rated.append(self._count(self._rate_with_function(prompt, answer)))
            shown.update(len(rated))
        shown.close()
        return rated

    def _count(self, judged: Judged) -> Judged:
        if judged[0] is None:
            self.unrated[judged[1]] += 1
        return judged

    def _rate_with_function(self, prompt: list[dict], answer: str) -> Judged:
        try:
            return function_rating(self._function(prompt, answer)), None, []
        except Unparseable as exc:
            return None, exc.reason, []

    async def _rate_with_llm(self, items: list[tuple[list[dict], str]]) -> list[Judged]:
        async def one(prompt: list[dict], answer: str) -> Judged:
            return self._count(await self._rate_one(prompt, answer))

        try:
            return await gather_shown("judge", "rating", [one(p, a) for p, a in items])
        finally:
            await self._client.close()

    async def _rate_one(self, prompt: list[dict], answer: str) -> Judged:
        return await self._client.ask(rating_messages(prompt, answer), parse_rating, self.config.parse_retries,
                                      temperature=self.config.temperature, max_tokens=self.config.max_tokens)
