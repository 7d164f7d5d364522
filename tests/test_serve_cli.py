"""`hierspec serve`, the README's main command, as a process: started from a model name alone it answers the
README's curl, and SIGTERM (what `kill`, systemd and Kubernetes send) stops it cleanly: Serve and its Ray cluster
shut down, exit status 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from deploy.reliability.redis_server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("hierspec")), "serve", "--model",
                                 "smollm2-135m", "--dtype", "float32", "--port", str(port),
                                 "--metrics-port", str(free_port())],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "is serving" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "hierspec serve did not start in 300 s"
            time.sleep(1)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json() == {"status": "ok"}
        reply = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Write a haiku about caches."}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "Abort" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
