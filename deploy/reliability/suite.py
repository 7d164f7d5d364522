"""`hierspec reliability` (`make reliability`): the Serve app held to figures under bad input, load and faults.

One app on a local Ray cluster, run as an operator runs it: SmolLM2 in the default dtype with the database
drafter (`hd`), two replicas of its level, an API key, its statistics DB and shared model DB in a real
redis-server (the statistics built here from the standard library), its model DB saved to a file every few
seconds. Each case adds rows of figures, each against its target:

- auth: every route but /health refuses a missing or a wrong key, docs and schema included;
- limits: a 50 MB body is refused with 413 after 64 KiB of it were sent; 3 x max_in_flight streams at once get
  exactly max_in_flight 200s and the rest 503 with Retry-After; 3 MB prompts and requests with four
  32k-character stop strings, arriving again and again during 4 streams, raise those streams' p99 inter-token
  latency by at most 1.5x;
- faults, each during 8 client streams that go on until the faults are done: Redis killed (SIGKILL) and
  restarted; a level replica killed, each time once Serve has replaced the previous one; a request that kills
  its replica: no stream fails and every text equals the same prompt's text without faults; the poison fails
  alone with an error;
- fuzz: schemathesis against the app's own OpenAPI schema (examples, boundary values, random and invalid
  bodies): no 5xx, no request past its timeout, the app answers afterwards;
- soak: 16 streams for some minutes: no error, every text as without faults, the replicas' resident memory after
  warm-up and at the end;
- storage: the model DB file the app saved while it ran reads back;
- node loss: the app again on a head without CPUs and three one-CPU worker nodes (`ray.cluster_utils.Cluster`,
  level replicas on worker nodes as the KubeRay manifests place them); the node of a level replica is removed
  while the streams run, Serve starts the replica again on the spare node: no stream fails, every text equal.

Rows measured in time (latency ratios, memory growth) are figures of this machine at this moment, reported,
never asserted by a test (`tests/test_reliability.py` runs `--quick` and checks the others). Linux only: replica
processes and their memory are read from /proc.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import yaml
from pydantic import BaseModel, ConfigDict, Field

from deploy.bench.bench_serve import StreamResult, run_load, stream_chat
from deploy.reliability import CASES
from deploy.reliability.redis_server import RedisServer, free_port
from services.engine.kernels import machine

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "HIERSPEC_RELIABILITY_API_KEY"
POISON = "Spell xylophone backwards."  # holds the fault token: a level call carrying it ends its replica
PROMPTS = [
    "List three uses of a hash map, one per line.",
    "Write a Python function that reverses a string.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a mutex is to a new programmer.",
    "Write a haiku about caches.",
    "Give two differences between TCP and UDP.",
    "Write a SQL query that counts the rows of a table named users.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What does the HTTP status code 404 mean?",
    "Write a Python function that checks whether a number is prime.",
    "Name three planets of the solar system.",
    "Translate 'good morning' into Spanish and French.",
]


class SuiteSettings(BaseModel):
    """How hard each case pushes (`--quick`: the small version `make test` runs)."""

    model_config = ConfigDict(extra="forbid")

    fuzz_examples: int = Field(600, ge=1, description="schemathesis examples per operation and phase")
    redis_kills: int = Field(5, ge=1)
    replica_kills: int = Field(3, ge=1)
    soak_minutes: float = Field(10.0, gt=0)
    soak_streams: int = Field(16, ge=1)
    streams: int = Field(8, ge=1, description="client streams running through the faults")
    max_tokens: int = Field(48, ge=8, le=64, description="tokens of each stream")
    max_in_flight: int = Field(16, ge=1)

    @classmethod
    def quick(cls) -> SuiteSettings:
        return cls(fuzz_examples=20, redis_kills=2, replica_kills=1, soak_minutes=0.5, soak_streams=8, streams=4,
                   max_tokens=24, max_in_flight=8)


@dataclass
class Row:
    case: str
    figure: str
    value: str
    target: str
    holds: bool
    timing: bool = False  # a figure of time or memory on this machine: reported, not asserted by tests


class SuiteApp:
    """Redis, a local Ray cluster and the app; `headers` carries the API key."""

    def __init__(self, workdir: Path, settings: SuiteSettings):
        self.workdir = workdir
        self.settings = settings
        self.redis = RedisServer(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = os.urandom(12).hex()
        self.model = f"reliability-{os.urandom(3).hex()}"  # app and model name: another suite on this machine
        # (its replicas found by their process titles) is not this one
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.model_db_path = workdir / "model.db"
        self.level = ""
        self.config = None
        self.cluster = None
        self.workers: list = []

    def start(self) -> None:
        """Redis with the statistics, the config; then `deploy()`."""
        import redis

        from deploy.config import load_config
        from services.serve.level_service import FAULT_TOKEN_ENV

        self.redis.start()
        corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"
        _log(f"building the statistics DB in Redis from {corpus}")
        subprocess.run([str(Path(sys.executable).with_name("hierspec")), "db", "build", "--model", "smollm2-135m",
                        "--redis", self.redis.url, "--corpus", str(corpus)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        redis.Redis(port=self.redis.port).save()  # what a restart after a kill loads
        raw = yaml.safe_load((ROOT / "deploy/configs/smollm2-cpu.yaml").read_text())
        raw.update(name=self.model, threads=2, max_tokens=64,
                   drafter={"redis_url": self.redis.url, "share_model_db": True,
                            "model_db_path": str(self.model_db_path), "model_db_save_s": 5},
                   serving={"replicas_per_level": 2, "cpus_per_level": 1, "api_key_env": KEY_ENV,
                            "max_in_flight": self.settings.max_in_flight,
                            "max_cached_requests": 2 * self.settings.max_in_flight})
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        self.config = load_config(path)
        os.environ[KEY_ENV] = self.key  # inherited by the Ray processes started after this
        os.environ[FAULT_TOKEN_ENV] = str(_fault_token())

    def deploy(self, worker_nodes: int = 0) -> None:
        """The app on a one-node cluster, or (`worker_nodes`) on a head without CPUs for level replicas and that
        many worker nodes of one CPU each (a level replica takes one), as the KubeRay manifests place them."""
        import ray
        from ray import serve

        from deploy.app.app import build_from_config, level_deployment_names

        self.level = level_deployment_names(self.config, self.config.default_method)[0]
        if worker_nodes:
            from ray.cluster_utils import Cluster

            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            self.workers = [self.cluster.add_node(num_cpus=1) for _ in range(worker_nodes)]
            ray.init(address=self.cluster.address, log_to_driver=False)
        else:
            ray.init(num_cpus=6, log_to_driver=False, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port, "location": "HeadOnly"})
        _log(f"deploying the app{f' on a head and {worker_nodes} worker nodes' if worker_nodes else ''}")
        serve.run(build_from_config(self.config), name=self.model, route_prefix="/")

    def undeploy(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def stop(self) -> None:
        from services.serve.level_service import FAULT_TOKEN_ENV

        self.undeploy()
        self.redis.stop()
        os.environ.pop(KEY_ENV, None)
        os.environ.pop(FAULT_TOKEN_ENV, None)

    def stream(self, prompt: str) -> StreamResult:
        return stream_chat(self.url, self.model, prompt, self.settings.max_tokens, self.headers)

    def replica_pids(self, deployment: str) -> list[int]:
        """Processes of a deployment's replicas on this machine (their titles name app and deployment)."""
        return _processes(f"ServeReplica:{self.model}:{deployment}")

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Until every replica of the level is running again (Serve replaces a dead one)."""
        from ray import serve

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = serve.status().applications[self.model].deployments[self.level]
            if dict(status.replica_states).get("RUNNING", 0) == 2 and str(status.status).endswith("HEALTHY") and \
                    len(self.replica_pids(self.level)) == 2:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.level} did not come back within {timeout:.0f} s")


def _log(message: str) -> None:
    print(f"[reliability] {message}", file=sys.stderr, flush=True)


def _fault_token() -> int:
    """A token of POISON that no prompt of the suite holds."""
    from services.engine.model_store import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    token = tokenizer.encode(" xylophone")[-1]
    assert token in tokenizer.encode(POISON) and not any(token in tokenizer.encode(p) for p in PROMPTS)
    return token


def _processes(title: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _post_raw(url: str, path: str, headers: dict, declared: int, chunks) -> int | None:
    """POST a body declared as `declared` bytes, sending `chunks` until the server answers or closes; returns the
    status (None if none came)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.putrequest("POST", path)
        for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(declared)}.items():
            connection.putheader(name, value)
        connection.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered and closed before the end
            for chunk in chunks:
                connection.send(chunk)
        try:
            return connection.getresponse().status
        except (http.client.HTTPException, OSError):
            return None
    finally:
        connection.close()


