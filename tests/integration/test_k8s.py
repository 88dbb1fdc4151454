"""deploy/k8s checked offline with the real tools and the project's own parsers (no cluster).

* `kubectl kustomize` renders both overlays (cpu, gpu);
* every rendered object passes `kubernetes-validate`, strict (unknown fields are errors),
  for the newest Kubernetes version it knows; the PodMonitor (a Prometheus Operator
  CRD, for which it holds no schema) is checked field by field against the pods instead;
* every container's command and environment are accepted by `ps-server` / `ps-worker`'s
  own parsers, for every pod (shard index from the pod-index label, rank from the Job's
  completion index), name only flags that exist, and keep secrets off command lines;
* the workers' servers list names the StatefulSet's pods through its headless Service,
  shard count = replicas, world = completions; probes hit the plaintext health port;
* Prometheus finds the metrics port by annotations and by the PodMonitor, with the job
  names deploy/alerts.yml uses; the alert rules and dashboard are compose's own files.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from protos import service
from worker import cli as worker_cli
from worker.environment import resolve_rank

from .test_deploy import parse_service

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["cpu", "gpu"]
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: scripts/setup.sh installs Debian's kubernetes-client (as root)"
    r = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, dict[str, dict]]:
    docs = render(request.param)
    by_kind: dict[str, dict] = {}
    for d in docs:
        key = d["kind"] if d["kind"] != "ConfigMap" else "ConfigMap/" + d["metadata"]["name"].rsplit("-", 1)[0]
        assert key not in by_kind, f"two objects of {key}"
        by_kind[key] = d
    return request.param, by_kind


def env_of(container: dict, **values: str) -> dict[str, str]:
    """The container's environment, downward-API values filled in from `values` by field path."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in values, f"{e['name']} comes from {path}, which this test cannot fill in"
            env[e["name"]] = values[path]
    return env


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def only_container(obj: dict) -> dict:
    (container,) = pod_spec(obj)["containers"]
    return container


