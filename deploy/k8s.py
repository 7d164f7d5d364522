"""`hierspec k8s render`: the Kubernetes manifests of a hierarchy config, for KubeRay.

One source of truth: the hierarchy config itself travels in a ConfigMap that
the Serve app reads (`serveConfigV2` points `build_app` at it), and the worker
groups are sized from the same `level_options` that `serve run` uses, so the
cluster and the app never drift apart.

Rendered (names fixed so the operator's guide can use them):
  namespace.yaml, hierarchy-config.yaml   the namespace, the config as a ConfigMap
  rayservice.yaml                          head + one GPU worker group per level (CPU: one group), serveConfigV2
  redis.yaml                               the statistics store: ConfigMap, StatefulSet with a PVC, Service
  db-build-job.yaml                        `hierspec db build` from the corpus volume into that Redis
  network-policy.yaml                      who may reach the Ray ports and Redis
  kustomization.yaml                       all of the above (`kubectl apply -k DIR`)
  secrets.example.yaml                     the Secrets, with fresh random values; apply once, never commit

Closed by default: every pod requires the API key Secret (unless the config says
`serving.allow_unauthenticated: true`), Ray's control plane takes token
authentication (KubeRay generates the token), NetworkPolicies admit only the
cluster's own Ray pods to the Ray ports and only the Ray pods and the loader Job
to Redis, and Redis knows one ACL user per role: `admin` (the loader Job) and
`router` (read-only on the statistics keys, read-write on the shared outputs
stream); its default user is off.
"""

from __future__ import annotations

import math
import re
import secrets
from pathlib import Path

import yaml

from deploy.app.app import http_options, level_options
from deploy.app.cluster_env import CLUSTER_ENV
from deploy.config import ConfigError, HierspecConfig

RAY_VERSION = "2.60.0"  # the pinned ray[serve]; the image's base tag follows it
REDIS_IMAGE = "redis:7.4"
REDIS_SERVICE = "hierspec-redis"
REDIS_SECRET = "hierspec-redis"  # keys: password (Redis user admin), router-password (Redis user router)
API_KEY_SECRET = "hierspec-api-key"  # key: api-key (the default of kubernetes.api_key_secret)
RAY_NODE = {"ray.io/is-ray-node": "yes"}  # KubeRay's label on every Ray pod
DB_BUILD = "hierspec-db-build"
CONFIG_MAP = "hierspec-config"
CONFIG_MOUNT = "/etc/hierspec"
SERVE_PORT, DASHBOARD_PORT, METRICS_PORT = 8000, 8265, 8080
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", quantity)
    if not match:
        raise ConfigError(f"kubernetes: {quantity!r} is not a memory quantity such as 2Gi")
    return int(float(match.group(1)) * units.get(match.group(2) or "", 1))


def _redis_env(*keys: str) -> list[dict]:
    names = {"password": "REDIS_PASSWORD", "router-password": "REDIS_ROUTER_PASSWORD"}
    return [{"name": names[key], "valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": key}}} for key in keys]


def _api_key_secret(config: HierspecConfig) -> str | None:
    """The Secret holding the API key; None only where the config allows an open API (else a render error)."""
    secret = config.kubernetes.api_key_secret
    if secret is None and not config.serving.allow_unauthenticated:
        raise ConfigError("kubernetes.api_key_secret is null: the API would be open to every client that reaches "
                          "it; name the Secret, or set serving.allow_unauthenticated: true")
    return secret


def _hierspec_env(config: HierspecConfig) -> list[dict]:
    """The statistics DB URL (Redis user `router`, its password from the Secret), the API key (required unless
    the config allows an open API) and the cluster's Serve settings (`deploy.app.cluster_env`)."""
    env = _redis_env("router-password") + [{"name": name, "value": value} for name, value in CLUSTER_ENV.items()]
    env.append({"name": "HIERSPEC_REDIS_URL",
                "value": f"redis://router:$(REDIS_ROUTER_PASSWORD)@{REDIS_SERVICE}:6379/0"})
    secret = _api_key_secret(config)
    if secret:
        required = not config.serving.allow_unauthenticated
        env.append({"name": config.serving.api_key_env, "valueFrom": {"secretKeyRef": {
            "name": secret, "key": "api-key", **({} if required else {"optional": True})}}})
    return env


def _container(config: HierspecConfig, name: str, cpu: str, memory: str, gpus: int = 0) -> dict:
    k8s = config.kubernetes
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits[k8s.gpu_resource] = str(gpus)
    return {
        "name": name, "image": k8s.image, "imagePullPolicy": k8s.image_pull_policy,
        "env": _hierspec_env(config),
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "hierspec-config", "mountPath": CONFIG_MOUNT, "readOnly": True}],
    }


def _config_volume() -> dict:
    return {"name": "hierspec-config", "configMap": {"name": CONFIG_MAP}}


