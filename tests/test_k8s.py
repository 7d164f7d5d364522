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
from deploy.k8s import API_KEY_SECRET, REDIS_SECRET, REDIS_SERVICE, render, write

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
