"""Chat formatting: the tokenizer's own template, Zephyr's for tokenizers that have none, or SmolLM2's ChatML.

The Zephyr template carries `{% generation %}` markers so that `apply_chat_template(...,
return_assistant_tokens_mask=True)` marks exactly the assistant tokens (content + end-of-turn), the
same mask TRL's SFTTrainer uses for assistant-only loss.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ray_zephyr.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ZEPHYR_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)

# SmolLM2-Instruct's own template (a default system turn, ChatML turns), with the generation markers it lacks, so
# that SFT can start from it: tests/test_chat_template.py renders both and checks they give the same text.
SMOLLM2_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
NAMED_TEMPLATES = {"zephyr": ZEPHYR_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE}


def has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def set_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str = "auto") -> PreTrainedTokenizerBase:
    """Give `tokenizer` the template the recipe asks for (auto: its own, else Zephyr's); returns it."""
    if choice in NAMED_TEMPLATES:
        tokenizer.chat_template = NAMED_TEMPLATES[choice]
    elif choice == "auto" and not tokenizer.chat_template:
        tokenizer.chat_template = ZEPHYR_TEMPLATE
    elif choice != "auto":
        tokenizer.chat_template = choice
    return tokenizer


def check_trainable_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """SFT needs `{% generation %}` markers to know which tokens are the assistant's."""
    if not has_generation_markers(tokenizer.chat_template or ""):
        raise UserError(
            "the tokenizer's chat template has no {% generation %} markers, so assistant tokens cannot be "
            "found for the loss; set data.chat_template=zephyr (or smollm2 for SmolLM2-Instruct) or give a template with the markers"
        )


def with_system_turn(messages: list[dict], add_empty_system: bool) -> list[dict]:
    """The handbook inserted an empty system turn when a conversation had none."""
    if add_empty_system and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": ""}, *messages]
    return messages
