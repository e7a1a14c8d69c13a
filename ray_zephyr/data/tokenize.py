"""Tokenization identical to TRL 1.16's SFTTrainer / DPOTrainer preparation, for every TRL format.

SFT: conversations through the chat template, labels only on assistant tokens (every assistant turn, via the
template's `{% generation %}` markers; for a prompt-completion conversation, the completion's); strings through
the tokenizer, labels on all of `text` or on the completion; truncated to max_length; a row left with no
supervised token is dropped. DPO: prompt rendered with the generation prompt (or tokenized as a string);
chosen/rejected = the tokens after the common prefix of prompt and prompt+completion (TRL's rule); a row whose
prompt alone reaches max_length is dropped (keep_start), and the collator truncates prompt+completion like TRL's.
KTO: the same for its one completion, as TRL's KTOTrainer.
Two departures, both off by default: `add_bos` and `max_prompt_length` reproduce the original Zephyr runs.
Rows are tokenized a batch at a time: one template render per row, one fast-tokenizer call per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from ray_zephyr.chat_template import with_system_turn
from ray_zephyr.data.validate import Invalid
from ray_zephyr.errors import UserError


def truncate(seq: Sequence, max_length: int | None, mode: str) -> Sequence:
    """TRL's truncation: keep the first (keep_start) or the last (keep_end) max_length items; None keeps all."""
    if max_length is None:
        return seq
    return seq[:max_length] if mode == "keep_start" else seq[-max_length:]


def bos_choice(tokenizer: PreTrainedTokenizerBase, choice: str) -> bool | None:
    """data.add_bos as True (always start with BOS), False (never) or None (auto: as TRL 1.16, no change)."""
    if choice == "auto":
        return None
    if choice == "true" and tokenizer.bos_token_id is None:
        raise UserError("data.add_bos=true, but the tokenizer has no BOS token; use data.add_bos=auto")
    return choice == "true"


def _with_bos(ids: list[int], bos: int | None, add_bos: bool | None) -> tuple[list[int], int]:
    """`ids` starting with BOS (add_bos True) or without it (False), and the tokens added (1) or removed (-1) at
    the front. The original zephyr-7b-beta runs tokenized the rendered template with the tokenizer's special
    tokens, so every sequence began with Mistral's `<s>`; TRL 1.16 renders without it."""
    if add_bos is None or bos is None:
        return ids, 0
    starts = ids[:1] == [bos]
    if add_bos and not starts:
        return [bos, *ids], 1
    return (ids[1:], -1) if not add_bos and starts else (ids, 0)


def _is_conversational(example: dict) -> bool:
    return not isinstance(example.get("messages", example.get("prompt", example.get("text"))), str)


def _grouped(examples: list[dict], tokenize_group) -> list:
    """Tokenize standard (string) and conversational examples each in one batch, results in input order."""
    out: list = [None] * len(examples)
    for conversational in (True, False):
        indices = [i for i, e in enumerate(examples) if _is_conversational(e) == conversational]
        if indices:
            for i, result in zip(indices, tokenize_group([examples[i] for i in indices], conversational), strict=True):
                out[i] = result
    return out


def _with_eos(text: str, eos: str) -> str:
    """TRL appends EOS to standard (string) completions that lack it."""
    return text if text.endswith(eos) else text + eos


