"""Batching across requests: one thread owns the model and steps every live request together.

Each HTTP request becomes one or more `Job`s (one per prompt and per choice). The scheduler
admits queued jobs between steps (up to `max_batch` live at once), calls `Decoder.step` on the
live ones (one network call each, batched), hands each step's events (newly final tokens, ends,
errors) to its `sink` in one call, and retires finished, cancelled and timed-out jobs at once,
freeing their slot. The sink is `deliver_to_loops` when the scheduler runs in the HTTP process
(each job's asyncio queue, one wake-up per event loop per step) or the engine process's pipe
(serving/engine.py).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from dlm.decoding.config import DecodeConfig
from dlm.decoding.engine import Decoder
from dlm.decoding.state import DecodeRequest


class QueueFull(Exception):
    """The server has `max_queue` jobs waiting or running: retry later."""


class JobTimeout(Exception):
    """The job ran past its deadline (the server's --request-timeout)."""


class ShuttingDown(Exception):
    """The server is stopping; the job was not finished."""


class InternalError(Exception):
    """The batched step failed outside any one request's own work."""


class EngineUnavailable(Exception):
    """The engine process died (the job was lost with it) or is restarting."""


@dataclass
class Job:
    prompt: list[int]
    config: DecodeConfig
    seed: int
    constraint: object = None
    deadline: Optional[float] = None
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None  # shared by the jobs of one HTTP request: (index, kind, value),
    index: int = 0  # kind "tokens" (final prefix) / "done" (DecodeResult) / "error" (an exception)
    request: Optional[DecodeRequest] = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None
    sent: int = 0  # final answer tokens already reported
    stream: bool = False  # post progress ("tokens") events; otherwise only the end
    key: int = 0  # the job's id between the HTTP process and the engine process
    finished: bool = False  # its end ("done" / "error") was delivered to the HTTP handler
    on_end: Optional[object] = None  # called (job, kind, value) in the event loop when it ends (metrics)


def _deliver(items: list) -> None:
    """Runs in an event loop: hand events to their jobs' queues."""
    for job, kind, value in items:
        if kind != "tokens":
            job.finished = True
            if job.on_end is not None:
                job.on_end(job, kind, value)
        job.events.put_nowait((job.index, kind, value))


def deliver_to_loops(items: list) -> None:
    """Send (job, kind, value) events to the jobs' event loops: one wake-up per loop for all of
    them (waking a loop once per job per step cost a system call each, and as many wake-ups)."""
    by_loop: dict = {}
    for item in items:
        loop = item[0].loop
        if loop is not None and not loop.is_closed():
            by_loop.setdefault(loop, []).append(item)
    for loop, its in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, its)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting
            pass


