"""The device check script (bench/gpu_check.py) runs, so it works the day a GPU machine is at hand: on CPU its
environment, optimizer and correctness sections (our ZeRO-3 engine and SFT step against plain PyTorch, padding-free
off and on, gradient checkpointing off and on) pass and write their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_passes_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # ~1 min here
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [name for name in results if isinstance(results[name], dict)] == ["environment", "optimizer", "correctness"]
    assert all(results[name]["ok"] for name in ("environment", "optimizer", "correctness")), done.stdout
    assert results["environment"]["packages"]["deepspeed"] and results["environment"]["gpu"] is None
    assert results["optimizer"] == results["optimizer"] | {"optimizer": "torch.optim.adamw.AdamW", "fused": False}
    cases = results["correctness"]["cases"]
    assert len(cases) == 4 and all(c["agree"] for c in cases.values())
    # the second step's loss follows an AdamW update: equal losses there mean equal optimizer steps
    for case in cases.values():
        assert case["ours"]["step_2_loss"] == pytest.approx(case["plain_pytorch"]["step_2_loss"], rel=1e-4)
        assert case["ours"]["step_2_loss"] != case["ours"]["step_1_loss"]
