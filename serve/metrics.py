"""Prometheus metrics of the OpenAI server (exported by Ray's metrics agent, `ray_` prefix), plus in-process totals.

The totals mirror the counters so a caller holding a deployment handle can read them without scraping Prometheus
(`OpenAIServer.stats()`: the serve job reports `requests_served` from it, tests assert that counters moved).
"""
from __future__ import annotations

import threading
from collections import Counter as Tally

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
TOKENS_PER_S_BOUNDARIES = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


class ServeMetrics:
    def __init__(self) -> None:
        # ray.serve.metrics adds the deployment / replica / application tags inside a replica.
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("coolray_serve_requests_total", description="HTTP requests by endpoint and status",
                                tag_keys=("endpoint", "status"))
        self.latency = Histogram("coolray_serve_request_latency_seconds", boundaries=LATENCY_BOUNDARIES_S,
                                 description="Time from request arrival to the last byte of the answer",
                                 tag_keys=("endpoint",))
        self.prompt_tokens = Counter("coolray_serve_prompt_tokens_total", description="Prompt tokens processed",
                                     tag_keys=("endpoint",))
        self.generated_tokens = Counter("coolray_serve_generated_tokens_total", description="Completion tokens",
                                        tag_keys=("endpoint",))
        self.tokens_per_s = Histogram("coolray_serve_generation_tokens_per_second",
                                      boundaries=TOKENS_PER_S_BOUNDARIES,
                                      description="Completion tokens / generation seconds, per request",
                                      tag_keys=("endpoint",))
        self._lock = threading.Lock()
        self._totals: Tally = Tally()

    def record(self, endpoint: str, status: int, latency_s: float, prompt_tokens: int = 0,
               completion_tokens: int = 0, generation_s: float = 0.0) -> None:
        tags = {"endpoint": endpoint}
        self.requests.inc(1, tags={**tags, "status": str(status)})
        self.latency.observe(latency_s, tags=tags)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags=tags)
        if completion_tokens:
            self.generated_tokens.inc(completion_tokens, tags=tags)
            if generation_s > 0:
                self.tokens_per_s.observe(completion_tokens / generation_s, tags=tags)
        with self._lock:
            self._totals["requests"] += 1
            self._totals[f"status_{status}"] += 1
            self._totals[f"endpoint_{endpoint}"] += 1
            self._totals["prompt_tokens"] += prompt_tokens
            self._totals["completion_tokens"] += completion_tokens

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)
