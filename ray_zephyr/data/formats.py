"""The row formats users bring, each turned into one of the examples TRL 1.16 itself prepares.

SFT examples: `{messages}` (conversational), `{prompt, completion}` (message lists or strings), `{text}`.
DPO examples: `{prompt, chosen, rejected}` (message lists or strings).
KTO examples: `{prompt, completion, label}` (TRL's unpaired preference); a pair is two of them, as TRL's
KTOTrainer splits pairs (`unpair_preference_dataset`): the chosen answer desirable, the rejected one not.
TRL's formats pass through unchanged (so tokenization can match TRL token for token); ShareGPT and Alpaca are
converted to messages first, the way LLaMA-Factory reads them. A source's format is detected from its first
row's fields or set with `format:`; `columns:` renames fields first (`{prompt: question}` reads `question`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray_zephyr.data.validate import (
    Invalid,
    check_messages,
    check_text,
    check_turn_order,
    field,
    preference_example,
    sft_example,
)
from ray_zephyr.errors import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt_messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise Invalid("wrong_type", f"{where} must be a list of {{from, value}} turns, got {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise Invalid("wrong_type", f"{where}[{i}] must be an object with from and value")
        role = field(turn, "from", f"{where}[{i}]: ")
        if role not in SHAREGPT_ROLES:
            raise Invalid("unknown_role", f"{where}[{i}].from is {role!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[role], "content": field(turn, "value", f"{where}[{i}]: ")})
    return check_messages(messages, where)


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    """ShareGPT and Alpaca rows may carry the system prompt in a top-level `system` field."""
    system = row.get("system")
    if system is None or (isinstance(system, str) and not system):
        return messages
    return [{"role": "system", "content": check_text(system, "system")}, *messages]


def _sharegpt_sft(row: dict) -> dict:
    messages = _with_system(row, _sharegpt_messages(field(row, "conversations"), "conversations"))
    return {"messages": check_turn_order(messages, "conversations")}


def _sharegpt_preference(row: dict) -> dict:
    """LLaMA-Factory's ShareGPT preference rows: the prompt turns, and one `{from, value}` answer per side."""
    prompt = check_turn_order(_with_system(row, _sharegpt_messages(field(row, "conversations"), "conversations")),
                              "conversations", last="user")
    sides = {}
    for side in ("chosen", "rejected"):
        [answer] = _sharegpt_messages([field(row, side)], side)
        if answer["role"] != "assistant":
            raise Invalid("bad_turn_order", f"{side} is from {answer['role']}, expected gpt")
        sides[side] = [answer]
    return {"prompt": prompt, **sides}


def _alpaca_prompt(row: dict) -> list[dict]:
    """instruction + "\\n" + input as the user turn, after `history` ([[question, answer], ...]) if any."""
    instruction = check_text(field(row, "instruction"), "instruction")
    extra = row.get("input") or ""
    user = instruction + "\n" + check_text(extra, "input") if extra else instruction
    turns: list[dict] = []
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise Invalid("wrong_type", f"history[{i}] must be a [question, answer] pair")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return check_messages(_with_system(row, [*turns, {"role": "user", "content": user}]), "instruction")


def _alpaca_sft(row: dict) -> dict:
    messages = _alpaca_prompt(row) + [{"role": "assistant", "content": check_text(field(row, "output"), "output")}]
    return {"messages": check_turn_order(messages, "instruction")}


def _alpaca_preference(row: dict) -> dict:
    prompt = check_turn_order(_alpaca_prompt(row), "instruction", last="user")
    return {"prompt": prompt, **{side: [{"role": "assistant", "content": check_text(field(row, side), side)}]
                                 for side in ("chosen", "rejected")}}


def _conversational_prompt(row: dict, completions: tuple[str, ...]) -> dict:
    """Explicit prompt as messages ending with the user; each completion continues it as a valid conversation."""
    prompt = check_turn_order(check_messages(field(row, "prompt"), "prompt"), "prompt", last="user")
    out = {"prompt": prompt}
    for name in completions:
        out[name] = check_messages(field(row, name), name)
        check_turn_order(prompt + out[name], f"prompt+{name}")
    return out


