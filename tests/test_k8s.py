"""The Kubernetes manifests: rendered from the shipped configs and validated offline against the real
schemas (Kubernetes' own for core kinds, the KubeRay CRD's OpenAPI schema for the RayService)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy.config import load_config
from deploy.k8s import API_KEY_SECRET, REDIS_SECRET, REDIS_SERVICE, ConfigError, render, write

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "deploy/configs").glob("*.yaml"))
K8S_VERSION = "1.31.0"


def _rayservice_schema() -> dict:
    crd = yaml.safe_load((ROOT / "k8s/schemas/ray.io_rayservices.yaml").read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _rendered(path: Path, tmp_path: Path, text: str | None = None) -> dict[str, list[dict]]:
    text = text or path.read_text()
    config_file = tmp_path / path.name
    config_file.write_text(text)
    files = render(load_config(config_file), text)
    out = tmp_path / "out"
    write(files, out)
    return {name: list(yaml.safe_load_all((out / name).read_text())) for name in files}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_document_validates(path, tmp_path):
    schema = _rayservice_schema()
    kinds = set()
    for documents in _rendered(path, tmp_path).values():
        for document in documents:
            kinds.add(document["kind"])
            if document["kind"] == "RayService":
                jsonschema.validate(document, schema)
                yaml.safe_load(document["spec"]["serveConfigV2"])
            elif document["kind"] != "Kustomization":
                kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    assert {"RayService", "StatefulSet", "Service", "ConfigMap", "Job", "Secret", "Namespace"} <= kinds


def test_worker_groups_and_serve_config_follow_the_hierarchy(tmp_path):
    base = (ROOT / "deploy/configs/qwen-coder-gpu.yaml").read_text()

    def service(text: str) -> dict:
        return _rendered(ROOT / "deploy/configs/qwen-coder-gpu.yaml", tmp_path, text)["rayservice.yaml"][0]

    two = service(base)
    groups = two["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["level0-qwen2-5-coder-0-5b", "level1-qwen2-5-coder-1-5b"]
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
               for g in groups)
    app = yaml.safe_load(two["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "deploy.app:build_app" and app["args"]["method"] == "hd+hsd"

    changed = base.replace("method: hd+hsd", "method: hd").replace("replicas_per_level: 1", "replicas_per_level: 3")
    one = service(changed)
    groups = one["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"]) for g in groups] == [("level0-qwen2-5-coder-1-5b", 3)]
    assert yaml.safe_load(one["spec"]["serveConfigV2"])["applications"][0]["args"]["method"] == "hd"


def test_the_mounted_config_is_the_rendered_one(tmp_path):
    path = ROOT / "deploy/configs/smollm2-cpu.yaml"
    rendered = _rendered(path, tmp_path)
    assert rendered["hierarchy-config.yaml"][0]["data"]["config.yaml"] == path.read_text()
    groups = rendered["rayservice.yaml"][0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"]) for g in groups] == [("cpu-workers", 1)]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).with_name("hadolint"))
    proc = subprocess.run([hadolint, "--failure-threshold", "warning", str(ROOT / "k8s/Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_guide_uses_the_rendered_names(tmp_path):
    guide = (ROOT / "k8s/README.md").read_text()
    rendered = _rendered(ROOT / "deploy/configs/smollm2-cpu.yaml", tmp_path)
    service = rendered["rayservice.yaml"][0]["metadata"]
    for name in (f"svc/{service['name']}-serve-svc", f"svc/{service['name']}-head-svc", f"-n {service['namespace']}",
                 REDIS_SECRET, API_KEY_SECRET, f"statefulset/{REDIS_SERVICE}", "job/hierspec-db-build",
                 "hierspec k8s render"):
        assert name in guide, name


def test_one_ray_version_everywhere():
    from deploy.k8s import RAY_VERSION

    assert f"FROM rayproject/ray:{RAY_VERSION}-" in (ROOT / "k8s/Dockerfile").read_text()
    assert f'"ray[serve]=={RAY_VERSION}"' in (ROOT / "pyproject.toml").read_text()


def _config_text(**serving_and_k8s) -> str:
    raw = yaml.safe_load((ROOT / "deploy/configs/smollm2-cpu.yaml").read_text())
    raw.setdefault("serving", {}).update(serving_and_k8s.get("serving", {}))
    raw.setdefault("kubernetes", {}).update(serving_and_k8s.get("kubernetes", {}))
    return yaml.safe_dump(raw)


def test_the_api_key_is_required_unless_the_config_allows_an_open_api(tmp_path):
    path = ROOT / "deploy/configs/smollm2-cpu.yaml"
    env = _rendered(path, tmp_path)["rayservice.yaml"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
        "spec"]["containers"][0]["env"]
    key = next(e for e in env if e["name"] == "HIERSPEC_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key["name"] == API_KEY_SECRET and not key.get("optional")  # a pod without the Secret does not start
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        _rendered(path, tmp_path, _config_text(kubernetes={"api_key_secret": None}))
    open_api = _rendered(path, tmp_path, _config_text(kubernetes={"api_key_secret": None},
                                                      serving={"allow_unauthenticated": True}))
    head = open_api["rayservice.yaml"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "HIERSPEC_API_KEY" not in {e["name"] for e in head["containers"][0]["env"]}


def test_ray_token_auth_and_network_policies(tmp_path):
    rendered = _rendered(ROOT / "deploy/configs/smollm2-cpu.yaml", tmp_path)
    assert rendered["rayservice.yaml"][0]["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered["network-policy.yaml"]}
    ray = policies["hierspec-ray"]
    assert ray["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    open_ports = {port["port"] for rule in ray["ingress"] for port in rule.get("ports", [])
                  if rule["from"] == [{"namespaceSelector": {}}]}
    assert open_ports == {8000, 8080}  # the GCS (6379), dashboard (8265) and client (10001) ports are not among them
    operator = next(rule["from"][0] for rule in ray["ingress"] if "namespaceSelector" in rule["from"][0] and
                    rule["from"][0]["namespaceSelector"])
    assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
    assert "kuberay-system" in (ROOT / "k8s/README.md").read_text()  # where the guide installs the operator
    redis_rule, = policies[REDIS_SERVICE]["ingress"]
    assert [p["port"] for p in redis_rule["ports"]] == [6379] and len(redis_rule["from"]) == 2
    job = rendered["db-build-job.yaml"][0]["spec"]["template"]["metadata"]["labels"]
    assert {"podSelector": {"matchLabels": job}} in redis_rule["from"]
    assert "network-policy.yaml" in rendered["kustomization.yaml"][0]["resources"]


def test_redis_runs_unprivileged_with_a_user_per_role(tmp_path):
    """The rendered ACL users on a real redis-server: the loader writes statistics as `admin`; a router reads
    them and shares outputs as `router`, and can write nothing else; the default user is off."""
    import redis

    from deploy.reliability.redis_server import RedisServer
    from drafter_db.shared_outputs import SharedOutputs
    from drafter_db.stores import RedisStore, full_key

    sts = next(d for d in _rendered(ROOT / "deploy/configs/smollm2-cpu.yaml", tmp_path)["redis.yaml"]
               if d["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container and container["securityContext"]["runAsNonRoot"]
    args = [a.replace("$(REDIS_PASSWORD)", "admin-pw").replace("$(REDIS_ROUTER_PASSWORD)", "router-pw")
            for a in container["args"][2:]]  # after `redis-server <conf file>`
    server = RedisServer(tmp_path, args, login=("admin", "admin-pw"))
    server.start()
    try:
        url = f"127.0.0.1:{server.port}/0"
        admin, router = f"redis://admin:admin-pw@{url}", f"redis://router:router-pw@{url}"
        key = full_key("ns", (1, 2))
        RedisStore(admin).set_many({key: b"value"})
        reader = RedisStore(router)
        assert reader.get_many([key]) == [b"value"] and reader.stats.errors == 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(router).set(key, b"overwritten")
        for command in (("CLIENT", "PAUSE", "1000"), ("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                redis.Redis.from_url(router).execute_command(*command)
        mine, theirs = SharedOutputs(router, "ns"), SharedOutputs(router, "ns")
        mine.publish([3, 4, 5])
        assert theirs.pull() == [[3, 4, 5]] and mine.errors == theirs.errors == 0
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=server.port).get(key)
    finally:
        server.stop()


def test_render_passes_the_command_lines_method_and_dtype_on(tmp_path, capsys):
    from deploy.cli import main

    out = tmp_path / "out"
    assert main(["k8s", "render", "--config", "deploy/configs/smollm2-cpu.yaml", "--method", "ar", "--dtype", "int8",
                 "--out", str(out)]) == 0
    service = yaml.safe_load((out / "rayservice.yaml").read_text())
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["method"] == "ar" and args["dtype"] == "int8"
    assert main(["k8s", "render", "--config", "deploy/configs/qwen-coder-gpu.yaml", "--dtype", "int4",
                 "--out", str(out)]) == 2
    assert "int4 has torch's int4 GEMM on CPU only" in capsys.readouterr().err
