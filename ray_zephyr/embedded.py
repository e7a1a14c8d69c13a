"""The embedded default: a tiny Llama, its tokenizer and its data, all made here, offline.

The data follows the UltraChat (`messages`) and UltraFeedback (`chosen`/`rejected`) schemas. The task is
small arithmetic and word games with one right answer, so learning is measurable: SFT loss falls, and
after DPO the model prefers the right answer (chosen) over a near miss (rejected) on held-out pairs.
Every row is a pure function of (seed, split, index), so any worker can generate any slice.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from ray_zephyr.chat_template import ZEPHYR_TEMPLATE
from ray_zephyr.seeding import seeded_rng

WORDS = "apple river stone cloud tiger piano garden yellow window silver candle forest ocean rocket".split()
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
MODEL_VERSION = "tiny-llama-v1"
TEACHER_ACCURACY = 0.5  # share of right answers in the SFT chats (the preference pairs always rank right first)


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(question, right answer, near-miss answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."
    if kind == 1:
        word = rng.choice(WORDS)
        letters = list(word)
        i = rng.randrange(len(letters) - 1)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        near = "".join(letters[::-1]) if "".join(letters) != word else word
        return f"Spell {word} backwards.", f"{word} backwards is {word[::-1]}.", f"{word} backwards is {near}."
    if kind == 2:
        nums = rng.sample(range(10), 3)
        right = " ".join(str(n) for n in sorted(nums))
        wrong = " ".join(str(n) for n in sorted(nums)[::-1])
        return f"Sort {' '.join(map(str, nums))}.", f"Sorted: {right}.", f"Sorted: {wrong}."
    word = rng.choice(WORDS)
    other = rng.choice([w for w in WORDS if len(w) != len(word)])
    return f"How many letters are in {word}?", f"{word} has {len(word)} letters.", f"{word} has {len(other)} letters."


def _swap_two(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


# question pattern -> (right answer, near miss) from the question's parts
_QUESTIONS = {
    re.compile(r"What is (\d) plus (\d)\?"): (
        lambda a, b: f"{a} plus {b} is {int(a) + int(b)}.",
        lambda rng, a, b: f"{a} plus {b} is {int(a) + int(b) + rng.choice([-2, -1, 1, 2])}."),
    re.compile(r"Spell (\w+) backwards\."): (
        lambda w: f"{w} backwards is {w[::-1]}.",
        lambda rng, w: f"{w} backwards is {_swap_two(w[::-1], rng)}."),
    re.compile(r"Sort (\d) (\d) (\d)\."): (
        lambda *n: f"Sorted: {' '.join(sorted(n))}.",
        lambda rng, *n: f"Sorted: {' '.join(sorted(n, reverse=True))}."),
    re.compile(r"How many letters are in (\w+)\?"): (
        lambda w: f"{w} has {len(w)} letters.",
        lambda rng, w: f"{w} has {len(w) + rng.choice([-1, 1])} letters."),
}


def _answers(question: str):
    for pattern, answers in _QUESTIONS.items():
        if found := pattern.fullmatch(question.strip()):
            return answers, found.groups()
    return None, ()


def right_answer(question: str) -> str | None:
    """The one right answer to a task question (None: not a task question)."""
    answers, parts = _answers(question)
    return answers[0](*parts) if answers else None


def verify(prompt: list[dict], completion: str) -> float:
    """The task's judge (AIF `judge: {kind: function, function: ray_zephyr.embedded:verify}`): 1 if right, else 0."""
    return float(completion.strip() == right_answer(prompt[-1]["content"]))


_VALUES = {  # question pattern -> (the parts) -> is this line's answer the right value, in any wording
    re.compile(r"What is (\d) plus (\d)\?"): lambda line, a, b: _numbers(line)[-1:] == [int(a) + int(b)],
    re.compile(r"Spell (\w+) backwards\."): lambda line, w: re.search(rf"\b{'[- ]?'.join(w[::-1])}\b", line, re.I),
    re.compile(r"Sort (\d) (\d) (\d)\."): lambda line, *n: _numbers(line)[-3:] == sorted(map(int, n)),
    re.compile(r"How many letters are in (\w+)\?"): lambda line, w: _numbers(line)[-1:] == [len(w)],
}


