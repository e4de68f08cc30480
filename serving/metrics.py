"""Prometheus metrics of the server (GET /metrics): requests, tokens, latency, the engine's
scheduler (its `stats()`, which a process engine reports with each step)."""

from __future__ import annotations

import time


class Metrics:
    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("dlm_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.tokens = Counter("dlm_generated_tokens", "generated tokens (up to EOS)", registry=r)
        self.nfe = Counter("dlm_forward_passes", "network calls per request, summed", registry=r)
        self.cancels = Counter("dlm_cancelled_jobs", "jobs cancelled (client gone, timeout)", registry=r)
        self.failures = Counter("dlm_failed_jobs", "jobs that failed alone (constraint, decode error)", registry=r)
        self.latency = Histogram("dlm_request_latency_seconds", "job latency, submit to finish", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("dlm_time_to_first_token_seconds", "submit to the first final token", registry=r,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.compile_s = Histogram("dlm_constraint_compile_seconds", "constraint compile time (cache misses too)",
                                   registry=r, buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
        self.tps = Gauge("dlm_tokens_per_second", "generated tokens per second over the last 10 s", registry=r)
        self.queue = Gauge("dlm_queue_depth", "jobs waiting for a slot", registry=r)
        self.running = Gauge("dlm_running_jobs", "jobs in the batch", registry=r)
        self.queue.set_function(lambda: engine.stats()["queued"])
        self.running.set_function(lambda: engine.stats()["running"])
        self.steps = Gauge("dlm_scheduler_steps", "batched decoding steps so far", registry=r)
        self.stepped = Gauge("dlm_scheduler_stepped_jobs", "sum of batch sizes over steps (/ steps = mean batch)",
                             registry=r)
        self.step_s = Gauge("dlm_scheduler_step_seconds", "seconds spent in decoding steps", registry=r)
        self.steps.set_function(lambda: engine.stats()["steps"])
        self.stepped.set_function(lambda: engine.stats()["stepped_jobs"])
        self.step_s.set_function(lambda: engine.stats()["step_seconds"])
        self._recent: list[tuple[float, int]] = []
        self.tps.set_function(self._rate)

    def _rate(self) -> float:
        self._prune(time.perf_counter())
        return sum(n for _, n in self._recent) / 10.0

    def _prune(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] >= 10:  # oldest first
            self._recent.pop(0)

    def finished(self, job, result) -> None:
        now = time.perf_counter()
        n = result.stats.get("generated_tokens", 0)
        self.tokens.inc(n)
        self.nfe.inc(result.stats.get("nfe", 0))
        self.latency.observe(now - job.submitted)
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.submitted)
        self._recent.append((now, n))
        self._prune(now)  # bounded even when nobody scrapes /metrics

    def cancelled(self) -> None:
        self.cancels.inc()

    def failed(self) -> None:
        self.failures.inc()
