"""Data parallelism (`dlm serve --data-parallel N`): N engines behind one front end, with the
interface of one engine (serving/engine.py)."""

from __future__ import annotations

import itertools
import threading
from typing import Optional

from .scheduler import EngineUnavailable, Job


class ReplicatedEngine:
    """Data parallelism: N engines (each a ProcessEngine, possibly tensor-parallel itself) behind
    one front end. A request's jobs go to the healthy replica with the fewest jobs in flight
    (queued + running, counting what was sent since its last report); scoring takes turns."""

    mode = "process"

    def __init__(self, replicas: list):
        self.replicas = replicas
        self._sent = [0] * len(replicas)  # jobs started on each replica and not ended
        self._turn = itertools.count()
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:  # serving as long as one replica is
        return any(r.healthy for r in self.replicas)

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    def _pick(self) -> int:
        up = [i for i, r in enumerate(self.replicas) if r.healthy]
        if not up:
            raise EngineUnavailable("every engine replica is restarting; retry shortly")
        return min(up, key=lambda i: (self._sent[i], i))

    async def start(self, jobs: list[Job]) -> Optional[float]:
        with self._lock:
            i = self._pick()
            self._sent[i] += len(jobs)
        for j in jobs:
            j.replica = i
            j.on_end = _counting(j.on_end, self)
        try:
            return await self.replicas[i].start(jobs)
        except BaseException:
            for j in jobs:
                self._release(j)
            raise

    def _release(self, job: Job) -> None:
        """The job no longer counts on its replica (once, whether it ended or was cancelled)."""
        with self._lock:
            if not getattr(job, "released", False):
                job.released = True
                self._sent[job.replica] -= 1

    def cancel(self, job: Job) -> None:
        if getattr(job, "replica", None) is not None:
            self._release(job)
            self.replicas[job.replica].cancel(job)

    def score(self, ids: list[int], k: int, start: int):
        up = [r for r in self.replicas if r.healthy] or self.replicas
        return up[next(self._turn) % len(up)].score(ids, k, start)

    def stats(self) -> dict:
        out = {"running": 0, "queued": 0, "steps": 0, "stepped_jobs": 0, "step_seconds": 0.0}
        for r in self.replicas:
            for k, v in r.stats().items():
                out[k] += v
        return out

    def close(self) -> None:
        for r in self.replicas:
            r.close()


def _counting(on_end, engine: ReplicatedEngine):
    """The job's end hook, plus the replica's in-flight count."""
    def ended(job, kind, value):
        engine._release(job)
        if on_end is not None:
            on_end(job, kind, value)
    return ended
