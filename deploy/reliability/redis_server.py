"""A real redis-server on a free loopback port, started, killed and restarted by the tests and the reliability
suite (`make setup` installs it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`args`: more redis-server arguments (ACL users, say); `login`: (user, password) the start-up ping uses."""

    def __init__(self, workdir, args: list[str] | None = None, login: tuple[str, str] | None = None):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run `make setup`")
        self.port = free_port()
        self.workdir = workdir
        self.args = args or []
        self.login = login
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        user, password = self.login or (None, None)
        client = redis.Redis(port=self.port, username=user, password=password)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, as the kernel's out-of-memory killer or a lost node ends it: nothing is flushed. `start()` again
        on the same port loads what the last `SAVE` wrote into `workdir`."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
