"""cluster/ stays deployable and closed: the launcher YAML passes Ray's own schema, the KubeRay manifests point at
files, recipes and a Ray version that exist here, and no config opens Ray's control ports or turns auth off."""

from __future__ import annotations

import copy
import importlib
import ipaddress
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ray_zephyr.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard/jobs API, Ray client
EXPOSING_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = {path.name: load_docs(path)[0] for path in sorted(KUBERAY.glob("*.yaml"))}
SHARED_CLAIM = MANIFESTS["storage.yaml"]["metadata"]["name"]
AWS = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def require_files(*relpaths: str) -> None:
    missing = [p for p in relpaths if not (ROOT / p).exists()]
    assert not missing, f"cluster configs refer to missing files: {missing}"


def ray_cluster_specs(doc: dict) -> list[dict]:
    """The RayClusterSpec(s) a KubeRay object creates itself (a RayJob on clusterSelector creates none)."""
    spec = doc["spec"]
    return [s for s in (spec, spec.get("rayClusterConfig"), spec.get("rayClusterSpec")) if s and "headGroupSpec" in s]


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def all_cluster_specs() -> list[dict]:
    return [s for doc in MANIFESTS.values() for s in ray_cluster_specs(doc)]


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def shared_mount(group: dict) -> str:
    """Where a group's pods mount the shared volume claim of storage.yaml."""
    pod = group["template"]["spec"]
    (volume,) = [v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_CLAIM]
    (mount,) = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume]
    return mount