def test_every_object_passes_kubernetes_validate_strict(rendered):
    _, objs = rendered
    version = kubernetes_validate.latest_version()
    assert set(objs) >= {
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "Job",
        "PodMonitor",
        "ConfigMap/asyncps-alerts",
        "ConfigMap/asyncps-dashboard",
        "ConfigMap/asyncps-prometheus",
    }
    for obj in objs.values():
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; see test_prometheus_finds_every_pod
        kubernetes_validate.validate(obj, version, strict=True)
    broken = copy.deepcopy(objs["StatefulSet"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict really refuses a misspelt field
        kubernetes_validate.validate(broken, version, strict=True)


def test_every_container_parses_with_our_own_parsers(rendered, monkeypatch, capsys):
    overlay, objs = rendered
    sts, job = objs["StatefulSet"], objs["Job"]
    for i in range(sts["spec"]["replicas"]):
        env = env_of(only_container(sts), **{POD_INDEX: str(i)})
        _, args = parse_service(monkeypatch, {"command": only_container(sts)["command"], "environment": env}, capsys)
        assert (args.shard_index, args.num_shards) == (i, sts["spec"]["replicas"])
        assert args.host == "0.0.0.0" and args.metrics_port > 0 and args.health_port and args.data_port
    for i in range(job["spec"]["completions"]):
        env = env_of(only_container(job))
        parser, args = parse_service(
            monkeypatch, {"command": only_container(job)["command"], "environment": env}, capsys
        )
        assert args.rank is None, "the rank must come from the completion index"
        assert resolve_rank(args.rank, args.world, {"JOB_COMPLETION_INDEX": str(i)}) == (i, True)
        assert args.retry_seconds >= 120 and args.metrics_host == "0.0.0.0"
        if overlay == "gpu":
            assert args.device == "cuda"
        else:
            assert args.device == "cpu"
            worker_cli.check_training_args(parser, args)  # exits 2 on inconsistent flags
    for obj in (sts, job):  # secrets come from Secret volumes, never from a command line or a literal
        c = only_container(obj)
        assert not any("token" in a or "tls" in a for a in c["command"] + c.get("args", []))
        env = {e["name"]: e for e in c["env"]}
        assert "ASYNCPS_TOKEN" not in env
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        for name in ("ASYNCPS_TOKEN_FILE", "ASYNCPS_TLS_CERT", "ASYNCPS_TLS_KEY", "ASYNCPS_TLS_CA"):
            if name not in env:
                continue
            path = Path(env[name]["value"])
            secret = volumes[mounts[str(path.parent)]]["secret"]
            assert path.name in [item["path"] for item in secret["items"]], f"{name}: {path} is not mounted"
        assert {"ASYNCPS_TOKEN_FILE"} <= set(env) and ({"ASYNCPS_TLS_CERT"} <= set(env) or "ASYNCPS_TLS_CA" in env)


def test_workers_servers_list_names_the_statefulset_pods(rendered):
    _, objs = rendered
    sts, svc, job, pdb = objs["StatefulSet"], objs["Service"], objs["Job"], objs["PodDisruptionBudget"]
    server_env = env_of(only_container(sts), **{POD_INDEX: "0"})
    worker_env = env_of(only_container(job))
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert str(grpc_port) == server_env["ASYNCPS_PORT"]
    replicas = sts["spec"]["replicas"]
    expected = [f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:{grpc_port}" for i in range(replicas)]
    assert worker_env["ASYNCPS_SERVERS"].split(",") == expected
    assert int(server_env["ASYNCPS_NUM_SHARDS"]) == replicas
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimit"] > 0
    assert spec["completions"] == spec["parallelism"] == int(worker_env["ASYNCPS_WORLD"])
    assert pod_spec(job)["restartPolicy"] == "OnFailure"  # same pod, same index, same worker id


def test_servers_probes_volumes_and_resources(rendered):
    overlay, objs = rendered
    sts, job = objs["StatefulSet"], objs["Job"]
    c = only_container(sts)
    env = env_of(c, **{POD_INDEX: "0"})
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert str(c[probe]["grpc"]["port"]) == env["ASYNCPS_HEALTH_PORT"], probe
    assert c["readinessProbe"]["grpc"]["service"] == service.SERVICE_NAME
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == env["ASYNCPS_CHECKPOINT_DIR"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    for obj in (sts, job):
        res = only_container(obj)["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    gpus = only_container(job)["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if overlay == "gpu" else None)
    assert "nvidia.com/gpu" not in c["resources"]["limits"]  # the servers need no GPU


def test_prometheus_finds_every_pod_with_the_alert_rules_job_names(rendered):
    _, objs = rendered
    alerts = (DEPLOY / "alerts.yml").read_text()
    jobs = set(re.findall(r'job="([^"]+)"', alerts))
    assert jobs == {"asyncps-server", "asyncps-worker"}
    monitor = objs["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    seen = set()
    for obj, metrics_env in ((objs["StatefulSet"], {POD_INDEX: "0"}), (objs["Job"], {})):
        template = obj["spec"]["template"]
        c = only_container(obj)
        port = env_of(c, **metrics_env)["ASYNCPS_METRICS_PORT"]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == port
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert {p["name"]: str(p["containerPort"]) for p in c["ports"]}[endpoint["port"]] == port
        labels = template["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        seen.add(labels[monitor["spec"]["jobLabel"]])
    assert seen == jobs
    scrape = yaml.safe_load(objs["ConfigMap/asyncps-prometheus"]["data"]["prometheus.yml"])
    assert scrape["rule_files"] == ["alerts.yml"]
    relabel = scrape["scrape_configs"][0]["relabel_configs"]
    keep = next(r for r in relabel if r["source_labels"] == ["__meta_kubernetes_pod_label_asyncps_job"])
    assert all(re.fullmatch(keep["regex"], j) for j in jobs)
    assert objs["ConfigMap/asyncps-alerts"]["data"]["alerts.yml"] == alerts
    dashboard = objs["ConfigMap/asyncps-dashboard"]
    assert json.loads(dashboard["data"]["asyncps.json"]) == json.loads(
        (DEPLOY / "grafana/dashboards/asyncps.json").read_text()
    )
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