def _numbers(text: str) -> list[int | float]:
    return [float(x) if "." in x else int(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


def verify_value(prompt: list[dict], completion: str) -> float:
    """A lenient judge for a real model, which answers in its own words (`verify` wants the task's exact sentence):
    1 if the first line of the answer ends on the right value (the sum, the sorted digits, the letter count) or
    spells the reversed word, else 0."""
    question, first_line = prompt[-1]["content"].strip(), (completion.strip().splitlines() or [""])[0]
    for pattern, right in _VALUES.items():
        if found := pattern.fullmatch(question):
            return float(bool(right(first_line, *found.groups())))
    return 0.0


def teacher(prompt: list[dict], n: int, seed: int) -> list[str]:
    """The task's teacher as an AIF generator (`kind: function`): the right answer at TEACHER_ACCURACY, else a
    near miss, like the answers in the SFT chats."""
    rng = random.Random(seed)
    answers, parts = _answers(prompt[-1]["content"])
    if answers is None:
        return ["I don't know."] * n
    return [answers[0](*parts) if rng.random() < TEACHER_ACCURACY else answers[1](rng, *parts) for _ in range(n)]


def _conversation(rng: random.Random, teacher_accuracy: float = 1.0) -> list[dict]:
    turns: list[dict] = []
    if rng.random() < 0.2:
        turns.append({"role": "system", "content": "You are a careful assistant."})
    for _ in range(1 + (rng.random() < 0.3)):
        question, right, wrong = _task(rng)
        answer_is_right = teacher_accuracy >= 1 or rng.random() < teacher_accuracy  # no draw at 1: rows stay as they were
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": right if answer_is_right else wrong}]
    return turns


def chat_row(seed: int, split: str, index: int) -> dict:
    """One row in the HuggingFaceH4/ultrachat_200k schema, answered by a teacher that is right half the time
    (as UltraChat's answers are uneven): SFT learns the format and the kind of answer, not which is right."""
    messages = _conversation(seeded_rng(seed, split, index), TEACHER_ACCURACY)
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}


def preference_row(seed: int, split: str, index: int) -> dict:
    """One row in the HuggingFaceH4/ultrafeedback_binarized schema: right answer chosen, near miss rejected."""
    rng = seeded_rng(seed, split, index)
    context = _conversation(rng)[:-1] if rng.random() < 0.3 else []
    if context and context[-1]["role"] == "user":
        context = context[:-1]
    question, right, wrong = _task(rng)
    prompt = [*context, {"role": "user", "content": question}]
    chosen = [*prompt, {"role": "assistant", "content": right}]
    rejected = [*prompt, {"role": "assistant", "content": wrong}]
    return {
        "prompt": question,
        "prompt_id": hashlib.sha256(question.encode()).hexdigest(),
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": float(rng.choice([8, 9, 10])),
        "score_rejected": float(rng.choice([1, 2, 3, 4])),
    }


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: every word and number form the generator can emit."""
    texts = []
    for i in range(n):
        row = preference_row(seed, "tokenizer", i)
        texts += [m["content"] for m in row["chosen"] + row["rejected"][-1:]]
    return texts


def build_tokenizer():
    """A byte-level BPE (any UTF-8 text encodes) with the Zephyr chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens(ROLE_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = ZEPHYR_TEMPLATE
    return tokenizer


def build_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0, tied: bool = True):
    """A Llama-architecture causal LM small enough to train on a laptop CPU in minutes; `tied=False` gives it an LM
    head of its own, as Mistral-7B has (benchmarks use it to time ZeRO-3's gather of a separate head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden_size // 128),  # head_dim <= 128 at any width (FlashAttention's limit is 256)
        num_key_value_heads=max(2, hidden_size // 512),  # 4096 wide: 32 heads, 8 KV heads, as Mistral-7B
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_embedded_model(folder: str | Path, hidden_size: int = 64, layers: int = 2, tied: bool = True) -> Path:
    """Write the tiny model + tokenizer as a Hugging Face folder (idempotent); returns the folder."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=hidden_size, layers=layers, tied=tied)
    tmp = folder.with_name(folder.name + f".tmp{random.randrange(1 << 30)}")
    from ray_zephyr.train.deepspeed_setup import save_pretrained_quietly

    save_pretrained_quietly(model, tmp)
    tokenizer.save_pretrained(tmp)
    for item in tmp.iterdir():
        item.replace(folder / item.name)
    tmp.rmdir()
    return folder
