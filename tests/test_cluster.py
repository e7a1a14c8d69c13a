"""A user's first cluster run, for real on one machine: a Ray head started with `ray start` (token auth on, its
own ports and temp dir) plus a worker node joined with `ray start --address` (its own temp dir and ports), an
S3-compatible server on 127.0.0.1, and the jobs submitted with `ray job submit --working-dir .` (slow: ~5 min).

- dSFT writes to s3://, its two workers on different nodes; one worker is killed mid-run and the run resumes
  from the checkpoint on S3, each worker downloading only its own ZeRO shards.
- dDPO starts from the dSFT model's URI and writes to s3://; both models reload from their URIs.
- A local output path on this two-node cluster, and a bad recipe key, are one-line errors.

Each node is stopped by killing the processes it started, found by its private temp dir: a bare `ray stop`
would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from ray_zephyr import storage
from ray_zephyr.runtime import TRAIN_POLL_ENV, free_ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SMALL = ["data.train=[{path: embedded, split: train, rows: 192}]", "data.eval=[{path: embedded, split: test, rows: 32}]",
         "train.log_every_steps=4", "train.eval_every_steps=0", "train.epochs=1"]




def _stop_node(temp_dir: str) -> None:
    """Every process of one node has its private temp dir (or the session dir inside it) on its command line."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in p.info["cmdline"] or [])]
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


def _start_node(env: dict, *args: str) -> str:
    temp_dir = tempfile.mkdtemp(prefix="rz-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(6)
    command = [RAY, "start", "--node-ip-address=127.0.0.1", "--num-cpus=4", "--object-store-memory=300000000",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", *args]
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=180)
    except subprocess.CalledProcessError as exc:
        _stop_node(temp_dir)
        raise RuntimeError(f"ray start failed: {exc.stderr[-2000:]}") from None
    return temp_dir


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Head + one worker node, both reaching the S3 server; yields (dashboard address, environment, head temp dir).
    The nodes' home is new, as a fresh cluster's is: no model cache, nothing built by an earlier run."""
    gcs, dashboard, client = free_ports(3)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **s3_server,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               HOME=str(tmp_path_factory.mktemp("home")))
    env[TRAIN_POLL_ENV] = "0.25"  # Ray Train's poll of its workers, as on a local Ray (ray_zephyr.runtime)
    # every process on the nodes finds this cluster, not the session's Ray on the same machine (Ray Train's
    # placement-group cleaner, a detached actor, looks the address up and fails on two; a real node has one Ray)
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    nodes = []
    try:
        nodes.append(_start_node(env, "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}"))
        nodes.append(_start_node(env, f"--address=127.0.0.1:{gcs}"))
        yield f"http://127.0.0.1:{dashboard}", env, nodes[0]
    finally:
        for temp_dir in reversed(nodes):
            _stop_node(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(cluster, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray <group> <command> --address <head> ...` with the cluster's token (or `env`)."""
    address, cluster_env, _ = cluster
    return subprocess.run([RAY, *args[:2], "--address", address, "--log-color", "false", *args[2:]], cwd=ROOT,
                          env=env or cluster_env, capture_output=True, text=True, timeout=timeout)


def _submit(cluster, entrypoint: list[str], env_vars: dict | None = None) -> tuple[str, subprocess.Popen]:
    address, env, _ = cluster
    job_id = f"zephyr-{uuid.uuid4().hex[:8]}"
    command = [RAY, "job", "submit", "--address", address, "--log-color", "false", "--submission-id", job_id,
               "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": env_vars or {}}), "--",
               "python", *entrypoint]  # blocks, printing the job's logs, until the job ends
    return job_id, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)


def _finish(cluster, job_id: str, proc: subprocess.Popen) -> dict:
    output, _ = proc.communicate(timeout=900)
    return {"id": job_id, "output": output, "status": _ray(cluster, "job", "status", job_id).stdout}


@pytest.fixture(scope="module")
def jobs(cluster, s3_server, tmp_path_factory):
    """dSFT on S3 with a worker killed after step 6 (checkpoints every 4 steps), then dDPO from its URI; meanwhile a
    job with a local output path and one with a bad recipe key (on 2 cores their start-ups overlap)."""
    bucket = f"s3://rz-test/cluster-{uuid.uuid4().hex[:6]}"
    local = tmp_path_factory.mktemp("local")
    sft = _submit(cluster, ["jobs/sft.py", "--config", "tiny-sft", *SMALL, f"train.output_dir={bucket}/sft",
                            "train.placement_strategy=STRICT_SPREAD", "train.checkpoint_every_steps=4"],
                  {"RAY_ZEPHYR_FAULT": "after_step:6", "RAY_ZEPHYR_PROGRESS_EVERY_S": "1"})
    bad = {
        "local": _submit(cluster, ["jobs/sft.py", "--config", "tiny-sft", f"train.output_dir={local}/sft"]),
        "key": _submit(cluster, ["jobs/sft.py", "--config", "tiny-sft", "train.lrr=1e-3", f"train.output_dir={local}/x"]),
    }
    submitted = {"sft": _finish(cluster, *sft)}
    dpo = _submit(cluster, ["jobs/dpo.py", "--config", "tiny-dpo", *SMALL, f"train.output_dir={bucket}/dpo",
                            f"model.name_or_path={bucket}/sft/model", "train.placement_strategy=STRICT_SPREAD"])
    submitted |= {name: _finish(cluster, *job) for name, job in bad.items()}
    submitted["dpo"] = _finish(cluster, *dpo)
    return bucket, submitted


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))


