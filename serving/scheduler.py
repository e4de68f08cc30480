"""Batching across requests: one thread owns the model and steps every live request together.

Each HTTP request becomes one or more `Job`s (one per prompt and per choice). The scheduler
admits queued jobs between steps (up to `max_batch` live at once), calls `Decoder.step` on the
live ones (one network call each, batched), pushes progress (newly final tokens) to each job's
asyncio queue, and retires finished, cancelled and timed-out jobs at once, freeing their slot.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
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

    def post(self, kind: str, value, outbox: Optional[list] = None) -> None:
        """Send an event to the job's HTTP handler: at once, or (with `outbox`) in the scheduler's
        next `_flush`, which wakes each event loop once for all the events of a step."""
        if outbox is not None:
            outbox.append((self, kind, value))
        elif self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))


def _deliver(items: list) -> None:
    """Runs in an event loop: hand a step's events to their jobs' queues."""
    for job, kind, value in items:
        job.events.put_nowait((job.index, kind, value))


class Scheduler:
    def __init__(self, decoder: Decoder, max_batch: int = 32, max_queue: int = 256, metrics=None):
        self.decoder = decoder
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.pending: collections.deque[Job] = collections.deque()
        self.live: list[Job] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.stepped_jobs = 0  # sum over steps of the batch size: stepped_jobs / steps = mean batch
        self.step_seconds = 0.0
        self.outbox: list = []  # (job, kind, value) posted during a step, sent by _flush
        self.thread = threading.Thread(target=self._run, name="dlm-scheduler", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------- called from the web server
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none). Raises QueueFull when they do not fit. Jobs come set up
        (`job.request`, from the decoder's new_request, done off the event loop by the caller);
        a job without one is set up here (DLMError on bad input)."""
        events = asyncio.Queue()
        for i, j in enumerate(jobs):  # bad input never reaches the batch
            if j.request is None:
                j.request = self.decoder.new_request(j.prompt, j.config, j.seed, j.constraint)
            j.loop, j.events, j.index = asyncio.get_running_loop(), events, i
        with self.lock:
            if len(self.pending) + len(self.live) + len(jobs) > self.max_queue:
                raise QueueFull()
            self.pending.extend(jobs)
            self.lock.notify()

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
                while not self.stopping and not self.pending and not self.live:
                    self.lock.wait()
                if self.stopping:
                    for j in list(self.pending) + self.live:
                        j.post("error", ShuttingDown("the server is shutting down; retry"))
                    return
                while self.pending and len(self.live) < self.max_batch:
                    self.live.append(self.pending.popleft())
            self._retire_cancelled()
            if not self.live:
                continue
            t_step = time.perf_counter()
            try:  # a request's own failure finishes it with an error inside the step (the others go on)
                self.decoder.step([j.request for j in self.live])
            except Exception as e:  # a fault outside every request's own work must not kill the server
                for j in self.live:
                    self.decoder.cancel(j.request)
                    j.post("error", InternalError(f"decoding failed: internal error ({type(e).__name__})"))
                self.live = []
                continue
            now = time.perf_counter()
            self.steps += 1
            self.stepped_jobs += len(self.live)
            self.step_seconds += now - t_step
            keep = []
            for j in self.live:
                r = j.request
                if r.finished and r.result.error is not None:
                    j.post("error", r.result.error, self.outbox)
                    if self.metrics:
                        self.metrics.failed()
                    continue
                if r.finished:
                    self._report_progress(j, final=True)
                    j.post("done", r.result, self.outbox)
                    if self.metrics:
                        self.metrics.finished(j, r.result)
                    continue
                if j.deadline is not None and now > j.deadline:
                    self.decoder.cancel(r)
                    j.post("error", JobTimeout("timeout"), self.outbox)
                    continue
                self._report_progress(j)
                keep.append(j)
            self.live = keep
            self._flush()

    def _flush(self) -> None:
        """One wake-up per event loop for all the events of a step (waking the loop once per
        job per step cost the scheduler a system call each, and the loop as many wake-ups)."""
        by_loop: dict = {}
        for item in self.outbox:
            loop = item[0].loop
            if loop is not None and not loop.is_closed():
                by_loop.setdefault(loop, []).append(item)
        self.outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                pass

    def _retire_cancelled(self) -> None:
        with self.lock:
            gone = [j for j in self.pending if j.cancelled]
            for j in gone:
                self.pending.remove(j)
        for j in [j for j in self.live if j.cancelled]:
            self.decoder.cancel(j.request)
            gone.append(j)
        self.live = [j for j in self.live if not j.cancelled]
        if self.metrics:
            for _ in gone:
                self.metrics.cancelled()

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
                job.post("tokens", toks, self.outbox)

