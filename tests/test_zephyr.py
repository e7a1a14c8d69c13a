"""`python jobs/zephyr.py`, the README's main command, as a user runs it: dSFT -> AIF -> dDPO -> evaluation -> chats
with the served model -> summary, on fewer rows and one round (the rounds' loop is tests/test_iterative.py's) so it
stays around 3 minutes (slow).

Its two training stages are also the suite's SFT -> DPO run through Ray Train (2 CPU workers, DeepSpeed ZeRO-3,
the tiny recipes): what they log and write, and that DPO starts from the SFT model and moves away from it, is
checked here on the same run rather than on a second one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALLER = ["--rounds=1", "sft.data.train=[{path: embedded, split: train, rows: 800}]", "sft.train.epochs=1",
           "aif.prompts=[{path: embedded, split: train, rows: 800}]",
           "data.eval=[{path: embedded, split: test, rows: 96}]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zephyr")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on a laptop
    done = subprocess.run([sys.executable, "jobs/zephyr.py", "--out", str(out), *SMALLER], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=800)  # ~230 s here, ~350 s on the slowest CI machine seen
    return out, done


def _records(path: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def _generates(model_dir: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_exits_cleanly_with_a_summary_table(run):
    out, done = run
    assert done.returncode == 0, done.stderr[-4000:] + (out / "zephyr.log").read_text()[-4000:]
    assert "== ray-zephyr: the Zephyr recipe end to end in" in done.stdout
    for row in ("dSFT eval loss, held-out chats", "preference accuracy, SFT model (96 held-out pairs)",
                "preference accuracy, round 1's DPO model (96 held-out pairs)", "DPO reward accuracy / margin vs SFT reference",
                "greedy task accuracy, SFT model", "greedy task accuracy, round 1's DPO model"):
        assert f"| {row}" in done.stdout
    assert f"model:   {out / 'round-1' / 'dpo' / 'model'}" in done.stdout
    assert f"serve run serve.app:build_app model={out / 'round-1' / 'dpo' / 'model'}" in done.stdout
    rounds = done.stdout.split("AI feedback and dDPO, round by round")[1].splitlines()
    assert rounds[1] == "| figure | dSFT | round 1 |" and any(line.startswith("| pairs |  | ") for line in rounds)
    assert "dSFT" in done.stderr and "dDPO" in done.stderr  # the progress bars
    assert "Traceback" not in done.stdout + done.stderr


def test_learning_is_visible(run):
    out, done = run
    numbers = json.loads((out / "summary.json").read_text())
    assert numbers["pairs"] == 96
    assert numbers["dpo_preference_accuracy"] > numbers["sft_preference_accuracy"]
    assert numbers["reward_margin"] > 0
    aif = json.loads((out / "round-1" / "aif" / "summary.json").read_text())
    assert numbers["rounds"][0]["pairs"] == aif["pairs"] > 100
    assert aif["dropped_prompts"].keys() <= {"tie", "fewer_than_2_rated"}
    assert numbers["dpo_task_accuracy"] >= numbers["sft_task_accuracy"]  # what the model says did not get worse
    first, last = numbers["sft_eval_loss"]
    assert last < first
    assert f"| {numbers['dpo_preference_accuracy']:.3f}" in done.stdout  # the table shows the same numbers


def test_training_curves_png(run):
    out, _ = run
    png = (out / "training_curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000  # four panels of lines, not an empty canvas


def test_served_chat_answers_are_printed(run):
    out, done = run
    chats = done.stdout.split("sample chats with the served DPO model:")[1].split("\n\n")[0].splitlines()
    users = [line for line in chats if line.startswith("  user: ")]
    answers = [line.removeprefix("  assistant: ") for line in chats if line.startswith("  assistant: ")]
    assert users == ["  user: What is 3 plus 4?", "  user: Sort 8 1 5.", "  user: Spell tiger backwards."]
    # Served greedily: the DPO model's own greedy continuation (transformers, here), as the job prints it.
    tokenizer = AutoTokenizer.from_pretrained(out / "round-1" / "dpo" / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "round-1" / "dpo" / "model").eval()
    expected = []
    for user in users:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user.removeprefix("  user: ")}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**prompt, max_new_tokens=32, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        expected.append(tokenizer.decode(ids, skip_special_tokens=True).strip() or "(nothing: it ended its answer at once)")
    assert answers == expected
    assert "ServeReplica:sample-chats:ChatDeployment" in (out / "zephyr.log").read_text()  # a Ray Serve replica answered


def test_sft_stage_logs_evaluates_and_writes_a_model(run):
    out, _ = run
    train = _records(out / "sft" / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(5, 51, 5))  # 800 rows / 16 per step, logged every 5
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    for name in ("loss", "entropy", "mean_token_accuracy", "lr", "grad_norm", "tokens/s", "samples/s", "num_tokens"):
        assert all(name in r for r in train), name
    evals = _records(out / "sft" / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [25, 50] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    model_dir = out / "sft" / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "generation_config.json").is_file()
    assert "<|assistant|>" in AutoTokenizer.from_pretrained(model_dir).chat_template
    _generates(model_dir)


def test_dpo_stage_trains_on_precomputed_reference_logps_and_moves_the_policy(run):
    out, _ = run
    dpo = out / "round-1" / "dpo"
    rows = pa.ipc.open_file(pa.memory_map(str(dpo / "data" / "train" / "rows.arrow"))).read_all()
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(rows.column_names)  # the reference pass ran before training
    train = _records(dpo / "metrics.jsonl", "train")
    assert train[-1]["loss"] < train[0]["loss"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "lr", "grad_norm", "tokens/s", "samples/s"):
        assert all(name in r for r in train), name
    final_eval = _records(dpo / "metrics.jsonl", "eval")[-1]
    assert final_eval["eval_rewards/accuracies"] > 0.6 and final_eval["eval_rewards/margins"] > 0
    _generates(dpo / "model")
    before = AutoModelForCausalLM.from_pretrained(out / "sft" / "model").state_dict()
    after = AutoModelForCausalLM.from_pretrained(dpo / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