def _is_text(row: dict, names: tuple[str, ...]) -> bool:
    """Standard (strings) or conversational (message lists): all named fields must agree."""
    kinds = {isinstance(row.get(n), str) for n in names if n in row}
    if len(kinds) > 1:
        raise Invalid("wrong_type", f"{', '.join(names)} must be all strings or all message lists")
    return kinds == {True}


def _prompt_completion(row: dict) -> dict:
    if _is_text(row, ("prompt", "completion")):
        return {"prompt": check_text(field(row, "prompt"), "prompt", allow_empty=True),
                "completion": check_text(field(row, "completion"), "completion")}
    return _conversational_prompt(row, ("completion",))


def _text(row: dict) -> dict:
    return {"text": check_text(field(row, "text"), "text")}


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's `extract_prompt` for strings: the common prefix is the prompt, less a trailing space."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _preference(row: dict) -> dict:
    """TRL preference rows, explicit or implicit prompt, standard or conversational.

    The prompt is explicit when `prompt` has the completions' type; UltraFeedback's string `prompt` beside
    conversational chosen/rejected is a copy of the first user turn, and the prompt is implicit there.
    """
    explicit = "prompt" in row and isinstance(row["prompt"], str) == isinstance(row.get("chosen"), str)
    if _is_text(row, ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")):
        chosen, rejected = check_text(field(row, "chosen"), "chosen"), check_text(field(row, "rejected"), "rejected")
        if explicit:
            return {"prompt": check_text(row["prompt"], "prompt", allow_empty=True), "chosen": chosen, "rejected": rejected}
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not chosen.strip() or not rejected.strip():
            raise Invalid("empty_content", "chosen and rejected have nothing left after their common prompt")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if explicit:
        return _conversational_prompt(row, ("chosen", "rejected"))
    return preference_example(row)


def _label(row: dict, name: str) -> bool:
    value = field(row, name)
    if not isinstance(value, bool):
        raise Invalid("wrong_type", f"{name} must be true (desirable) or false (undesirable), got {value!r}")
    return value


def _unpaired(row: dict) -> dict:
    """TRL's unpaired preference rows: prompt and completion (strings or message lists) and a boolean label."""
    return _prompt_completion(row) | {"label": _label(row, "label")}


def _sharegpt_unpaired(row: dict) -> dict:
    """LLaMA-Factory's KTO rows: a ShareGPT conversation whose last (gpt) turn is the completion, and `kto_tag`."""
    messages = _sharegpt_sft(row)["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": _label(row, "kto_tag")}


def _alpaca_unpaired(row: dict) -> dict:
    """An Alpaca row with LLaMA-Factory's `kto_tag`: the output is the completion."""
    messages = _alpaca_sft(row)["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": _label(row, "kto_tag")}


def _unpair(row: dict) -> list[dict]:
    """A preference pair as two unpaired rows, next to each other: the chosen answer desirable, the rejected not."""
    pair = _preference(row)
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


@dataclass(frozen=True)
class Format:
    fields: tuple[str, ...]  # what a row of this format has (how it is detected)
    convert: Callable[[dict], dict]
    shape: str  # how the error for an unrecognized file describes it


FORMATS: dict[str, dict[str, Format]] = {
    "sft": {
        "messages": Format(("messages",), sft_example,
                           "messages=[{role, content}] (TRL conversational, UltraChat, OpenAI with string or text-part content)"),
        "sharegpt": Format(("conversations",), _sharegpt_sft, "conversations=[{from: human|gpt|system, value}] (ShareGPT)"),
        "alpaca": Format(("instruction", "output"), _alpaca_sft, "instruction, input, output (Alpaca)"),
        "prompt_completion": Format(("prompt", "completion"), _prompt_completion,
                                    "prompt, completion as strings or message lists (TRL prompt-completion)"),
        "text": Format(("text",), _text, "text (TRL standard language modeling)"),
    },
    "dpo": {
        "sharegpt": Format(("conversations", "chosen", "rejected"), _sharegpt_preference,
                           "conversations + chosen/rejected {from, value} (ShareGPT preference, LLaMA-Factory)"),
        "alpaca": Format(("instruction", "chosen", "rejected"), _alpaca_preference,
                         "instruction, input, chosen, rejected (Alpaca preference)"),
        "preference": Format(("chosen", "rejected"), _preference,
                             "chosen, rejected, optional prompt, as strings or message lists (TRL preference, UltraFeedback)"),
    },
    "kto": {
        "sharegpt": Format(("conversations", "kto_tag"), _sharegpt_unpaired,
                           "conversations=[{from, value}] ending with the answer, kto_tag (LLaMA-Factory KTO)"),
        "alpaca": Format(("instruction", "output", "kto_tag"), _alpaca_unpaired,
                         "instruction, input, output, kto_tag (Alpaca with LLaMA-Factory's KTO tag)"),
        "unpaired": Format(("prompt", "completion", "label"), _unpaired,
                           "prompt, completion, label as strings or message lists (TRL unpaired preference)"),
        "preference": Format(("chosen", "rejected"), _unpair,
                             "chosen, rejected (TRL preference, UltraFeedback): each pair two rows, chosen desirable"),
    },
}
KINDS = {"sft": "sft", "dpo": "dpo (pairs)", "kto": "kto (unpaired: dpo.loss_type=kto)"}


def rename(row: dict, columns: dict[str, str]) -> dict:
    """Apply a source's `columns:` mapping (format field -> field in the file)."""
    if not columns:
        return row
    out = dict(row)
    for name, source_field in columns.items():
        if source_field not in row:
            raise Invalid("missing_field", f"no {source_field} field (mapped to {name}; fields: {', '.join(sorted(row))})")
        out[name] = out.pop(source_field)
    return out


def _matching(names: set[str], kind: str) -> str | None:
    return next((name for name, fmt in FORMATS[kind].items() if all(f in names for f in fmt.fields)), None)


def _looks_like(names: set[str], kind: str) -> str | None:
    """The other data kind whose most specific matching format the fields fit, if any."""
    fits = [(len(fmt.fields), k) for k in FORMATS if k != kind for fmt in FORMATS[k].values()
            if all(f in names for f in fmt.fields)]
    return max(fits, key=lambda fit: fit[0])[1] if fits else None


def detect_format(row: Any, kind: str, columns: dict[str, str], where: str) -> str:
    """The first format of the data kind (sft, dpo, kto) whose fields the row has; else a one-line error naming
    what was found, and the kind of data it looks like."""
    found = sorted(row) if isinstance(row, dict) else []
    names = set(found) | set(columns)
    if match := _matching(names, kind):
        return match
    accepted = "; ".join(f"{name}: {fmt.shape}" for name, fmt in FORMATS[kind].items())
    what = (f"fields {', '.join(found)}" if found else "no JSON object in its first rows" if row is None or
            isinstance(row, Invalid) else f"a {type(row).__name__}, not an object")
    other = _looks_like(names, kind)
    hint = f"; these look like {KINDS[other]} rows" if other else ""
    raise UserError(f"{where}: unrecognized {kind} data format (found {what}{hint}); accepted formats: {accepted}")


def check_format(name: str, kind: str, where: str) -> None:
    if name not in FORMATS[kind]:
        raise UserError(f"{where}: format {name!r} is not a {kind} format; use one of {', '.join(FORMATS[kind])}")


def to_examples(row: Any, kind: str, format_name: str, columns: dict[str, str]) -> list[dict]:
    """One row (already parsed) -> the data kind's examples (one; two for a pair given to KTO), or Invalid with
    its reason."""
    if not isinstance(row, dict):
        raise Invalid("wrong_type", f"a row must be an object, got {type(row).__name__}")
    example = FORMATS[kind][format_name].convert(rename(row, columns))
    return example if isinstance(example, list) else [example]
