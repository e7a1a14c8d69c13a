"""The reward-model judge (`judge.kind: reward_model`) for real: a small sequence-classification reward model built
from a config scores completions in Ray Data actors, batched and padded, with the same scores as its own forward on
each conversation alone; one too long to score is counted, and run_aif writes the ratings and pairs from the scores."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from ray_zephyr.aif.config import AIFRecipe, JudgeConfig
from ray_zephyr.aif.judge import Judge
from ray_zephyr.config import load_recipe

PROMPTS = [[{"role": "user", "content": "What is 3 plus 4?"}],
           [{"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Spell tiger backwards."}]]
ANSWERS = ["3 plus 4 is 7.", "3 plus 4 is 8.", "tiger backwards is regit.", "I don't know, but here is a long answer " * 4]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from ray_zephyr.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("reward-model")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _own_score(folder, prompt: list[dict], answer: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    inputs = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        return model(**inputs).logits[0, 0].item()


def test_scores_equal_the_models_own_forward_and_too_long_is_counted(ray_session, reward_model_dir):
    items = [(PROMPTS[0], ANSWERS[0]), (PROMPTS[0], ANSWERS[1]), (PROMPTS[1], ANSWERS[2]), (PROMPTS[1], ANSWERS[3])]
    judge = Judge(JudgeConfig(kind="reward_model", model=str(reward_model_dir), batch_size=3, max_length=40))
    judged = judge.rate_all(items)
    for (prompt, answer), (rating, reason, replies) in zip(items[:3], judged[:3]):
        assert reason is None and replies == []
        assert rating.overall == pytest.approx(_own_score(reward_model_dir, prompt, answer), abs=1e-5)
        assert rating.aspects == {"score": rating.overall}
    assert len({r.overall for r, _, _ in judged[:3]}) == 3  # different answers, different scores
    assert judged[3] == (None, "reward_model_input_too_long", [])
    assert judge.unrated == {"reward_model_input_too_long": 1}


def test_aif_with_a_reward_model_judge_writes_ratings_and_pairs(ray_session, reward_model_dir, tmp_path):
    from ray_zephyr.aif.run import run_aif

    recipe = load_recipe("tiny-aif", ["prompts=[{path: embedded, split: train, rows: 12}]",
                                      "generators=[{name: teacher, kind: function, function: "
                                      "ray_zephyr.embedded:teacher, n: 3}]",
                                      f"judge={{kind: reward_model, model: {reward_model_dir}, batch_size: 8}}",
                                      "binarize=zephyr", f"output_dir={tmp_path}"], AIFRecipe)
    summary = run_aif(recipe)
    assert summary.rated == summary.completions["teacher"] == 3 * summary.prompts
    rows = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert len(rows) == summary.pairs == summary.prompts
    for row in rows[:3]:
        best = max(row["completions"], key=lambda c: c["overall"])
        assert row["score_chosen"] == best["overall"]
        assert row["score_chosen"] == pytest.approx(
            _own_score(reward_model_dir, row["chosen"][:-1], row["chosen"][-1]["content"]), abs=1e-5)


def test_reward_model_keys_need_that_kind():
    with pytest.raises(ValueError, match="judge kind reward_model needs model"):
        JudgeConfig(kind="reward_model")
    with pytest.raises(ValueError, match="judge batch_size, model are for kind reward_model, not function"):
        JudgeConfig(kind="function", function="ray_zephyr.embedded:verify", model="x", batch_size=4)
