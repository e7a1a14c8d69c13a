"""`ray job submit` for real: a Ray head started with `ray start` on 127.0.0.1 (token authentication on, its
own ports and temp dir), jobs/sft.py then jobs/dpo.py submitted with `--working-dir .` on the tiny recipes,
and a job with a bad recipe key whose `ray job logs` show the one-line error (slow: ~3 min).

The head is stopped by killing the processes it started, found by its private temp dir: a bare `ray stop`
would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SMALL = ["data.train=[{path: embedded, split: train, rows: 192}]", "data.eval=[{path: embedded, split: test, rows: 32}]",
         "train.log_every_steps=4", "train.eval_every_steps=0"]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of our head: each has the private temp dir (or the session dir inside it) on its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _stop_head(temp_dir: str) -> None:
    procs = _head_processes(temp_dir)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def head():
    """A `ray start --head` cluster; yields (dashboard address, environment with its token, its temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="rz-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=8",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", env, temp_dir
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(head, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray <group> <command> --address <head> ...` with the head's token (or `env`)."""
    address, head_env, _ = head
    return subprocess.run([RAY, *args[:2], "--address", address, "--log-color", "false", *args[2:]], cwd=ROOT,
                          env=env or head_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def jobs(head, tmp_path_factory):
    """dSFT, dDPO and a job with a bad recipe key, submitted together (on 2 cores their start-ups overlap)."""
    out = tmp_path_factory.mktemp("jobs")
    entrypoints = {
        "sft": ["jobs/sft.py", "--config", "tiny-sft", *SMALL, f"train.output_dir={out}/sft"],
        "dpo": ["jobs/dpo.py", "--config", "tiny-dpo", *SMALL, f"train.output_dir={out}/dpo", "model.name_or_path=embedded"],
        "bad": ["jobs/sft.py", "--config", "tiny-sft", "train.lrr=1e-3", f"train.output_dir={out}/bad"],
    }
    address, env, _ = head
    running = {}
    for name, entrypoint in entrypoints.items():
        job_id = f"zephyr-{name}-{uuid.uuid4().hex[:8]}"
        command = [RAY, "job", "submit", "--address", address, "--log-color", "false", "--submission-id", job_id,
                   "--working-dir", ".", "--",
                   "python", *entrypoint]  # blocks, printing the job's logs, until the job ends
        running[name] = job_id, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True)
    submitted = {}
    for name, (job_id, proc) in running.items():
        output, _ = proc.communicate(timeout=600)
        status = _ray(head, "job", "status", job_id).stdout
        submitted[name] = {"id": job_id, "output": output, "status": status}
    return out, submitted


def test_sft_and_dpo_jobs_succeed(jobs):
    out, submitted = jobs
    for name in ("sft", "dpo"):
        job = submitted[name]
        assert f"Job '{job['id']}' succeeded" in job["status"], job["output"][-4000:]
        assert (out / name / "model" / "model.safetensors").is_file()
        assert "final: step=" in job["output"]  # the job's own summary line


def test_working_dir_upload_leaves_out_ignored_files(head, jobs):
    """What --working-dir sent, as unpacked on the head: the checkout without what .gitignore lists."""
    ignored = [name for name in (".venv", ".pytest_cache", "outputs") if (ROOT / name).exists()]
    unpacked = [p for p in Path(head[2]).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert unpacked and ignored
    for folder in unpacked:
        assert (folder / "jobs" / "sft.py").is_file() and (folder / "ray_zephyr" / "recipes" / "tiny-sft.yaml").is_file()
        assert not [name for name in ignored if (folder / name).exists()]


def test_bad_recipe_key_fails_with_one_line_error(head, jobs):
    _, submitted = jobs
    job = submitted["bad"]
    assert f"Job '{job['id']}' failed" in job["status"]
    logs = _ray(head, "job", "logs", job["id"]).stdout
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown key 'train.lrr' (did you mean 'lr'?)" in errors[0], logs[-3000:]
    assert "Traceback" not in logs


def test_token_auth_is_on(head):
    denied = _ray(head, "job", "list", env=dict(head[1], RAY_AUTH_TOKEN="not-the-token"))
    assert denied.returncode != 0
    assert "auth" in (denied.stdout + denied.stderr).lower()
    allowed = _ray(head, "job", "list")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
