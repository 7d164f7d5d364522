"""The model DB's Redis mirror: completed outputs shared by every router replica.

Each replica keeps its model DB in process (lookups stay microseconds) and
appends every completed output to one capped Redis stream per tokenizer; at a
request's start, at most once per `sync_seconds`, it reads what the other
replicas appended since its last read and counts it into its own model DB. A
new replica catches up on the last `max_outputs` outputs. Like the statistics
store it never blocks decoding for long and never fails it: short timeouts,
and errors only cost sharing.
"""

from __future__ import annotations

import time
import uuid
from array import array


class SharedOutputs:
    def __init__(self, url: str, namespace: str, max_outputs: int = 10_000, sync_seconds: float = 1.0,
                 timeout: float = 0.05):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.stream = f"hs:{namespace}:outputs"
        self.origin = uuid.uuid4().hex.encode()
        self.max_outputs = max_outputs
        self.sync_seconds = sync_seconds
        self.errors = 0
        self._last_id = b"0-0"
        self._next_sync = 0.0

    def publish(self, token_ids: list[int]) -> None:
        try:
            self.client.xadd(self.stream, {b"origin": self.origin, b"tokens": array("i", token_ids).tobytes()},
                             maxlen=self.max_outputs, approximate=True)
        except Exception:  # sharing is best effort: the local model DB has the output already
            self.errors += 1

    def pull(self) -> list[list[int]]:
        """Outputs other replicas appended since the last pull (none if pulled within `sync_seconds`)."""
        now = time.monotonic()
        if now < self._next_sync:
            return []
        self._next_sync = now + self.sync_seconds
        outputs = []
        try:
            while True:
                reply = self.client.xread({self.stream: self._last_id}, count=1000)
                entries = reply[0][1] if reply else []
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    if fields.get(b"origin") != self.origin:
                        outputs.append(array("i", fields[b"tokens"]).tolist())
                if len(entries) < 1000:
                    return outputs
        except Exception:
            self.errors += 1
            return outputs
