"""The server's Prometheus metrics (prometheus-client), one registry per app so two servers in one process (the
tests) count apart."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mova_requests", "Chat-completion requests by HTTP status (499: the client left)",
                                ["status"], registry=r)
        self.latency = Histogram("mova_request_seconds", "Request time, arrival to last token", buckets=SECONDS,
                                 registry=r)
        self.ttft = Histogram("mova_time_to_first_token_seconds", "Arrival to the answer's first token",
                              buckets=SECONDS, registry=r)
        self.stages = Histogram("mova_stage_seconds", "Per-stage time of answered requests", ["stage"],
                                buckets=SECONDS, registry=r)
        self.experts = Counter("mova_routed_expert", "Requests routed to each vision expert", ["expert"], registry=r)
        self.tokens = Counter("mova_completion_tokens", "Answer tokens generated", registry=r)
        self.cut = Counter("mova_cut_requests", "Answers stopped early (cancelled: the client left)", ["reason"],
                           registry=r)
        self.queue = Gauge("mova_queue_depth", "Requests waiting behind the one being answered", registry=r)

    def answered(self, answer: Any, seconds: float, ttft_s: float | None) -> None:
        """Every answer the runtime produced, cut ones included (their tokens were computed)."""
        self.tokens.inc(len(answer.token_ids))
        if answer.cut:
            self.cut.labels(answer.cut).inc()
            return
        self.latency.observe(seconds)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        for stage, ms in answer.timings_ms.items():
            self.stages.labels(stage).observe(ms / 1e3)
        for letter in answer.experts:
            self.experts.labels(letter).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