def serve_config(config: HierspecConfig, method: str, dtype: str | None = None) -> dict:
    """The Serve config KubeRay deploys: the same app builder `serve run` uses, on the mounted config."""
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(config, "0.0.0.0", SERVE_PORT),
        "applications": [{
            "name": config.name, "route_prefix": "/", "import_path": "deploy.app:build_app",
            "args": {"config": f"{CONFIG_MOUNT}/config.yaml", "method": method, **({"dtype": dtype} if dtype else {})},
        }],
    }


def worker_groups(config: HierspecConfig, method: str) -> list[dict]:
    """One GPU group per level deployment when levels take GPUs (sized by its replicas); on CPU one
    group with a pod per level replica."""
    k8s = config.kubernetes
    scheduling = {"nodeSelector": k8s.node_selector} if k8s.node_selector else {}
    if k8s.tolerations:
        scheduling["tolerations"] = k8s.tolerations
    options = level_options(config, method)
    gpus = math.ceil(config.serving.gpus_per_level)
    if gpus:
        plans = [(o["name"], o["num_replicas"], gpus) for o in options]
    else:
        plans = [("cpu-workers", sum(o["num_replicas"] for o in options), 0)]
    groups = []
    for name, replicas, gpu_count in plans:
        container = _container(config, "ray-worker", k8s.worker_cpu, k8s.worker_memory, gpu_count)
        container["readinessProbe"] = {  # a worker serves once its Serve proxy reaches the app
            "httpGet": {"path": "/health", "port": SERVE_PORT},
            "initialDelaySeconds": 30, "periodSeconds": 10, "failureThreshold": 6,
        }
        params = {"num-gpus": str(gpu_count)} if gpu_count else {}
        groups.append({
            "groupName": name, "replicas": replicas, "minReplicas": replicas, "maxReplicas": max(replicas, 4),
            "rayStartParams": params,
            "template": {"spec": {"containers": [container], "volumes": [_config_volume()], **scheduling}},
        })
    return groups


def ray_service(config: HierspecConfig, method: str, dtype: str | None = None) -> dict:
    k8s = config.kubernetes
    head = _container(config, "ray-head", k8s.head_cpu, k8s.head_memory)
    head["ports"] = [{"containerPort": p, "name": n} for p, n in
                     ((6379, "gcs-server"), (DASHBOARD_PORT, "dashboard"), (10001, "client"),
                      (SERVE_PORT, "serve"), (METRICS_PORT, "metrics"))]
    cluster = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},  # KubeRay generates the token Secret and hands it to every Ray container
        "headGroupSpec": {
            # no level replicas on the head: it runs the controller, the dashboard, a proxy and the ingress
            "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT),
                               "num-cpus": "0"},
            "template": {"spec": {"containers": [head], "volumes": [_config_volume()]}},
        },
        "workerGroupSpecs": worker_groups(config, method),
    }
    if k8s.gcs_redis_address:
        cluster["gcsFaultToleranceOptions"] = {
            "redisAddress": k8s.gcs_redis_address,
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": "password"}}},
        }
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": config.name, "namespace": k8s.namespace, "labels": {"app.kubernetes.io/name": "hierspec"}},
        "spec": {"serveConfigV2": yaml.safe_dump(serve_config(config, method, dtype), sort_keys=False),
                 "rayClusterConfig": cluster},
    }


def redis_documents(config: HierspecConfig) -> list[dict]:
    """The statistics store: persistence on, and it refuses writes when full instead of evicting keys."""
    k8s = config.kubernetes
    ns = k8s.namespace
    labels = {"app.kubernetes.io/name": REDIS_SERVICE}
    maxmemory = int(0.75 * _memory_bytes(k8s.redis_memory))
    conf = "\n".join([
        "appendonly yes", "appendfsync everysec", "save 900 1", "save 300 100", "dir /data",
        f"maxmemory {maxmemory}", "maxmemory-policy noeviction",
        "",
    ])
    claim = {"metadata": {"name": "data"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": k8s.redis_storage}}}}
    if k8s.storage_class:
        claim["spec"]["storageClassName"] = k8s.storage_class
    container = {
        # args, not command: the image's entrypoint runs, as the unprivileged user below
        "name": "redis", "image": REDIS_IMAGE, "args": ["redis-server", "/etc/redis/redis.conf", *redis_users()],
        "env": _redis_env("password", "router-password"),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "runAsGroup": 999,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "ports": [{"containerPort": 6379, "name": "redis"}],
        "resources": {"requests": {"cpu": "500m", "memory": k8s.redis_memory},
                      "limits": {"memory": k8s.redis_memory}},
        "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 5},
        "volumeMounts": [{"name": "data", "mountPath": "/data"},
                         {"name": "config", "mountPath": "/etc/redis", "readOnly": True}],
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{REDIS_SERVICE}-config", "namespace": ns},
         "data": {"redis.conf": conf}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": REDIS_SERVICE, "namespace": ns},
         "spec": {"serviceName": REDIS_SERVICE, "replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"securityContext": {"fsGroup": 999}, "containers": [container],
                                        "volumes": [{"name": "config",
                                                     "configMap": {"name": f"{REDIS_SERVICE}-config"}}]}},
                  "volumeClaimTemplates": [claim]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": REDIS_SERVICE, "namespace": ns},
         "spec": {"selector": labels, "ports": [{"name": "redis", "port": 6379, "targetPort": 6379}]}},
    ]