class Scheduler:
    def __init__(self, decoder: Decoder, max_batch: int = 32, max_queue: int = 256, sink=deliver_to_loops,
                 on_fatal=None):
        self.decoder = decoder
        self.on_fatal = on_fatal  # called with a failed batched step's error before the jobs fail (see below)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.sink = sink  # called with each step's [(job, kind, value), ...]
        self.pending: collections.deque[Job] = collections.deque()
        self.live: list[Job] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.stepped_jobs = 0  # sum over steps of the batch size: stepped_jobs / steps = mean batch
        self.step_seconds = 0.0
        self.calls: collections.deque = collections.deque()  # (fn, Future) run by this thread between steps
        self.outbox: list = []  # (job, kind, value) posted during a step, sent by _flush
        self._sizes = (0, 0)  # (queued, running) at the last _flush
        self.thread = threading.Thread(target=self._run, name="dlm-scheduler", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------- called from the web server
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none). Raises QueueFull when they do not fit. Jobs come set up
        (`job.request`, from the decoder's new_request, done off the event loop by the caller);
        a job without one is set up here (DLMError on bad input)."""
        for j in jobs:  # bad input never reaches the batch
            if j.request is None:
                j.request = self.decoder.new_request(j.prompt, j.config, j.seed, j.constraint)
        with self.lock:
            if len(self.pending) + len(self.live) + len(jobs) > self.max_queue:
                raise QueueFull()
            self.pending.extend(jobs)
            self.lock.notify()

    def call(self, fn) -> Future:
        """Run fn() in the scheduler's thread between two steps (a tensor-parallel engine's
        other collective work, e.g. scoring); its result or error comes in the Future."""
        fut: Future = Future()
        with self.lock:
            if self.stopping:
                fut.set_exception(ShuttingDown("the server is shutting down; retry"))
                return fut
            self.calls.append((fn, fut))
            self.lock.notify()
        return fut

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves at the next step boundary."""
        job.cancelled = True
        with self.lock:
            self.lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def running(self) -> int:
        return len(self.live)

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # ---------------------------------------------------------- the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while not self.stopping and not self.pending and not self.live and not self.calls:
                    self.lock.wait()
                calls, self.calls = list(self.calls), collections.deque()
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller's
                    fut.set_exception(e)
            with self.lock:
                if self.stopping:
                    self.outbox = [(j, "error", ShuttingDown("the server is shutting down; retry"))
                                   for j in list(self.pending) + self.live]
                    self._flush()
                    return
                while self.pending and len(self.live) < self.max_batch:
                    self.live.append(self.pending.popleft())
            self._retire_cancelled()
            if not self.live:
                self._flush()
                continue
            t_step = time.perf_counter()
            try:  # a request's own failure finishes it with an error inside the step (the others go on)
                self.decoder.step([j.request for j in self.live])
            except Exception as e:  # a fault outside every request's own work must not kill the server
                if self.on_fatal is not None:  # unless the engine cannot go on (a tensor-parallel rank is gone)
                    self.on_fatal(e)
                for j in self.live:
                    self.decoder.cancel(j.request)
                    self.outbox.append((j, "error", InternalError(f"decoding failed: internal error ({type(e).__name__})")))
                self.live = []
                self._flush()
                continue
            now = time.perf_counter()
            self.steps += 1
            self.stepped_jobs += len(self.live)
            self.step_seconds += now - t_step
            keep = []
            for j in self.live:
                r = j.request
                if r.finished and r.result.error is not None:
                    self.outbox.append((j, "error", r.result.error))
                    continue
                if r.finished:
                    self._report_progress(j, final=True)
                    self.outbox.append((j, "done", r.result))
                    continue
                if j.deadline is not None and now > j.deadline:
                    self.decoder.cancel(r)
                    self.outbox.append((j, "error", JobTimeout("timeout")))
                    continue
                self._report_progress(j)
                keep.append(j)
            self.live = keep
            self._flush()

    def _flush(self) -> None:
        """Hand the step's events to the sink in one call (an empty call too when the batch or
        the queue changed size: a process engine reports its counts with each call)."""
        items, self.outbox = self.outbox, []
        sizes = (len(self.pending), len(self.live))
        if items or sizes != self._sizes:
            self._sizes = sizes
            self.sink(items)

    def _retire_cancelled(self) -> None:
        with self.lock:
            for j in [j for j in self.pending if j.cancelled]:
                self.pending.remove(j)
        for j in [j for j in self.live if j.cancelled]:
            self.decoder.cancel(j.request)
        self.live = [j for j in self.live if not j.cancelled]

    def _report_progress(self, job: Job, final: bool = False) -> None:
        """Post the answer's final prefix (tokens before the first MASK) when it grew."""
        r = job.request
        if final:
            n = len(r.result.tokens)
            toks = r.result.tokens
        else:
            ans = r.answer()
            mask = self.decoder.cfg.mask_token_id
            n = ans.index(mask) if mask in ans else len(ans)
            toks = ans[:n]
        if n > job.sent or final:
            if job.first_token is None and n > 0:
                job.first_token = time.perf_counter()
            job.sent = n
            if job.stream:
                self.outbox.append((job, "tokens", toks))

