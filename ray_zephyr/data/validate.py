"""Row validation: every row is checked before tokenization and either normalized or rejected with a reason.

Rows arrive as the Python values the reader produced (a parsed JSON line, a parquet row), never re-serialized;
`ray_zephyr.data.formats` maps each format's fields onto these checks. Reasons are stable names (counted in
reports, named in errors):
invalid_json, wrong_type, missing_field, empty_content, unknown_role, unsupported_content, bad_turn_order,
prompt_mismatch; after tokenization: prompt_too_long (DPO prompt alone fills max_length, as TRL drops it) and
no_supervised_tokens (SFT truncation left no assistant token).
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


class Invalid(Exception):
    """A row is rejected: `reason` is a stable name, the message says where and why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def field(row: dict, name: str, where: str = "") -> Any:
    if name not in row or row[name] is None:
        raise Invalid("missing_field", f"{where}no {name} field (fields: {', '.join(sorted(row)) or 'none'})")
    return row[name]


def check_text(value: Any, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"{where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Invalid("empty_content", f"{where} is empty")
    return value


def _content(value: Any, where: str) -> str:
    """A string, or OpenAI's list of text parts (`[{type: text, text}]`), joined as chat templates join them."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise Invalid("wrong_type", f"{where} must be a string or a list of text parts, got {type(value).__name__}")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise Invalid("unsupported_content", f"{where}[{i}] is a {kind!r} part; only text parts are trained on")
        texts.append(part["text"])
    return "".join(texts)


def check_messages(value: Any, field_name: str) -> list[dict]:
    """A list of {role, content} with known roles and non-empty content (a system turn may be empty)."""
    if not isinstance(value, list):
        raise Invalid("wrong_type", f"{field_name} must be a list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise Invalid("wrong_type", f"{where} must be an object with role and content")
        for key in ("role", "content"):
            if key not in message:
                raise Invalid("missing_field", f"{where} has no {key}")
        role = message["role"]
        if not isinstance(role, str):
            raise Invalid("wrong_type", f"{where}.role must be a string, got {type(role).__name__}")
        content = _content(message["content"], f"{where}.content")
        if role not in ROLES:
            raise Invalid("unknown_role", f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        if not content.strip() and role != "system":
            raise Invalid("empty_content", f"{where} ({role}) has empty content")
        messages.append({"role": role, "content": content})
    return messages


def check_turn_order(messages: list[dict], field_name: str, last: str = "assistant") -> list[dict]:
    """Optional system turn, then user/assistant alternating from user, ending with `last`."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise Invalid("bad_turn_order", f"{field_name} has no user/assistant turns")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(turns)
            raise Invalid("bad_turn_order", f"{field_name}[{i + offset}] is {message['role']}, expected {expected} (turns must alternate)")
    if turns[-1]["role"] != last:
        raise Invalid("bad_turn_order", f"{field_name} must end with a{'n' if last == 'assistant' else ''} {last} turn")
    return messages


def check_conversation(value: Any, field_name: str) -> list[dict]:
    """A whole conversation: valid messages in turn order, ending with the assistant."""
    return check_turn_order(check_messages(value, field_name), field_name)


def sft_example(row: dict) -> dict:
    """UltraChat / OpenAI messages row -> {messages}."""
    return {"messages": check_conversation(field(row, "messages"), "messages")}


def preference_example(row: dict) -> dict:
    """UltraFeedback row -> {prompt, chosen, rejected}: prompt = all turns but the last of chosen."""
    chosen = check_conversation(field(row, "chosen"), "chosen")
    rejected = check_conversation(field(row, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise Invalid("prompt_mismatch", "chosen and rejected do not share the same prompt turns")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
