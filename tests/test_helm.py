"""The Helm chart (helm/braid), rendered without a helm binary by helm/render (Go's
text/template + sprig + Helm's built-ins): default and GPU production values render,
Kubernetes objects validate (kubernetes-validate), KubeRay and Prometheus Operator
resources use only their documented fields, the Serve config builds Braid's real app,
and the chart's dashboards and alert rules are byte-identical to dashboards/."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cluster.auth import KEYS_FILE_ENV
from cluster.job import build_parser
from cluster.serve import build

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "braid"
K8S_VERSION = "1.33"
CRD_TYPES = yaml.safe_load((Path(__file__).parent / "crd_fields.yaml").read_text())
K8S_TYPES = {"ObjectMeta", "PodTemplateSpec", "LabelSelector", "Service"}


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """helm/render, built against Debian's Go packages (make test installs them)."""
    if shutil.which("go") is None:
        pytest.fail("no Go toolchain: `make test` installs golang-go and golang-github-masterminds-sprig-dev")
    out = tmp_path_factory.mktemp("render")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(out / "cache")}
    subprocess.run(["go", "build", "-o", str(out / "render"), "./helm/render"], cwd=ROOT, env=env, check=True)
    return out / "render"


def render(renderer: Path, *values: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [str(renderer), "--chart", str(CHART), "--name", "braid", "--namespace", "ml"]
    for v in values:
        args += ["-f", v]
    done = subprocess.run(args, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def objects(renderer: Path, *values: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render(renderer, *values).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def values_file(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def k8s_validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def check_fields(value: Any, kind: Any, where: str) -> None:
    """`value` against a type of tests/crd_fields.yaml; Kubernetes types via kubernetes-validate."""
    if isinstance(kind, list):
        assert isinstance(value, list), f"{where}: a list expected"
        for i, item in enumerate(value):
            check_fields(item, kind[0], f"{where}[{i}]")
    elif isinstance(kind, dict):
        assert isinstance(value, dict), f"{where}: a map expected"
        for key, item in value.items():
            check_fields(item, kind["map"], f"{where}.{key}")
    elif kind in ("string", "int", "bool", "float"):
        types = {"string": str, "int": int, "bool": bool, "float": (int, float)}[kind]
        assert isinstance(value, types) and (kind == "bool" or not isinstance(value, bool)), f"{where}: {kind}"
    elif kind in K8S_TYPES:
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        wrapped = {
            "ObjectMeta": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": value},
            "PodTemplateSpec": {**template, "template": value},
            "LabelSelector": template,
            "Service": {"apiVersion": "v1", "kind": "Service", **value},
        }[kind]
        if kind == "LabelSelector":
            assert set(value) <= {"matchLabels", "matchExpressions"}, f"{where}: not a label selector"
        k8s_validate(wrapped)
    else:
        fields = CRD_TYPES[kind]
        unknown = set(value) - set(fields)
        assert not unknown, f"{where}: {sorted(unknown)} not in KubeRay's / the operator's {kind}"
        for key, item in value.items():
            check_fields(item, fields[key], f"{where}.{key}")


def check_all(docs: list[dict]) -> None:
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate object names"
    for doc in docs:
        if doc["apiVersion"] == "v1":
            k8s_validate(doc)
        else:
            check_fields(doc, doc["kind"], doc["kind"])


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]


def serve_app(docs: list[dict]) -> dict:
    config = yaml.safe_load(by_kind(docs, "RayService")[0]["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app


def test_default_values_render_and_validate(renderer: Path) -> None:
    docs = objects(renderer)
    assert sorted({d["kind"] for d in docs}) == ["ConfigMap", "PodMonitor", "PrometheusRule", "RayService", "Secret"]
    check_all(docs)
    (service,) = by_kind(docs, "RayService")
    head = cluster_spec(service)["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"  # no replicas
    (workers,) = cluster_spec(service)["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert [p["containerPort"] for p in container["ports"] if p["name"].startswith("braid-r")] == [9401]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # Ray's own auth stays on
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "braid-secret", "key": "auth_token"}
    assert env[KEYS_FILE_ENV]["value"] == "/etc/braid/api_keys"  # where cluster.auth reads the keys
    (secret,) = by_kind(docs, "Secret")
    assert len(secret["stringData"]["auth_token"]) == 40 and len(secret["stringData"]["api_keys"]) == 40  # random


def test_the_gpu_example_sizes_replicas_by_gpu(renderer: Path) -> None:
    docs = objects(renderer, str(CHART / "values-gpu.yaml"))
    check_all(docs)
    assert not by_kind(docs, "Secret")  # an existing Secret is used
    (service,) = by_kind(docs, "RayService")
    (workers,) = cluster_spec(service)["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    container = workers["template"]["spec"]["containers"][0]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 4 == resources["requests"]["nvidia.com/gpu"]
    assert workers["rayStartParams"]["num-gpus"] == "4"
    ports = [p["name"] for p in container["ports"] if p["name"].startswith("braid-r")]
    assert ports == [f"braid-r{i}" for i in (1, 2, 3, 4)]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["model"] == "/models"
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "braid-models"
    assert workers["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    args = serve_app(docs)["args"]
    assert (args["num_replicas"], args["replica_gpus"], args["model_path"]) == (8, 1, "/models/Qwen3-8B")
    assert args["metrics_host"] == "0.0.0.0"  # Prometheus scrapes the pods (braid serve: loopback)
    assert args["defaults"] == {"protocol": "threadweaver", "join_policy": "all", "max_latency_s": 30,
                                "max_threads": 16, "max_depth": 2}  # fmt: skip
    # Monitoring: the worker PodMonitor scrapes every replica port, as job "braid".
    worker_monitor = next(m for m in by_kind(docs, "PodMonitor") if m["metadata"]["name"].endswith("worker"))
    braid_ports = [e["port"] for e in worker_monitor["spec"]["podMetricsEndpoints"] if "relabelings" in e]
    assert braid_ports == ["braid-r1", "braid-r2", "braid-r3", "braid-r4"]
    assert worker_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_serve_config_builds_braids_app(renderer: Path) -> None:
    for values in ((), (str(CHART / "values-gpu.yaml"),)):
        app = serve_app(objects(renderer, *values))
        assert app["import_path"] == "cluster.serve:build" and app["route_prefix"] == "/"
        module, name = app["import_path"].split(":")
        assert module == build.__module__ and name == build.__name__
        args = {**app["args"], "model_path": str(ROOT / "countdown" / "model")}  # the pods' path is not here
        built = build(args)
        config, defaults, access = built._bound_deployment.init_args
        assert config.num_replicas == app["args"]["num_replicas"] and config.metrics_port == 9400
        assert defaults["protocol"] == "threadweaver"
        assert access.required and access.max_in_flight_per_key == 64  # keys from the mounted Secret
        (deployment,) = app["deployments"]
        assert deployment["name"] == "BraidAPI"  # the ingress stays on the head (its custom resource)


def test_a_verifier_reaches_the_serve_app_and_a_bad_one_is_refused(renderer: Path, tmp_path: Path) -> None:
    values = tmp_path / "verifier.yaml"
    values.write_text("braid:\n  verifier: countdown.verify:answer_accepted\n")
    app = serve_app(objects(renderer, str(values)))
    assert app["args"]["verifier"] == "countdown.verify:answer_accepted"
    config, _, _ = build({**app["args"], "model_path": str(ROOT / "countdown" / "model")})._bound_deployment.init_args
    assert config.verifier == "countdown.verify:answer_accepted"
    with pytest.raises(ValueError, match=r"verifier 'countdown\.verify:no_such'"):
        build({**app["args"], "model_path": str(ROOT / "countdown" / "model"), "verifier": "countdown.verify:no_such"})


def test_the_batch_job_runs_the_batch_entrypoint(renderer: Path) -> None:
    docs = objects(renderer, str(CHART / "values-gpu.yaml"))
    (job,) = by_kind(docs, "RayJob")
    words = job["spec"]["entrypoint"].split()
    assert words[:3] == ["python", "-m", "cluster.job"]
    args = build_parser().parse_args(words[3:])
    assert (args.replicas, args.replica_gpus, str(args.input)) == (8, 1.0, "/data/requests.jsonl")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {v["name"] for v in head["volumes"]} >= {"model", "data"}  # the driver runs on the head
    assert not by_kind(objects(renderer), "RayJob")  # off by default


def test_dashboards_and_rules_are_the_ones_in_dashboards(renderer: Path) -> None:
    folder = ROOT / "dashboards"
    chart_files = CHART / "files"
    dashboards = sorted(folder.glob("*.json"))
    for path in [*dashboards, folder / "alerts.yml"]:
        copy = chart_files / ("dashboards" if path.suffix == ".json" else "") / path.name
        assert copy.read_bytes() == path.read_bytes(), f"{copy} is stale: run python -m dashboards.build"
    docs = objects(renderer)
    maps = by_kind(docs, "ConfigMap")
    assert sorted(name for m in maps for name in m["data"]) == [p.name for p in dashboards]
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        for name, text in m["data"].items():
            assert text == (folder / name).read_text()
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((folder / "alerts.yml").read_text())


def test_monitoring_switches_off(renderer: Path, tmp_path: Path) -> None:
    off = {"monitoring": {k: {"enabled": False} for k in ("podMonitor", "prometheusRule", "dashboards")}}
    kinds = {d["kind"] for d in objects(renderer, values_file(tmp_path, off))}
    assert kinds == {"RayService", "Secret"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": {"volume": {"type": "pvc"}}}, "model.volume.claimName is required"),
        ({"model": {"volume": {"type": "hostPath"}}}, "model.volume.hostPath is required"),
        ({"model": {"volume": {"type": "nfs"}}}, "must be none, pvc or hostPath"),
        ({"job": {"enabled": True}}, "job.claimName is required"),
    ],
)
def test_bad_values_fail_with_a_clear_message(renderer: Path, tmp_path: Path, values: dict, message: str) -> None:
    done = render(renderer, values_file(tmp_path, values), check=False)
    assert done.returncode != 0 and message in done.stderr


def test_additional_worker_groups_add_replicas(renderer: Path, tmp_path: Path) -> None:
    extra = {"additionalWorkerGroups": {"spot": {"enabled": True, "pods": 3, "braidReplicasPerPod": 2,
                                                 "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}}}  # fmt: skip
    docs = objects(renderer, values_file(tmp_path, extra))
    check_all(docs)
    groups = cluster_spec(by_kind(docs, "RayService")[0])["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"], g["rayStartParams"]["num-cpus"]) for g in groups] == [
        ("workers", 1, "1"), ("spot", 3, "2")
    ]  # fmt: skip
    assert serve_app(docs)["args"]["num_replicas"] == 1 + 3 * 2