# --- cases -----------------------------------------------------------------------------------------------


def auth_case(app: SuiteApp) -> list[Row]:
    routes = [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/v1/models"),
              ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]
    refused = 0
    for method, route in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": app.key}):
            reply = requests.request(method, app.url + route, headers=headers, timeout=60,
                                     json={"model": app.model, "prompt": "hi"} if method == "POST" else None)
            refused += reply.status_code == 401
    health = requests.get(app.url + "/health", timeout=60).status_code
    keyed = requests.get(app.url + "/openapi.json", headers=app.headers, timeout=60).status_code
    tries = 3 * len(routes)
    return [Row("auth", "routes x {none, wrong, no Bearer} refused with 401", f"{refused}/{tries}", f"{tries}/{tries}",
                refused == tries),
            Row("auth", "/health open, schema with the key", f"{health}, {keyed}", "200, 200",
                health == 200 and keyed == 200)]


def limits_case(app: SuiteApp) -> list[Row]:
    rows = []
    declared = 50 << 20
    start = time.perf_counter()
    status = _post_raw(app.url, "/v1/completions", app.headers, declared, [b"a" * 65536])
    seconds = time.perf_counter() - start
    rows.append(Row("limits", "50 MB body: the reply to its first 64 KiB", str(status), "413", status == 413))
    rows.append(Row("limits", "50 MB body: seconds to the 413", f"{seconds:.2f}", "-", True, timing=True))

    bound = app.settings.max_in_flight

    def one(_):
        body = {"model": app.model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 16,
                "temperature": 0, "stream": True}
        with requests.post(app.url + "/v1/chat/completions", json=body, headers=app.headers, stream=True,
                           timeout=600) as reply:
            return reply.status_code, reply.headers.get("retry-after"), reply.text

    with ThreadPoolExecutor(3 * bound) as pool:
        replies = list(pool.map(one, range(3 * bound)))
    ok = sum(code == 200 and text.rstrip().endswith("data: [DONE]") for code, _, text in replies)
    shed = sum(code == 503 and bool(retry) for code, retry, _ in replies)
    rows.append(Row("limits", f"{3 * bound} streams at once: 200s ending [DONE], 503s with Retry-After",
                    f"{ok}, {shed}", f"{bound}, {2 * bound}", ok == bound and shed == 2 * bound))

    big = json.dumps({"model": app.model, "messages": [{"role": "user", "content": "a " * (3 << 19)}]}).encode()
    stops = {"model": app.model, "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 32_000] * 4}
    intruders: list[int | None] = []
    running = threading.Event()

    def intrude():
        while running.is_set():
            intruders.append(_post_raw(app.url, "/v1/chat/completions", app.headers, len(big),
                                       (big[i : i + 65536] for i in range(0, len(big), 65536))))
            intruders.append(requests.post(app.url + "/v1/chat/completions", json=stops, headers=app.headers,
                                           timeout=120).status_code)
            time.sleep(0.2)

    def four_streams() -> dict:
        return run_load(app.url, app.model, PROMPTS[:4], 4, app.settings.max_tokens, app.headers)

    four_streams()  # warm-up: these prompts' first prefill
    alone, crowded = [], []
    for _ in range(2):  # interleaved, so that both see the same machine
        alone.append(four_streams())
        running.set()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(intrude)
            crowded.append(four_streams())
            running.clear()
            pending.result()
    base = sum(run["chunk_gap_ms"]["p99"] for run in alone) / len(alone)
    under = sum(run["chunk_gap_ms"]["p99"] for run in crowded) / len(crowded)
    ratio = under / base
    refused = sum(code in (400, 413) for code in intruders)
    rows.append(Row("limits", "3 MB prompts and 4 x 32k stops during 4 streams: refused 4xx / sent",
                    f"{refused}/{len(intruders)}", "all", refused == len(intruders) > 0))
    rows.append(Row("limits", "  their streams' p99 inter-token latency vs alone (ms)",
                    f"{under:.0f} / {base:.0f} = {ratio:.2f}x", "<= 1.5x", ratio <= 1.5,
                    timing=True))
    return rows


Results = list[tuple[str, StreamResult | Exception]]


def _stream_clients(app: SuiteApp, count: int, more: Callable[[], bool], during: Callable[[], int | float]):
    """`count` clients stream PROMPTS round robin, each stream after the first only while `more()`; `during()` runs
    meanwhile in this thread. Returns what `during` returned and every (prompt, result or exception)."""
    results: Results = []
    lock = threading.Lock()

    def client(index: int):
        turn = index
        while True:
            prompt = PROMPTS[turn % len(PROMPTS)]
            try:
                result: StreamResult | Exception = app.stream(prompt)
            except Exception as exc:  # noqa: BLE001 - a failed request is what this counts
                result = exc
            with lock:
                results.append((prompt, result))
            turn += count
            if not more():
                return

    with ThreadPoolExecutor(count) as pool:
        clients = [pool.submit(client, i) for i in range(count)]
        value = during()
        for future in clients:
            future.result()
    return value, results


def _tally(results: Results, reference: dict[str, str]) -> tuple[int, int, int]:
    """(streams, failed, text differing from the same prompt's without faults)."""
    failed = sum(isinstance(r, Exception) or r.error is not None or not r.done for _, r in results)
    differ = sum(not isinstance(r, Exception) and r.text != reference[p] for p, r in results)
    return len(results), failed, differ


def _through_faults(app: SuiteApp, reference: dict[str, str], inject: Callable[[], int]) -> tuple[int, ...]:
    """`settings.streams` clients stream until `inject` (run once they are under way) returns the faults it made,
    then finish their current stream; returns (faults, streams, failed, differing)."""
    done = threading.Event()

    def during() -> int:
        time.sleep(2.0)
        try:
            return inject()
        finally:
            done.set()

    faults, results = _stream_clients(app, app.settings.streams, lambda: not done.is_set(), during)
    return (faults, *_tally(results, reference))


def _fault_rows(name: str, faults: int, wanted: int, streams: int, failed: int, differ: int) -> list[Row]:
    return [Row("faults", f"{name}: faults made", str(faults), str(wanted), faults == wanted),
            Row("faults", "  streams run through them, failed, text differing", f"{streams}, {failed}, {differ}",
                "-, 0, 0", failed == 0 and differ == 0 and streams > 0)]


def faults_case(app: SuiteApp, reference: dict[str, str]) -> list[Row]:
    settings = app.settings

    def kill_redis() -> int:
        for _ in range(settings.redis_kills):
            app.redis.kill()
            time.sleep(1.0)
            app.redis.start()
            time.sleep(2.0)
        return settings.redis_kills

    def kill_replicas() -> int:
        killed = 0
        for _ in range(settings.replica_kills):
            pids = app.replica_pids(app.level)
            os.kill(pids[0], signal.SIGKILL)
            killed += 1
            time.sleep(1.0)
            app.wait_healthy()
            time.sleep(2.0)
        return killed

    poison: list[tuple[int, str]] = []

    def poison_request() -> int:
        reply = requests.post(app.url + "/v1/chat/completions", headers=app.headers, timeout=600,
                              json={"model": app.model, "messages": [{"role": "user", "content": POISON}],
                                    "max_tokens": 8})
        poison.append((reply.status_code, reply.json().get("error", {}).get("code", "")))
        app.wait_healthy()
        return 1

    _log(f"Redis killed {settings.redis_kills} times")
    rows = _fault_rows(f"Redis killed and restarted x{settings.redis_kills}", settings.redis_kills,
                       *_through_faults(app, reference, kill_redis))
    _log(f"a level replica killed {settings.replica_kills} times")
    rows += _fault_rows(f"level replica killed x{settings.replica_kills}", settings.replica_kills,
                        *_through_faults(app, reference, kill_replicas))
    _log("a request that kills its replica")
    rows += _fault_rows("a request killing its replicas", 1, *_through_faults(app, reference, poison_request))
    status, code = poison[0]
    rows.append(Row("faults", "  the poison's own reply", f"{status} {code}", "500 replica_crashed",
                    (status, code) == (500, "replica_crashed")))
    return rows


def node_loss_case(app: SuiteApp, reference: dict[str, str]) -> list[Row]:
    """On a head and three worker nodes (two hold the level's replicas): the node of a level replica that holds no
    ingress is removed while the streams run; Serve starts the replica again on the spare node."""
    removed: list[str] = []

    def remove_node() -> int:
        parents = {_parent(pid) for pid in app.replica_pids("ingress")}
        for node in app.workers:
            raylet = node.all_processes["raylet"][0].process.pid
            levels = [pid for pid in app.replica_pids(app.level) if _parent(pid) == raylet]
            if levels and raylet not in parents:
                app.cluster.remove_node(node, allow_graceful=False)
                app.workers.remove(node)
                removed.append(node.node_id)
                break
        else:
            return 0
        time.sleep(1.0)
        app.wait_healthy()
        return 1

    return _fault_rows("a node holding a level replica removed", 1, *_through_faults(app, reference, remove_node))


def _parent(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _schemathesis(app: SuiteApp, mode: str, phases: str, examples: int, har: Path) -> tuple[int, list[dict]]:
    """schemathesis' CLI against the app's schema; its exit status and the HAR entries of its requests."""
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{app.url}/openapi.json",
               "-H", f"Authorization: Bearer {app.key}", "--checks", "not_a_server_error", "--phases", phases,
               "--mode", mode, "--max-examples", str(examples), "--request-timeout", "300", "--seed", "1",
               "--no-color", "--report", "har", "--report-har-path", str(har), "--suppress-health-check", "all",
               "--workers", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=app.workdir, timeout=6 * 3600)
    if proc.returncode:
        _log(f"schemathesis ({mode}) failed:\n" + proc.stdout[-3000:] + proc.stderr[-2000:])
    return proc.returncode, json.loads(har.read_text())["log"]["entries"] if har.exists() else []


def fuzz_case(app: SuiteApp, examples: int) -> list[Row]:
    """Invalid requests (schemathesis' negative mode: boundary values past every bound, wrong types, missing and
    extra fields) by the hundred, then a few random valid ones per route, each of which generates (a valid request
    with 8 choices of 64 tokens costs about a minute here, so the positive mode's boundary cases, dozens per route,
    are left out)."""
    started = time.perf_counter()
    negative = _schemathesis(app, "negative", "coverage,fuzzing", examples, app.workdir / "negative.har")
    positive = _schemathesis(app, "positive", "fuzzing", max(1, examples // 60), app.workdir / "positive.har")
    seconds = time.perf_counter() - started
    entries = negative[1] + positive[1]
    statuses = [entry["response"]["status"] for entry in entries]
    server_errors = sum(code >= 500 or code == 0 for code in statuses)
    slowest = max((entry["time"] for entry in entries), default=0) / 1000
    after = requests.post(app.url + "/v1/chat/completions", headers=app.headers, timeout=300,
                          json={"model": app.model, "messages": [{"role": "user", "content": PROMPTS[0]}],
                                "max_tokens": 8}).status_code
    by_class = {c: sum(code // 100 == c for code in statuses) for c in (2, 4, 5)}
    wanted = min(1000, 4 * examples)
    return [Row("fuzz", "requests generated (2xx, 4xx, 5xx)", f"{len(statuses)} ({by_class[2]}, {by_class[4]}, "
                f"{by_class[5]})", f">= {wanted}, 5xx = 0", len(statuses) >= wanted and server_errors == 0 and
                negative[0] == positive[0] == 0),
            Row("fuzz", "slowest reply (s), the app answering afterwards", f"{slowest:.1f}, {after}", "< 300, 200",
                slowest < 300 and after == 200),
            Row("fuzz", "run time (s)", f"{seconds:.0f}", "-", True, timing=True)]


def soak_case(app: SuiteApp, reference: dict[str, str]) -> list[Row]:
    settings = app.settings
    deadline = time.monotonic() + 60 * settings.soak_minutes
    warm_at = time.monotonic() + 12 * settings.soak_minutes  # a fifth of the run

    def replicas() -> list[int]:
        return app.replica_pids(app.level) + app.replica_pids("ingress")

    def warm_memory() -> float:
        time.sleep(max(0.0, warm_at - time.monotonic()))
        return _rss_mib(replicas())

    _log(f"soak: {settings.soak_streams} streams for {settings.soak_minutes} min")
    started = time.perf_counter()
    warm, results = _stream_clients(app, settings.soak_streams, lambda: time.monotonic() < deadline, warm_memory)
    end = _rss_mib(replicas())
    seconds = time.perf_counter() - started
    streams, failed, differ = _tally(results, reference)
    tokens = sum(r.tokens for _, r in results if not isinstance(r, Exception))
    growth = 100 * (end - warm) / warm
    return [Row("soak", f"{settings.soak_streams} streams x {settings.soak_minutes:g} min: requests, failed, "
                        "text differing", f"{streams}, {failed}, {differ}", "-, 0, 0",
                failed == 0 and differ == 0 and streams >= settings.soak_streams),
            Row("soak", "  tokens/s over the run", f"{tokens / seconds:.1f}", "-", True, timing=True),
            Row("soak", "  replicas' resident MiB after warm-up -> end", f"{warm:.0f} -> {end:.0f} ({growth:+.1f}%)",
                "<= +10%", growth <= 10, timing=True)]


def storage_case(app: SuiteApp) -> list[Row]:
    from drafter_db.model_db import ModelDB

    db = ModelDB()
    try:
        db.load(app.model_db_path)
        keys, error = len(db), ""
    except (OSError, ValueError) as exc:
        keys, error = 0, str(exc)
    return [Row("storage", "the model DB file the app saved: keys read back", str(keys) if not error else error,
                "> 0", keys > 0)]


def reference_texts(app: SuiteApp) -> dict[str, str]:
    """Every prompt's text with no fault, its streams side by side as in the cases."""
    with ThreadPoolExecutor(app.settings.streams) as pool:
        results = list(pool.map(app.stream, PROMPTS))
    return {prompt: result.text for prompt, result in zip(PROMPTS, results)}


def run_reliability(settings: SuiteSettings, out: str, workdir: Path, cases: tuple[str, ...] = CASES) -> list[Row]:
    """Start the app, run the cases (in the order of CASES), print the table, write JSON; returns the rows."""
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}: choose from {', '.join(CASES)}")
    app = SuiteApp(workdir, settings)
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        app.start()
        app.deploy()
        reference = reference_texts(app) if {"faults", "soak", "node-loss"} & set(cases) else {}
        steps: dict[str, Callable[[], list[Row]]] = {
            "auth": lambda: auth_case(app), "limits": lambda: limits_case(app),
            "faults": lambda: faults_case(app, reference), "fuzz": lambda: fuzz_case(app, settings.fuzz_examples),
            "soak": lambda: soak_case(app, reference), "storage": lambda: storage_case(app)}
        for name, step in steps.items():
            if name in cases:
                _log(name)
                rows += step()
        if "node-loss" in cases:
            app.undeploy()
            app.deploy(worker_nodes=3)
            _log("node-loss")
            rows += node_loss_case(app, reference)
    finally:
        app.stop()
    result = {"settings": settings.model_dump(), "cases": list(cases), "machine": machine(),
              "seconds": round(time.perf_counter() - started), "rows": [asdict(row) for row in rows]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(format_table(rows))
    print(f"\nwrote {out}")
    return rows


def format_table(rows: list[Row]) -> str:
    table = [["case", "figure", "value", "target", "holds"]] + \
            [[r.case, r.figure, r.value, r.target, ("yes" if r.holds else "NO") + (" (timing)" if r.timing else "")]
             for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)
