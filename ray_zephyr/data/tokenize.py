"""Tokenization through the chat template, identical to TRL 1.16's SFTTrainer / DPOTrainer preparation.

SFT: the whole conversation, labels only on assistant tokens (every assistant turn, via the template's
`{% generation %}` markers), truncated to max_length; a row left with no supervised token is dropped.
DPO: prompt = all turns but the last, rendered with the generation prompt; chosen/rejected = the tokens
after the common prefix of prompt and prompt+completion (TRL's rule); a row whose prompt alone reaches
max_length is dropped (keep_start), and the collator truncates prompt+completion like TRL's.
Conversations are tokenized a batch at a time: one template render per row, one fast-tokenizer call per batch.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ray_zephyr.config import Recipe
from ray_zephyr.data.chat import check_trainable_template, set_chat_template, with_system_turn
from ray_zephyr.data.validate import Invalid
from ray_zephyr.embedded import resolve_model_path
from ray_zephyr.errors import UserError


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The model's tokenizer with the recipe's chat template; a pad token if it has none."""
    name = resolve_model_path(recipe.model.tokenizer or recipe.model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer {name!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_chat_template(tokenizer, recipe.data.chat_template)
    if recipe.stage == "sft":
        check_trainable_template(tokenizer)
    return tokenizer


def _truncate(seq: list, max_length: int, mode: str) -> list:
    return seq[:max_length] if mode == "keep_start" else seq[-max_length:]


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int, truncation_mode: str, add_empty_system: bool
) -> list[dict | Invalid]:
    conversations = [with_system_turn(e["messages"], add_empty_system) for e in examples]
    encoded = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    out: list[dict | Invalid] = []
    for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
        labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        ids, labels = _truncate(ids, max_length, truncation_mode), _truncate(labels, max_length, truncation_mode)
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


def tokenize_preference(
    tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int, truncation_mode: str, add_empty_system: bool
) -> list[dict | Invalid]:
    prompts = [with_system_turn(e["prompt"], add_empty_system) for e in examples]

    def encode(conversations: list[list[dict]], **kwargs) -> list[list[int]]:
        return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt_ids = encode(prompts, add_generation_prompt=True)
    chosen_ids = encode([p + e["chosen"] for p, e in zip(prompts, examples, strict=True)])
    rejected_ids = encode([p + e["rejected"] for p, e in zip(prompts, examples, strict=True)])
    out: list[dict | Invalid] = []
    for prompt, chosen, rejected in zip(prompt_ids, chosen_ids, rejected_ids, strict=True):
        n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        if truncation_mode == "keep_start" and n >= max_length:
            out.append(Invalid("prompt_too_long", f"prompt is {n} tokens, not below max_length={max_length}"))
        else:
            out.append({"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    return out


TOKENIZERS = {"sft": tokenize_sft, "dpo": tokenize_preference}
