"""The environment of a Ray cluster that runs the Serve app.

Ray Serve reads these variables when `ray.serve` is imported, in every process:
the replicas, the proxy and controller, and the process that builds the app,
whose deployment handles keep the transport they were created with. So they
belong to the whole cluster: `hierspec serve` and `hierspec bench-serve` set
them before importing Serve and starting it, the KubeRay manifests put them in
every pod, and `serve run` users set them in its environment (README).
"""

from __future__ import annotations

import os

# Ray Serve's documented high-throughput mode: gRPC between replicas, user code on the replica's own event loop.
# Every round is a call from the router to a level. On the 2-core dev host one such call's Serve overhead was
# 6-7 ms without it (SmolLM2's forward: 37-40 ms) and 3.3-4.3 ms with it in every process (medians over a
# single stream's 229 calls, several runs each); in the replicas' runtime_env alone it did not help (6 ms).
# The mode also turns on direct ingress (each ingress replica listens on its own port for an external load
# balancer, proxies on the head node only, and a stopping ingress replica waits 30 s for that balancer):
# apps reach hierspec through Serve's proxies on the serving port, on every node, so it stays off.
# gRPC caps a message at 4 MiB by default, and a level's reply to the rejection sampler (a request with a
# temperature and no seed) carries float32 logits: 13 tree rows of the Qwen pair's 151,936-token vocabulary are
# 7.9 MB, a 64-row verification 39 MB. The cap is raised to 1 GiB, on the replicas' servers and their callers.
MAX_REPLY_BYTES = 1 << 30
THROUGHPUT_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                   "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(MAX_REPLY_BYTES)}
# Serve's controller reconciles every 0.1 s by default. Where levels compute on CPU, every CPU-second another
# process takes costs a forward about two (its threads meet at every op, a preempted one stalls the rest; README).
# Measured on the 2-core dev host while one client streamed through `hierspec serve` (per-process CPU over 25 s):
# the controller took 4.0% of a core and Ray's GCS 1.9%; at 0.5 s, 1.5% and 0.9%. A change of deployments (a
# replica to replace, a scale) is then acted on up to half a second later.
QUIET_CONTROLLER = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
CLUSTER_ENV = {**THROUGHPUT_MODE, **QUIET_CONTROLLER}


def set_cluster_environment() -> None:
    """Before `ray.serve` is imported and `ray.init` starts the cluster's processes, which inherit it;
    levels also compute at normal priority (Ray lowers its workers' priority), like `generate`."""
    os.environ.setdefault("RAY_worker_niceness", "0")
    for name, value in CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
