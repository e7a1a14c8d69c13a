"""The formats users bring: each converted to the examples TRL prepares, bad rows rejected with their reason,
unrecognized files named in one line, and a ShareGPT preference file through the whole Ray pipeline."""

from __future__ import annotations

import json

import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.data.formats import FORMATS, detect_format, to_examples
from ray_zephyr.data.pipeline import build_datasets
from ray_zephyr.data.tokenize import tokenize_preference, tokenize_unpaired
from ray_zephyr.data.validate import Invalid
from ray_zephyr.errors import UserError
from ray_zephyr.models import load_tokenizer

USER, ASSISTANT, SYSTEM = ({"role": r, "content": c} for r, c in
                           [("user", "Hi?"), ("assistant", "Hello."), ("system", "Be brief.")])
GOOD = [  # (stage, row, expected example)
    ("sft", {"messages": [USER, ASSISTANT]}, {"messages": [USER, ASSISTANT]}),
    ("sft", {"messages": [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i?"}]},
                          ASSISTANT]}, {"messages": [USER, ASSISTANT]}),
    ("sft", {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}]}, {"messages": [SYSTEM, USER, ASSISTANT]}),
    ("sft", {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
             "system": "Be brief."}, {"messages": [SYSTEM, USER, ASSISTANT]}),
    ("sft", {"instruction": "Translate", "input": "chat", "output": "cat"},
     {"messages": [{"role": "user", "content": "Translate\nchat"}, {"role": "assistant", "content": "cat"}]}),
    ("sft", {"instruction": "Hi?", "input": "", "output": "Hello.", "history": [["Hey", "Yo"]]},
     {"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}, USER, ASSISTANT]}),
    ("sft", {"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "completion": "4"}),
    ("sft", {"prompt": [USER], "completion": [ASSISTANT]}, {"prompt": [USER], "completion": [ASSISTANT]}),
    ("sft", {"text": "Once upon a time"}, {"text": "Once upon a time"}),
    ("dpo", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    ("dpo", {"chosen": "The sky is blue.", "rejected": "The sky is green."},
     {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    ("dpo", {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Bye."}]},
     {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Bye."}]}),
    ("dpo", {"prompt": "Hi?", "chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "Bye."}]},
     {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Bye."}]}),
    ("dpo", {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello."},
             "rejected": {"from": "gpt", "value": "Bye."}},
     {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Bye."}]}),
    ("dpo", {"instruction": "Hi?", "input": "", "chosen": "Hello.", "rejected": "Bye."},
     {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Bye."}]}),
    ("kto", {"prompt": "2+2=", "completion": "4", "label": True}, {"prompt": "2+2=", "completion": "4", "label": True}),
    ("kto", {"prompt": [USER], "completion": [ASSISTANT], "label": False},
     {"prompt": [USER], "completion": [ASSISTANT], "label": False}),
    ("kto", {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}], "kto_tag": False},
     {"prompt": [USER], "completion": [ASSISTANT], "label": False}),
    ("kto", {"instruction": "Hi?", "input": "", "output": "Hello.", "kto_tag": True},
     {"prompt": [USER], "completion": [ASSISTANT], "label": True}),
    ("kto", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},  # a pair: two rows, as TRL unpairs
     [{"prompt": "The sky is", "completion": " blue.", "label": True},
      {"prompt": "The sky is", "completion": " green.", "label": False}]),
]


@pytest.mark.parametrize("stage, row, expected", GOOD)
def test_each_format_is_detected_and_converted(stage, row, expected):
    name = detect_format(row, stage, {}, "file")
    assert to_examples(row, stage, name, {}) == (expected if isinstance(expected, list) else [expected])
    if "conversations" in row or "instruction" in row:
        assert name in ("sharegpt", "alpaca")


BAD = [  # (stage, format, row, reason)
    ("sft", "sharegpt", {"conversations": [{"from": "human", "value": "Hi?"}, {"value": "Hello."}]}, "missing_field"),
    ("sft", "sharegpt", {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "bot", "value": "x"}]}, "unknown_role"),
    ("sft", "sharegpt", {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": " "}]}, "empty_content"),
    ("sft", "sharegpt", {"conversations": [{"from": "gpt", "value": "Hello."}]}, "bad_turn_order"),
    ("sft", "sharegpt", {"conversations": "Hi?"}, "wrong_type"),
    ("sft", "alpaca", {"instruction": "Hi?", "input": ""}, "missing_field"),
    ("sft", "alpaca", {"instruction": "", "output": "Hello."}, "empty_content"),
    ("sft", "alpaca", {"instruction": "Hi?", "output": 4}, "wrong_type"),
    ("sft", "messages", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                      ASSISTANT]}, "unsupported_content"),
    ("sft", "prompt_completion", {"prompt": "2+2=", "completion": [ASSISTANT]}, "wrong_type"),
    ("sft", "prompt_completion", {"prompt": [USER, ASSISTANT], "completion": [ASSISTANT]}, "bad_turn_order"),
    ("sft", "text", {"text": ""}, "empty_content"),
    ("dpo", "sharegpt", {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello."}},
     "missing_field"),
    ("dpo", "sharegpt", {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": ""},
                         "rejected": {"from": "gpt", "value": "Bye."}}, "empty_content"),
    ("dpo", "sharegpt", {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "human", "value": "x"},
                         "rejected": {"from": "gpt", "value": "Bye."}}, "bad_turn_order"),
    ("dpo", "sharegpt", {"conversations": [{"from": "alien", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "x"},
                         "rejected": {"from": "gpt", "value": "Bye."}}, "unknown_role"),
    ("dpo", "preference", {"chosen": "Same.", "rejected": "Same."}, "empty_content"),
    ("dpo", "preference", {"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "No"}, ASSISTANT]},
     "prompt_mismatch"),
    ("dpo", "preference", {"prompt": [USER], "chosen": [USER], "rejected": [ASSISTANT]}, "bad_turn_order"),
    ("dpo", "preference", [1, 2], "wrong_type"),
    ("kto", "unpaired", {"prompt": "2+2=", "completion": "4", "label": "yes"}, "wrong_type"),
    ("kto", "unpaired", {"prompt": "2+2=", "completion": "4", "label": None}, "missing_field"),
    ("kto", "unpaired", {"prompt": [USER], "completion": [USER], "label": True}, "bad_turn_order"),
    ("kto", "sharegpt", {"conversations": [{"from": "human", "value": "Hi?"}], "kto_tag": True}, "bad_turn_order"),
    ("kto", "alpaca", {"instruction": "Hi?", "output": "Hello.", "kto_tag": 1}, "wrong_type"),
]


@pytest.mark.parametrize("stage, name, row, reason", BAD)
def test_bad_rows_are_rejected_with_their_reason(stage, name, row, reason):
    with pytest.raises(Invalid) as info:
        to_examples(row, stage, name, {})
    assert info.value.reason == reason


def test_columns_map_fields_before_detection():
    row = {"question": "The sky is", "good": " blue.", "bad": " green."}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert detect_format(row, "dpo", columns, "f") == "preference"
    assert to_examples(row, "dpo", "preference", columns) == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    with pytest.raises(Invalid, match="no good field"):
        to_examples({"question": "x", "bad": "y"}, "dpo", "preference", columns)


def test_an_unrecognized_file_is_one_line_naming_fields_and_formats():
    with pytest.raises(UserError) as info:
        detect_format({"question": "q", "answer": "a"}, "dpo", {}, "data file x.jsonl")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data file x.jsonl: unrecognized dpo data format (found fields answer, question); accepted")
    assert all(f"{name}: " in message for name in FORMATS["dpo"])


def test_unpaired_rows_given_to_a_paired_objective_are_one_line_saying_what_they_look_like():
    with pytest.raises(UserError) as info:
        detect_format({"prompt": "q", "completion": "a", "label": True}, "dpo", {}, "data file k.jsonl")
    message = str(info.value)
    assert "\n" not in message and "these look like kto (unpaired: dpo.loss_type=kto) rows" in message
    with pytest.raises(UserError, match="these look like sft rows"):
        detect_format({"messages": []}, "kto", {}, "data file chats.jsonl")


def test_kto_rows_through_the_pipeline_with_pairs_split_and_bad_labels_counted(ray_session, tmp_path):
    """Unpaired rows (one with a label that is no boolean) and pairs, each pair split into a desirable and an
    undesirable row: the desirable halves of a read batch first, so no row sits next to its own prompt's other
    answer (KTO's KL term pairs neighbours)."""
    def turn(role, text):
        return [{"role": role, "content": text}]

    unpaired = [{"prompt": turn("user", "Hi?"), "completion": turn("assistant", "Hello."), "label": True},
                {"prompt": turn("user", "Why?"), "completion": turn("assistant", "Because."), "label": False},
                {"prompt": turn("user", "Hm?"), "completion": turn("assistant", "Hm."), "label": "yes"}]
    pairs = [{"prompt": turn("user", q), "chosen": turn("assistant", "Yes."), "rejected": turn("assistant", "No.")}
             for q in ("Is it?", "Really?")]
    files = [tmp_path / "unpaired.jsonl", tmp_path / "pairs.jsonl"]
    for file, rows in zip(files, (unpaired, pairs), strict=True):
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe("tiny-dpo", ["model.name_or_path=embedded", f"data.train=[{{path: '{files[0]}'}}, {{path: '{files[1]}'}}]",
                                      "data.eval=[]", "data.on_bad_row=skip", "data.shuffle=false",
                                      "dpo.loss_type=kto", "dpo.rpo_alpha=0"])
    tokenizer = load_tokenizer(recipe)
    data = build_datasets(recipe, tokenizer)
    got = data.train.take_all()
    assert [(r["row"], bool(r["label"])) for r in got] == [(0, True), (1, False), (0, True), (1, True), (0, False),
                                                           (1, False)]
    examples = [*to_examples(unpaired[0], "kto", "unpaired", {}), *to_examples(unpaired[1], "kto", "unpaired", {})]
    examples += [e for label in (True, False) for p in pairs for e in to_examples(p, "kto", "preference", {})
                 if e["label"] == label]
    expected = tokenize_unpaired(tokenizer, examples, 128, "keep_start", False)
    assert [list(r["completion_ids"]) for r in got] == [e["completion_ids"] for e in expected]
    assert [list(r["prompt_ids"]) for r in got] == [e["prompt_ids"] for e in expected]
    report = data.report()
    assert report.dropped("train") == {"wrong_type": 1} and report.read("train") == 5


def test_sharegpt_preference_file_through_the_pipeline_with_bad_rows_counted(ray_session, tmp_path):
    """The issue's case: LLaMA-Factory ShareGPT preference rows used to pass the file check and all be dropped."""
    def row(question, chosen="Yes.", rejected="No.", who="human"):
        return {"conversations": [{"from": who, "value": question}], "chosen": {"from": "gpt", "value": chosen},
                "rejected": {"from": "gpt", "value": rejected}}

    rows = [row("Is it?"), row("Really?"), row("Hm?", chosen=""), row("Who?", who="robot"),
            {"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "gpt", "value": "y"}}, row("Sure?")]
    file = tmp_path / "prefs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe("tiny-dpo", ["model.name_or_path=embedded", f"data.train.0.path={file}", "data.train.0.rows=null",
                                      "data.eval=[]", "data.on_bad_row=skip"])
    tokenizer = load_tokenizer(recipe)
    data = build_datasets(recipe, tokenizer)
    got = sorted(data.train.take_all(), key=lambda r: r["row"])
    assert [r["row"] for r in got] == [0, 1, 5]
    expected = tokenize_preference(tokenizer, [to_examples(rows[i], "dpo", "sharegpt", {})[0] for i in (0, 1, 5)], 128,
                                   "keep_start", False)
    assert [list(r["prompt_ids"]) for r in got] == [e["prompt_ids"] for e in expected]
    assert [list(r["chosen_ids"]) for r in got] == [e["chosen_ids"] for e in expected]
    report = data.report()
    assert report.dropped("train") == {"empty_content": 1, "missing_field": 1, "unknown_role": 1}
    assert report.read("train") == 6
