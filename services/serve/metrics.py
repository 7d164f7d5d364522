"""Serving metrics through Ray's metrics API: exported by every node's metrics agent
(Prometheus format, prefixed `ray_`), shown by the Ray dashboard and the Grafana
dashboard in `deploy/grafana_dashboard.json`."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from services.engine.hsd import GenerationStats

_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class ForwardMetrics:
    """The latency of each level forward, kept where the rounds run: the ingress, or the target's replica when
    it runs a one-level hierarchy's rounds (`serving.rounds_in: target`)."""

    def __init__(self, model: str):
        self._tags = {"model": model}
        self.round_latency = Histogram("hierspec_round_latency_seconds", "One forward of a level, as the router "
                                       "waits for it.", _LATENCY_BOUNDARIES, ("model", "level"))

    def on_forward(self, level: str, seconds: float) -> None:
        self.round_latency.observe(seconds, {**self._tags, "level": level})


class ServingMetrics(ForwardMetrics):
    """One set per router replica; `model` tags every series with the served model name."""

    def __init__(self, model: str):
        super().__init__(model)
        self.generated = Counter("hierspec_tokens_generated", "Tokens returned to clients.", ("model",))
        self.drafted = Counter("hierspec_tokens_drafted", "Draft tokens proposed, by level or DB source.",
                               ("model", "level"))
        self.accepted = Counter("hierspec_tokens_accepted", "Draft tokens accepted, by level or DB source.",
                                ("model", "level"))
        self.acceptance = Gauge("hierspec_acceptance_rate", "Accepted / drafted of the last finished request.",
                                ("model", "level"))
        self.ttft = Histogram("hierspec_time_to_first_token_seconds", "Request arrival to first token.",
                              _LATENCY_BOUNDARIES, ("model",))
        self.itl = Histogram("hierspec_inter_token_latency_seconds", "Time between tokens after the first "
                             "(a round's latency spread over its tokens).", _LATENCY_BOUNDARIES, ("model",))
        self.in_flight = Gauge("hierspec_requests_in_flight", "Requests the router is running.", ("model",))
        self.requests = Counter("hierspec_requests", "Finished requests by outcome.", ("model", "outcome"))
        self.in_flight.set(0, self._tags)

    def on_tokens(self, count: int, first: bool, seconds: float) -> None:
        self.generated.inc(count, self._tags)
        if first:
            self.ttft.observe(seconds, self._tags)
        else:
            for _ in range(count):
                self.itl.observe(seconds / count, self._tags)

    def set_in_flight(self, count: int) -> None:
        self.in_flight.set(count, self._tags)

    def on_finish(self, stats: GenerationStats, outcome: str) -> None:
        self.requests.inc(1, {**self._tags, "outcome": outcome})
        counts = [(level.name, level.drafted, level.accepted) for level in stats.levels[:-1]]
        counts += [(f"db:{name}", src.drafted, src.accepted) for name, src in stats.sources.items()]
        for name, drafted, accepted in counts:
            tags = {**self._tags, "level": name}
            if drafted:
                self.drafted.inc(drafted, tags)
                if accepted:  # Ray counters take positive increments only
                    self.accepted.inc(accepted, tags)
                self.acceptance.set(accepted / drafted, tags)
