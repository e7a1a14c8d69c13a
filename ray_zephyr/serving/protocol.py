"""The OpenAI chat request: parsing, validation and the error body.

Every problem with a request becomes an `OpenAIError` carrying the status and the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`, so bad input is a 4xx, never a 500. Responses are
built from the `openai` package's own types in `service.py`.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from openai.types.shared import ErrorObject
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

MAX_STOP_SEQUENCES = 4
# OpenAI fields accepted that change nothing in the answer: `user` tags the end user for abuse tracking.
INFORMATIONAL_FIELDS = frozenset({"user"})
# Any other field outside ChatRequest is refused with 400 `unsupported` unless its value asks for nothing:
# null, false, an empty list or object, or the value below (what OpenAI does by default anyway).
NEUTRAL_VALUES = {"response_format": {"type": "text"}, "modalities": ["text"], "tool_choice": "none",
                  "parallel_tool_calls": True}


class OpenAIError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.error = ErrorObject(message=message, type=type, param=param, code=code)

    def body(self) -> dict:
        return {"error": self.error.model_dump(include={"message", "type", "param", "code"})}


def _stop_list(value):
    """`stop` may be one string, a list of strings or null."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _text_content(value):
    """OpenAI content is a string or a list of parts; only text parts mean anything to a text model."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "".join(texts)


def _role(value):
    """OpenAI's newer models call the system role `developer`; chat templates know `system`."""
    return "system" if value == "developer" else value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` is accepted, as OpenAI does for models that ignore it

    role: Annotated[Literal["system", "user", "assistant"], BeforeValidator(_role)]
    content: Annotated[str, BeforeValidator(_text_content)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of POST /v1/chat/completions this server honours, on both engines."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Annotated[list[str], BeforeValidator(_stop_list)] = Field(default_factory=list)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what torch and vLLM generators take
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = Field(default_factory=dict)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _param(loc: tuple) -> str | None:
    """('messages', 2, 'role') -> 'messages[2].role'; ('logit_bias', 'a', '[key]') -> 'logit_bias.a'."""
    out = ""
    for part in (p for p in loc if p != "[key]"):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _asks_for_nothing(name: str, value) -> bool:
    return value in (None, False, [], {}) or NEUTRAL_VALUES.get(name, None) == value


def parse_request(raw: bytes) -> ChatRequest:
    """JSON bytes -> a validated request whose turns make sense, or an OpenAIError (400)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise OpenAIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    for name in [n for n in data if n not in ChatRequest.model_fields]:
        value = data.pop(name)
        if name not in INFORMATIONAL_FIELDS and not _asks_for_nothing(name, value):
            raise OpenAIError(400, f"`{name}` is not supported by this server", param=name, code="unsupported")
    try:
        request = ChatRequest.model_validate(data)
    except RecursionError:
        raise OpenAIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        raise OpenAIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    check_turns(request.messages)
    check_stop(request.stop)
    return request


def check_turns(messages: list[ChatMessage]) -> None:
    """An optional leading system message, then user and assistant taking turns, ending with the user."""
    turns = messages[1:] if messages[0].role == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            position = i + len(messages) - len(turns)
            raise OpenAIError(
                400,
                f"messages[{position}].role is {message.role!r} where {expected!r} was expected: after an "
                "optional first system message, user and assistant turns must alternate, starting with user",
                param=f"messages[{position}].role",
                code="invalid_turn_order",
            )
    if not turns or turns[-1].role != "user":
        raise OpenAIError(400, "the last message must come from the user", param="messages",
                          code="invalid_turn_order")


def check_stop(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise OpenAIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    if any(not s for s in stop):
        raise OpenAIError(400, "stop sequences must be non-empty strings", param="stop")