def _sft_group(tokenizer, examples: list[dict], conversational: bool, add_empty_system: bool) -> list[tuple[list, list]]:
    """(input_ids, 0/1 loss mask) per example, before BOS and truncation: TRL SFTTrainer's rules.

    Conversations: assistant tokens (the template's generation markers); a prompt-completion conversation: its
    completion's assistant tokens. Strings: every token of `text`; the completion's tokens of prompt+completion.
    """
    eos = tokenizer.eos_token
    if conversational:
        def render(messages: list[list[dict]], **kwargs):
            return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)

        if "messages" in examples[0]:
            full = render([with_system_turn(e["messages"], add_empty_system) for e in examples],
                          return_assistant_tokens_mask=True)
            return list(zip(full["input_ids"], full["assistant_masks"], strict=True))
        prompts = [with_system_turn(e["prompt"], add_empty_system) for e in examples]
        prompt_ids = render(prompts, add_generation_prompt=True)["input_ids"]
        full = render([p + e["completion"] for p, e in zip(prompts, examples, strict=True)], return_assistant_tokens_mask=True)
        return [(ids, [int(m and i >= common_prefix_length(p, ids)) for i, m in enumerate(mask)])
                for p, ids, mask in zip(prompt_ids, full["input_ids"], full["assistant_masks"], strict=True)]
    if "text" in examples[0]:
        ids = tokenizer([_with_eos(e["text"], eos) for e in examples])["input_ids"]
        return [(x, [1] * len(x)) for x in ids]
    prompt_ids = tokenizer([e["prompt"] for e in examples])["input_ids"]
    full = tokenizer([e["prompt"] + _with_eos(e["completion"], eos) for e in examples])["input_ids"]
    return [(ids, [int(i >= common_prefix_length(p, ids)) for i in range(len(ids))])
            for p, ids in zip(prompt_ids, full, strict=True)]


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int, truncation_mode: str, add_empty_system: bool,
    *, add_bos: bool | None = None,
) -> list[dict | Invalid]:
    out: list[dict | Invalid] = []
    encoded = _grouped(examples, lambda group, conv: _sft_group(tokenizer, group, conv, add_empty_system))
    for ids, mask in encoded:
        labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        ids, change = _with_bos(ids, tokenizer.bos_token_id, add_bos)
        labels = [-100, *labels] if change == 1 else labels[1:] if change == -1 else labels
        ids, labels = truncate(ids, max_length, truncation_mode), truncate(labels, max_length, truncation_mode)
        if all(label == -100 for label in labels):
            out.append(Invalid("no_supervised_tokens", f"no assistant token left within max_length={max_length}"))
        else:
            out.append({"input_ids": ids, "labels": labels})
    return out


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prompt_group(tokenizer, examples: list[dict], conversational: bool, add_empty_system: bool,
                  completions: tuple[str, ...]) -> list[tuple]:
    """(prompt, prompt+completion for each named completion) token ids: TRL DPOTrainer's (chosen, rejected) and
    KTOTrainer's (completion) rendering of each kind of row."""
    if conversational:
        prompts = [with_system_turn(e["prompt"], add_empty_system) for e in examples]

        def encode(conversations: list[list[dict]], **kwargs) -> list[list[int]]:
            return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs)["input_ids"]

        return list(zip(encode(prompts, add_generation_prompt=True),
                        *(encode([p + e[c] for p, e in zip(prompts, examples, strict=True)]) for c in completions),
                        strict=True))
    eos = tokenizer.eos_token
    return list(zip(tokenizer([e["prompt"] for e in examples])["input_ids"],
                    *(tokenizer([e["prompt"] + _with_eos(e[c], eos) for e in examples])["input_ids"] for c in completions),
                    strict=True))


def _prompt_ids(prompt: list[int], n: int, bos: int | None, add_bos: bool | None,
                max_prompt_length: int | None) -> list[int]:
    """The prompt's first `n` tokens (where it and its completions agree), with BOS as asked, cut to
    max_prompt_length (its last tokens, after BOS when add_bos)."""
    prompt_ids, _ = _with_bos(prompt[:n], bos, add_bos)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        head = prompt_ids[:1] if add_bos else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - max_prompt_length + len(head):]
    return prompt_ids


def _prompt_too_long(prompt_ids: list[int], max_length: int, truncation_mode: str) -> Invalid | None:
    if truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
        return Invalid("prompt_too_long", f"prompt is {len(prompt_ids)} tokens, not below max_length={max_length}")
    return None


def tokenize_preference(
    tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int, truncation_mode: str, add_empty_system: bool,
    *, add_bos: bool | None = None, max_prompt_length: int | None = None,
) -> list[dict | Invalid]:
    """With max_prompt_length (the paper's 512, which TRL 1.x dropped), a longer prompt keeps its last tokens
    (after BOS when add_bos), and the collator then cuts the completions to max_length."""
    encoded = _grouped(examples, lambda group, conv: _prompt_group(tokenizer, group, conv, add_empty_system,
                                                                    ("chosen", "rejected")))
    out: list[dict | Invalid] = []
    for prompt, chosen, rejected in encoded:
        n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        prompt_ids = _prompt_ids(prompt, n, tokenizer.bos_token_id, add_bos, max_prompt_length)
        out.append(_prompt_too_long(prompt_ids, max_length, truncation_mode)
                   or {"prompt_ids": prompt_ids, "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    return out


def tokenize_unpaired(
    tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int, truncation_mode: str, add_empty_system: bool,
    *, add_bos: bool | None = None, max_prompt_length: int | None = None,
) -> list[dict | Invalid]:
    """KTO's rows as TRL's KTOTrainer prepares them: the completion is what follows the common prefix of prompt and
    prompt+completion; a prompt that alone reaches max_length is dropped."""
    encoded = _grouped(examples, lambda group, conv: _prompt_group(tokenizer, group, conv, add_empty_system,
                                                                    ("completion",)))
    out: list[dict | Invalid] = []
    for example, (prompt, full) in zip(examples, encoded, strict=True):
        n = common_prefix_length(prompt, full)
        prompt_ids = _prompt_ids(prompt, n, tokenizer.bos_token_id, add_bos, max_prompt_length)
        out.append(_prompt_too_long(prompt_ids, max_length, truncation_mode)
                   or {"prompt_ids": prompt_ids, "completion_ids": full[n:], "label": example["label"]})
    return out


TOKENIZERS = {"sft": tokenize_sft, "dpo": tokenize_preference, "kto": tokenize_unpaired}
