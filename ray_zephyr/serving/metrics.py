"""The chat endpoint's own figures, exported through Ray's metrics: each node's Prometheus endpoint, which Ray's
dashboard and Grafana read (Ray prefixes the names with `ray_`; counters end in `_total`).

- `rz_chat_requests{status}`: chat completion requests answered, by HTTP status (401s and 4xx included);
- `rz_chat_prompt_tokens`, `rz_chat_completion_tokens`: tokens in and out;
- `rz_chat_time_to_first_token_seconds`, `rz_chat_time_per_output_token_seconds`: histograms, the latter vLLM's
  definition (the time after the first token, over the tokens after it);
- `rz_chat_requests_in_flight`: requests being generated now, per replica.

All carry the served model's name as the tag `model`. Only Serve replicas record them (`ChatDeployment`); the
in-process service has none.
"""

from __future__ import annotations

import time

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
PER_TOKEN_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]


class ServingMetrics:
    def __init__(self, model_name: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter("rz_chat_requests", "chat completion requests answered, by HTTP status",
                                tag_keys=("model", "status"))
        self.prompt_tokens = Counter("rz_chat_prompt_tokens", "prompt tokens of the requests generated",
                                     tag_keys=("model",))
        self.completion_tokens = Counter("rz_chat_completion_tokens", "tokens generated", tag_keys=("model",))
        self.first_token = Histogram("rz_chat_time_to_first_token_seconds", "time from the request to its first "
                                     "generated token", boundaries=LATENCY_BOUNDARIES, tag_keys=("model",))
        self.per_token = Histogram("rz_chat_time_per_output_token_seconds", "time per generated token after the "
                                   "first", boundaries=PER_TOKEN_BOUNDARIES, tag_keys=("model",))
        self.in_flight = Gauge("rz_chat_requests_in_flight", "requests being generated on this replica",
                               tag_keys=("model",))
        for metric in (self.requests, self.prompt_tokens, self.completion_tokens, self.first_token, self.per_token,
                       self.in_flight):
            metric.set_default_tags({"model": model_name})
        self.running = 0

    def answered(self, status: int) -> None:
        self.requests.inc(tags={"status": str(status)})

    def started(self, prompt_tokens: int) -> float:
        self.running += 1
        self.in_flight.set(self.running)
        self.prompt_tokens.inc(prompt_tokens)
        return time.perf_counter()

    def first(self, start: float) -> float:
        now = time.perf_counter()
        self.first_token.observe(now - start)
        return now

    def finished(self, tokens: int, first: float | None) -> None:
        self.running -= 1
        self.in_flight.set(self.running)
        if tokens:
            self.completion_tokens.inc(tokens)
        if first is not None and tokens > 1:
            self.per_token.observe((time.perf_counter() - first) / (tokens - 1))


class CountStatus:
    """ASGI middleware: counts the chat completion responses by status (outermost, so 401s are counted too)."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].rstrip("/").endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.answered(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
