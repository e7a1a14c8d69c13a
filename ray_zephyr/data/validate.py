"""Row validation: every row is checked before tokenization and either normalized or rejected with a reason.

Reasons are stable names (counted in reports, named in errors):
invalid_json, wrong_type, missing_field, empty_content, unknown_role, bad_turn_order, prompt_mismatch;
after tokenization: prompt_too_long (DPO prompt alone fills max_length, as TRL drops it) and
no_supervised_tokens (SFT truncation left no assistant token).
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")


class Invalid(Exception):
    """A row is rejected: `reason` is a stable name, the message says where and why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def parse(raw: str) -> dict:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Invalid("invalid_json", f"not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise Invalid("wrong_type", f"a row must be a JSON object, got {type(row).__name__}")
    return row


def check_conversation(value: Any, field: str) -> list[dict]:
    """Optional system turn, then user/assistant alternating, ending with assistant; non-empty content."""
    if not isinstance(value, list):
        raise Invalid("wrong_type", f"{field} must be a list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise Invalid("wrong_type", f"{where} must be an object with role and content")
        for key in ("role", "content"):
            if key not in message:
                raise Invalid("missing_field", f"{where} has no {key}")
            if not isinstance(message[key], str):
                raise Invalid("wrong_type", f"{where}.{key} must be a string, got {type(message[key]).__name__}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise Invalid("unknown_role", f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        if not content.strip() and role != "system":
            raise Invalid("empty_content", f"{where} ({role}) has empty content")
        messages.append({"role": role, "content": content})
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise Invalid("bad_turn_order", f"{field} has no user/assistant turns")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(turns)
            raise Invalid("bad_turn_order", f"{field}[{i + offset}] is {message['role']}, expected {expected} (turns must alternate)")
    if turns[-1]["role"] != "assistant":
        raise Invalid("bad_turn_order", f"{field} must end with an assistant turn")
    return messages


def _field(row: dict, name: str) -> Any:
    if name not in row:
        raise Invalid("missing_field", f"no {name} field (fields: {', '.join(sorted(row)) or 'none'})")
    return row[name]


def sft_example(row: dict) -> dict:
    """UltraChat row -> {messages}."""
    return {"messages": check_conversation(_field(row, "messages"), "messages")}


def preference_example(row: dict) -> dict:
    """UltraFeedback row -> {prompt, chosen, rejected}: prompt = all turns but the last of chosen."""
    chosen = check_conversation(_field(row, "chosen"), "chosen")
    rejected = check_conversation(_field(row, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise Invalid("prompt_mismatch", "chosen and rejected do not share the same prompt turns")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


EXAMPLE_BUILDERS = {"sft": sft_example, "dpo": preference_example}