def stage_recipe(stage: str):
    """The recipe a RayJob's entrypoint runs, with its key=value overrides applied."""
    argv = shlex.split(MANIFESTS[f"rayjob-{stage}.yaml"]["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{stage}.py"] and argv[2] == "--config", argv
    return load_recipe(argv[3], argv[4:])


# --- Ray cluster launcher (AWS) -------------------------------------------------------------------------------------


def test_aws_yaml_validates_against_ray_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(AWS, schema)
    # The same preparation and checks `ray up` runs before it touches AWS.
    prepared = prepare_config(copy.deepcopy(AWS))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_aws_head_is_cpu_only_and_gpu_workers_autoscale():
    types = AWS["available_node_types"]
    assert types[AWS["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != AWS["head_node_type"]}
    for name, t in workers.items():
        assert 0 == t["min_workers"] < t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= AWS["max_workers"]
    assert AWS["idle_timeout_minutes"] > 0


def test_aws_keeps_ray_ports_private_and_token_auth_on():
    for rule in AWS["provider"]["security_group"]["IpPermissions"]:
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1)) if rule["IpProtocol"] != "-1" else RAY_PORTS
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        public = [c for c in cidrs if ipaddress.ip_network(c).prefixlen == 0 or ipaddress.ip_network(c).is_global]
        assert not (ports & RAY_PORTS and public), f"Ray port open to {public}: {rule}"
    head_start = " ".join(AWS["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--env RAY_AUTH_MODE=token" in AWS["docker"]["run_options"]
    assert AWS["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# --- KubeRay manifests ----------------------------------------------------------------------------------------------


def test_kuberay_clusters_run_this_ray_with_the_fields_kuberay_requires():
    assert MANIFESTS["storage.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts the outputs
    assert len(all_cluster_specs()) == 2  # the RayCluster (the jobs run on it) and the RayService's own
    for spec in all_cluster_specs():
        assert spec["rayVersion"] == ray.__version__
        assert spec["enableInTreeAutoscaling"] is True
        for group in spec["workerGroupSpecs"]:
            assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= group.keys()
        assert {"rayStartParams", "template"} <= spec["headGroupSpec"].keys()


def test_every_ray_container_runs_the_project_image_with_pinned_resources():
    image = f"ray-zephyr:{PROJECT_VERSION}"
    for spec in all_cluster_specs():
        for c in containers(spec):
            assert c["image"] == image, c["name"]
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert requests == limits and {"cpu", "memory"} <= limits.keys(), c["name"]
        assert gpus(containers(spec)[0]) == 0, "the head is CPU-only"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_dockerfile_builds_that_image_from_files_in_the_repo():
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in DOCKERFILE
    assert f"-t ray-zephyr:{PROJECT_VERSION} ." in DOCKERFILE
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            sources += [a for a in shlex.split(line)[1:-1] if not a.startswith("--")]
    assert {"pyproject.toml", "ray_zephyr/", "jobs/", "serve/"} <= set(sources)
    require_files(*(s.rstrip("/") for s in sources))


def test_gpu_worker_group_autoscales_to_the_recipes_size():
    (cluster,) = ray_cluster_specs(MANIFESTS["raycluster.yaml"])
    (group,) = cluster["workerGroupSpecs"]
    assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    per_pod = gpus(group["template"]["spec"]["containers"][0])
    assert per_pod > 0
    for recipe in ("zephyr-7b-beta-sft", "zephyr-7b-beta-dpo"):
        train = load_recipe(recipe).train
        assert train.use_gpu and group["maxReplicas"] * per_pod >= train.num_workers, recipe


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_rayjob_runs_its_stage_script_and_recipe(stage):
    spec = MANIFESTS[f"rayjob-{stage}.yaml"]["spec"]
    cluster = MANIFESTS["raycluster.yaml"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    recipe = stage_recipe(stage)
    assert recipe.stage == stage
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    assert all(recipe.train.output_dir.startswith(shared_mount(g) + "/") for g in groups), "outputs off the shared volume"
    assert recipe.train.shared_filesystem  # else the job refuses a local path on a multi-node cluster
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE, re.M).group(1)
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": workdir}
    require_files(f"jobs/{stage}.py")


def test_dpo_job_starts_from_the_sft_jobs_model():
    # the training jobs write the Hugging Face folder at <train.output_dir>/model
    assert stage_recipe("dpo").model.name_or_path == stage_recipe("sft").train.output_dir + "/model"


def test_rayservice_serves_the_dpo_model_with_the_api_key_from_a_secret():
    from ray_zephyr.serving.settings import API_KEY_ENV, ServeSettings

    spec = MANIFESTS["rayservice.yaml"]["spec"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    settings = ServeSettings(**app["args"])
    assert settings.api_key is None, "the API key comes from a Secret, never from the manifest"
    assert settings.model == stage_recipe("dpo").train.output_dir + "/model"
    for c in containers(spec["rayClusterConfig"]):
        env = {e["name"]: e for e in c.get("env", [])}
        ref = env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ray-zephyr-api-key", "key": "api_key"}, c["name"]
    (workers,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert settings.model.startswith(shared_mount(workers) + "/")
    # Serve's replica autoscaling and the Ray autoscaler's pod bounds agree.
    per_pod = gpus(workers["template"]["spec"]["containers"][0])
    assert workers["minReplicas"] * per_pod >= settings.min_replicas * settings.num_gpus >= 1
    assert workers["maxReplicas"] * per_pod >= settings.max_replicas * settings.num_gpus > settings.min_replicas
    module, function = app["import_path"].split(":")
    source = module.replace(".", "/") + ".py"
    require_files(source)
    assert callable(getattr(importlib.import_module(module), function, None)), f"{source} has no {function}()"


def test_no_ray_port_leaves_the_kubernetes_cluster():
    for path in KUBERAY.glob("*.yaml"):
        for doc in load_docs(path):
            assert doc["kind"] not in {"Ingress", "Gateway", "HTTPRoute"}, path.name
            if doc["kind"] == "Service" and doc["spec"].get("type") in EXPOSING_SERVICE_TYPES:
                assert not {p["port"] for p in doc["spec"]["ports"]} & RAY_PORTS, path.name
    for spec in all_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False)
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


def test_token_auth_is_on_with_secrets_the_readme_creates():
    created = set(re.findall(r"kubectl create secret generic (\S+)", (CLUSTER / "README.md").read_text()))
    for spec in all_cluster_specs():
        assert spec["authOptions"]["mode"] == "token"
        assert spec["authOptions"]["secretName"] in created
        for c in containers(spec):
            modes = [e.get("value") for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE"]
            assert modes in ([], ["token"]), c["name"]
    assert "ray-zephyr-api-key" in created


def test_every_node_gets_the_hub_token_for_gated_models():
    created = set(re.findall(r"kubectl create secret generic (\S+)", (CLUSTER / "README.md").read_text()))
    assert "ray-zephyr-hf-token" in created
    for spec in all_cluster_specs():  # head (the job drivers) and every worker group (weights downloaded there)
        for c in containers(spec):
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "ray-zephyr-hf-token", "key": "token", "optional": True}, c["name"]
    # the cluster launcher copies the token file huggingface_hub reads to every node, as it does Ray's auth token
    assert AWS["file_mounts"]["~/.cache/huggingface/token"] == "~/.cache/huggingface/token"


def test_a_gated_model_without_a_token_is_one_line_naming_hf_token(tmp_path):
    """Against a local stand-in for the Hub that refuses a gated model (401 GatedRepo), through transformers' own
    download path, as `jobs/dpo.py --config zephyr-7b-beta-dpo` meets Mistral's gate without HF_TOKEN."""
    import os
    import subprocess
    import sys

    from hub_server import StandInHub

    hub = StandInHub(tmp_path / "hub")
    hub.gated.add("mistralai/Mistral-7B-v0.1")
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
        done = subprocess.run([sys.executable, "jobs/preview.py", "--config", "tiny-sft",
                               "model.name_or_path=mistralai/Mistral-7B-v0.1"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        hub.close()
    errors = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: cannot load tokenizer 'mistralai/Mistral-7B-v0.1': ")
    assert "gated or private model: set HF_TOKEN, on every node" in errors[0]
    assert any(path.startswith("/mistralai/Mistral-7B-v0.1/") for _, path in hub.requests)  # it did ask the hub


def test_gpu_workers_stage_checkpoints_and_weights_on_a_local_volume_not_the_root_disk():
    from ray_zephyr.storage import CACHE_ENV

    spec = MANIFESTS["raycluster.yaml"]["spec"]
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for name in ("TMPDIR", "HF_HOME", CACHE_ENV):  # tempfile (checkpoint staging), the hub's cache, ours
            (mount,) = [m for m in mounts if env[name] == m or env[name].startswith(m + "/")]
            volume = volumes[mounts[mount]]
            assert "hostPath" in volume or "emptyDir" in volume, (name, volume)  # node-local, not the shared PVC
            assert volume.get("emptyDir", {}).get("medium") != "Memory", name