def test_sft_then_dpo_from_its_uri_succeed_with_outputs_on_s3(jobs, s3_env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket, submitted = jobs
    models = {}
    for name in ("sft", "dpo"):
        job = submitted[name]
        assert f"Job '{job['id']}' succeeded" in job["status"], job["output"][-4000:]
        final = [line for line in job["output"].splitlines() if line.startswith("final: ")]
        assert final and final[0].startswith("final: step=12, loss="), job["output"][-3000:]  # from Ray Train's Result
        assert f"model: {bucket}/{name}/model" in job["output"]
        # no terminal in a Ray job: plain progress lines, read from the run's files on S3 (dSFT: one a second)
        progress = [line for line in job["output"].splitlines() if line.startswith(f"d{name.upper()}: ")]
        assert progress[0] == f"d{name.upper()}: 12 steps" and progress[-1].startswith(
            f"d{name.upper()}: step 12/12 (100%), loss "), progress
        assert ", lr " in progress[-1] and ", tokens/s " in progress[-1], progress[-1]
        assert name == "dpo" or len(progress) > 3, progress
        # quiet by default: Ray's INFO lines, Train's per-rank result lines, DeepSpeed's notes, save progress bars
        # (Train's controller keeps its few lines: where the workers run, and each failure and what it decided)
        for noise in ("Reporting training result", "Starting execution of Dataset",
                      "shm_comm_op built successfully", "Writing model shards", "FutureWarning",
                      "unknown inputs or outputs type", "Setting accelerator to CPU"):
            assert noise not in job["output"], noise
        folder = storage.local_copy(f"{bucket}/{name}/model")
        models[name] = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        assert "<|assistant|>" in AutoTokenizer.from_pretrained(folder).chat_template
        records = [json.loads(line) for line in storage.read_text(f"{bucket}/{name}/metrics.jsonl").splitlines()]
        assert [r["step"] for r in records if r["split"] == "train"][-1] == 12
    assert any(not (models["sft"][k] == models["dpo"][k]).all() for k in models["sft"])


def test_workers_ran_on_both_nodes_and_resumed_from_s3_with_their_own_shards(jobs, s3_env):
    bucket, _ = jobs
    workers = [json.loads(storage.read_text(f"{bucket}/sft/workers/rank{r}.json")) for r in (0, 1)]
    assert workers[0]["node_id"] != workers[1]["node_id"]
    for rank, w in enumerate(workers):
        assert w["resumed_from_step"] == 4
        shards = [f for f in w["fetched"] if "zero_pp_rank_" in f]
        assert shards and all(f"zero_pp_rank_{rank}_" in f for f in shards), w["fetched"]
    records = defaultdict(list)
    for rank in (0, 1):
        for line in storage.read_text(f"{bucket}/sft/samples/rank{rank}.jsonl").splitlines():
            r = json.loads(line)
            records[(rank, r["step"])].append(r)
    seen = [i for rs in records.values() for i in rs[-1]["sample_ids"]]
    assert len(seen) == 192 and len(set(seen)) == 192  # one epoch of 12 global batches of 16, each sample once


@pytest.mark.parametrize("name, message", [
    ("local", "is a local path but the Ray cluster has 2 nodes: use a URI (s3://..., gs://...) for train.output_dir, "
              "or a folder every node mounts with train.shared_filesystem=true"),
    ("key", "unknown key 'train.lrr' (did you mean 'lr'?)"),
])
def test_a_bad_job_fails_with_a_one_line_error(jobs, cluster, name, message):
    _, submitted = jobs
    job = submitted[name]
    assert f"Job '{job['id']}' failed" in job["status"]
    logs = _ray(cluster, "job", "logs", job["id"]).stdout
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], logs[-3000:]
    assert "Traceback" not in logs


def test_working_dir_upload_leaves_out_ignored_files(cluster, jobs):
    """What --working-dir sent, as unpacked on the head: the checkout without what .gitignore lists."""
    ignored = [name for name in (".venv", ".pytest_cache", "outputs") if (ROOT / name).exists()]
    unpacked = [p for p in Path(cluster[2]).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert unpacked and ignored
    for folder in unpacked:
        assert (folder / "jobs" / "sft.py").is_file() and (folder / "ray_zephyr" / "recipes" / "tiny-sft.yaml").is_file()
        assert not [name for name in ignored if (folder / name).exists()]


def test_token_auth_is_on(cluster):
    denied = _ray(cluster, "job", "list", env=dict(cluster[1], RAY_AUTH_TOKEN="not-the-token"))
    assert denied.returncode != 0
    assert "auth" in (denied.stdout + denied.stderr).lower()
    allowed = _ray(cluster, "job", "list")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