def redis_users() -> list[str]:
    """redis-server arguments: the ACL users, passwords from the Secret's keys in the environment. `router`
    reads the statistics keys and reads and appends to the shared outputs streams (`hs:<tokenizer>:outputs`)."""
    return ["--user", "default", "off",
            "--user", "admin", "on", ">$(REDIS_PASSWORD)", "~*", "&*", "+@all",
            "--user", "router", "on", ">$(REDIS_ROUTER_PASSWORD)", "resetkeys", "%R~hs:*", "%RW~hs:*:outputs",
            "+@connection", "-@admin", "-@dangerous", "+get", "+mget", "+xread", "+xadd"]


def db_build_job(config: HierspecConfig) -> dict:
    k8s = config.kubernetes
    command = (f"hierspec db build --corpus /corpus --model {config.models.target} "
               f"--redis redis://admin:$REDIS_PASSWORD@{REDIS_SERVICE}:6379/0")
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": DB_BUILD, "namespace": k8s.namespace},
        "spec": {"backoffLimit": 2, "template": {"metadata": {"labels": {"app.kubernetes.io/name": DB_BUILD}}, "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "db-build", "image": k8s.image, "imagePullPolicy": k8s.image_pull_policy,
                            "command": ["sh", "-c", command], "env": _redis_env("password"),
                            "volumeMounts": [{"name": "corpus", "mountPath": "/corpus", "readOnly": True}]}],
            "volumes": [{"name": "corpus", "persistentVolumeClaim": {"claimName": k8s.corpus_claim}}],
        }}},
    }


def network_policies(config: HierspecConfig) -> list[dict]:
    """The Ray pods take anything from each other, the OpenAI port and metrics from the cluster, and the
    dashboard from the KubeRay operator; Redis takes connections from the Ray pods and the loader Job only."""
    k8s = config.kubernetes
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": k8s.operator_namespace}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    ray_pods = {"podSelector": {"matchLabels": RAY_NODE}}

    def policy(name: str, selected: dict, rules: list[dict]) -> dict:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": k8s.namespace},
                "spec": {"podSelector": {"matchLabels": selected}, "policyTypes": ["Ingress"], "ingress": rules}}

    def ports(*numbers: int) -> list[dict]:
        return [{"protocol": "TCP", "port": n} for n in numbers]

    return [
        policy("hierspec-ray", RAY_NODE, [
            {"from": [ray_pods]},
            {"from": [{"namespaceSelector": {}}], "ports": ports(SERVE_PORT, METRICS_PORT)},
            {"from": [operator], "ports": ports(DASHBOARD_PORT, SERVE_PORT)},
        ]),
        policy(REDIS_SERVICE, {"app.kubernetes.io/name": REDIS_SERVICE}, [
            {"from": [ray_pods, {"podSelector": {"matchLabels": {"app.kubernetes.io/name": DB_BUILD}}}],
             "ports": ports(6379)},
        ]),
    ]


def secrets_example(config: HierspecConfig) -> list[dict]:
    ns = config.kubernetes.namespace
    documents = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": REDIS_SECRET, "namespace": ns},
                  "type": "Opaque",
                  "stringData": {"password": secrets.token_hex(24), "router-password": secrets.token_hex(24)}}]
    if _api_key_secret(config):
        documents.append({"apiVersion": "v1", "kind": "Secret",
                          "metadata": {"name": _api_key_secret(config), "namespace": ns},
                          "type": "Opaque", "stringData": {"api-key": secrets.token_hex(24)}})
    return documents


def render(config: HierspecConfig, config_text: str, method: str | None = None,
           dtype: str | None = None) -> dict[str, list[dict]]:
    """{file name: documents}; `config_text` is the hierarchy config file as written; `method` and `dtype`
    (a command line's) go to the app's builder with it."""
    method = method or config.default_method
    if not _DNS_LABEL.match(config.name) or len(config.name) > 40:
        raise ConfigError(f"name {config.name!r}: Kubernetes needs lowercase letters, digits and '-', "
                          "at most 40 characters")
    ns = config.kubernetes.namespace
    files = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}],
        "hierarchy-config.yaml": [{"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": CONFIG_MAP, "namespace": ns},
                                   "data": {"config.yaml": config_text}}],
        "rayservice.yaml": [ray_service(config, method, dtype)],
        "redis.yaml": redis_documents(config),
        "db-build-job.yaml": [db_build_job(config)],
        "network-policy.yaml": network_policies(config),
    }
    files["kustomization.yaml"] = [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                    "resources": sorted(files)}]
    files["secrets.example.yaml"] = secrets_example(config)
    return files


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, redis.conf, the hierarchy config) as readable `|` blocks."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def write(files: dict[str, list[dict]], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, documents in files.items():
        path = out / name
        path.write_text(yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False))
        written.append(path)
    return written
