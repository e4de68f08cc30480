"""The model's side of the server: the engine core (decoder, constraint compiler, scheduler),
in its own process by default, apart from the HTTP front end.

    front end (FastAPI: validate, tokenize, stream)  <--pipe-->  engine process (EngineCore)

The front end never touches the model: it hands jobs to an engine through one interface,

    await engine.start(jobs)        compile the constraint, set up, queue (APIError on refusal)
    engine.cancel(job)              the client went away
    engine.score(ids, k, start)     token logprobs (blocking: call it from a worker thread)
    engine.stats() / .healthy / .close()

and gets each job's events ("tokens" / "done" / "error") on the job's own asyncio queue.
`ProcessEngine` runs the core in a child process (spawned, so it owns its threads and its GIL:
the decoding loop no longer competes with the HTTP event loop) and talks to it over a
`multiprocessing` pipe, one message per decoding step for all its events. If the child dies,
the jobs in flight get a 503 (`EngineUnavailable`), `/health` says unhealthy and the engine is
started again. `LocalEngine` runs the same core in the HTTP process (a model object handed to
`create_app`, e.g. in tests, or `dlm serve --engine thread`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from dlm.errors import DLMError

from .scheduler import EngineUnavailable, Job, Scheduler, deliver_to_loops


class ConstraintRefused(DLMError):
    """The constraint could not be compiled (unsupported, or over the compile budgets)."""


class EngineCore:
    """Decoder + constraint compiler + scheduler over one model. `sink` receives each step's
    [(job, kind, value), ...] (see Scheduler)."""

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 256, compile_limits=None,
                 compile_workers: int = 4, sink=deliver_to_loops, lockstep_group=None, scheduler: bool = True):
        from dlm.constraints import ConstraintCompiler
        from dlm.decoding import ARDecoder, Decoder
        from dlm.families import family_of

        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        ar = family_of(cfg).autoregressive
        # the AR baseline through the same scheduler: one token per request per step, exact logprobs
        self.decoder = ARDecoder(model) if ar else Decoder(model)
        self.lockstep = None
        if lockstep_group is not None:  # rank 0 of a tensor-parallel engine (serving/lockstep.py)
            from .lockstep import Lockstep

            self.decoder = self.lockstep = Lockstep(self.decoder, lockstep_group)
        self.compiler = None if ar else ConstraintCompiler(tokenizer, cfg.vocab_size, cfg.eos_token_id,
                                                           limits=compile_limits)
        self.scheduler = None
        if scheduler:
            self.scheduler = Scheduler(self.decoder, max_batch=max_batch, max_queue=max_queue, sink=sink,
                                       on_fatal=_exit_engine if self.lockstep is not None else None)
        self.pool = ThreadPoolExecutor(max_workers=compile_workers, thread_name_prefix="dlm-compile")
        if self.compiler is not None:
            self.pool.submit(self.compiler.warm)  # start the automaton builders off the request path

    def admit(self, jobs: list[Job]) -> Optional[float]:
        """Compile the jobs' constraint (one per request; cached), set up each job's decoder
        request (a constraint's first witness: one no output of max_tokens satisfies is refused
        here) and queue them, all or none. Blocking: run it in a worker thread. Returns the
        compile time (None without a constraint); raises ConstraintRefused, DLMError, QueueFull."""
        spec = jobs[0].constraint
        compiled, seconds = None, None
        if spec is not None:
            t0 = time.perf_counter()
            try:
                compiled = self.compiler.compile(spec)
            except DLMError as e:
                raise ConstraintRefused(str(e)) from None
            seconds = time.perf_counter() - t0
        extra = {"spec": spec} if self.lockstep is not None else {}  # the other ranks compile it too
        try:
            for j in jobs:
                j.constraint = compiled
                j.request = self.decoder.new_request(j.prompt, j.config, j.seed, compiled, **extra)
            self.scheduler.submit(jobs)
        except BaseException:
            for j in jobs:  # set up but never queued: free them (and tell the other ranks)
                if j.request is not None:
                    self.decoder.cancel(j.request)
            raise
        return seconds

    def score(self, ids: list[int], k: int, start: int):
        """(logprob per token, top-k per token) of `ids` (dlm.likelihood.token_top_logprobs).
        Tensor-parallel: every rank's forward, so in the scheduler's thread between steps."""
        from dlm.likelihood import token_top_logprobs

        if self.lockstep is not None:
            return self.scheduler.call(lambda: self.lockstep.score(ids, k, start)).result()
        return token_top_logprobs(self.model, ids, k, start=start)

    def cancel(self, job: Job) -> None:
        self.scheduler.cancel(job)

    def stats(self) -> dict:
        s = self.scheduler
        return {"running": s.running, "queued": s.queue_depth, "steps": s.steps, "stepped_jobs": s.stepped_jobs,
                "step_seconds": s.step_seconds}

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.lockstep is not None:
            self.lockstep.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _exit_engine(error: BaseException) -> None:
    """A tensor-parallel step failed: the ranks may no longer agree (one of them is gone), so the
    engine process ends and the front end restarts every rank (the jobs in flight get a 503)."""
    print(f"dlm serve: a tensor-parallel step failed ({type(error).__name__}: {error}); the engine stops "
          "and is restarted", file=sys.stderr, flush=True)
    os._exit(70)


class LocalEngine:
    """The engine core in the HTTP process (a thread steps the batch)."""

    mode = "thread"
    healthy = True

    def __init__(self, core: EngineCore):
        self.core = core

    async def start(self, jobs: list[Job]) -> Optional[float]:
        return await asyncio.get_running_loop().run_in_executor(self.core.pool, self.core.admit, jobs)

    def cancel(self, job: Job) -> None:
        self.core.cancel(job)

    def score(self, ids: list[int], k: int, start: int):
        return self.core.score(ids, k, start)

    def stats(self) -> dict:
        return self.core.stats()

    def close(self) -> None:
        self.core.close()


@dataclass
class EngineSpec:
    """What an engine process needs to build itself (picklable)."""

    model_dir: str
    device: Optional[str] = None
    tokenizer: Optional[str] = None
    trust_remote_code: bool = False
    max_batch: int = 32
    max_queue: int = 256
    compile_limits: object = None
    compile_workers: int = 4
    threads: Optional[int] = None  # torch threads per rank (default: the parent's count / ranks)
    tensor_parallel: int = 1  # ranks the model is split over (serving/lockstep.py)
    first_gpu: int = 0  # on GPUs rank r takes cuda:(first_gpu + r) (data-parallel replicas: their own GPUs)
    compile: bool = False  # torch.compile the model (dlm.runtime.compile_model)


def build_core(spec: EngineSpec, sink=deliver_to_loops, model=None, tokenizer=None, device=None,
               scheduler: bool = True) -> EngineCore:
    """Load the model (dlm's own classes, never remote code) and its tokenizer, and make the core.
    In a tensor-parallel rank (dlm.parallel.init_rank done) the model is this rank's shard."""
    import torch

    from dlm.families import family_of
    from dlm.loading import load_model
    from dlm.parallel import place
    from dlm.tokenizer import check_tokenizer_for_model

    if model is None:
        dev = torch.device(device or spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = place(load_model(spec.model_dir), dev)  # --tensor-parallel: this rank's part
        if spec.compile:
            from dlm.runtime import compile_model

            model = compile_model(model)
    if tokenizer is None:
        tokenizer = load_server_tokenizer(spec.model_dir, model.config, spec.tokenizer, spec.trust_remote_code)
    check_tokenizer_for_model(tokenizer, model.config, roles=family_of(model.config).format is None)
    group = None
    if spec.tensor_parallel > 1 and scheduler:
        from .lockstep import _control_group

        group = _control_group()
    return EngineCore(model, tokenizer, max_batch=spec.max_batch, max_queue=spec.max_queue,
                      compile_limits=spec.compile_limits, compile_workers=spec.compile_workers, sink=sink,
                      lockstep_group=group, scheduler=scheduler)


def load_server_tokenizer(model_dir: str, config, tokenizer: Optional[str] = None, trust_remote_code: bool = False):
    """dlm's own models: the tokenizer beside the model (or `tokenizer`) with dlm's roles; a
    published model's: as it is (dlm.loading.load_tokenizer_for)."""
    from dlm.families import family_of
    from dlm.loading import load_tokenizer_for
    from dlm.tokenizer import load_tokenizer

    if family_of(config).format is None:
        return load_tokenizer(tokenizer or model_dir, trust_remote_code=trust_remote_code)
    return load_tokenizer_for(model_dir, config, tokenizer=tokenizer)


def _portable(value):
    """A value that crosses the pipe: an exception that does not pickle becomes a RuntimeError
    with its text (what the front end shows of it)."""
    if isinstance(value, BaseException):
        try:
            pickle.loads(pickle.dumps(value))
        except Exception:
            return RuntimeError(f"{type(value).__name__}: {value}")
    return value


def engine_main(conn, spec: EngineSpec, port: Optional[int] = None) -> None:
    """The engine process (rank 0 of a tensor-parallel engine): build the core, then serve the
    front end's messages until "close" or until the front end goes away (the pipe closes)."""
    import torch

    outbox = _Writer(conn)
    send = outbox.send
    jobs: dict[int, Job] = {}
    try:
        torch.set_num_threads(spec.threads or torch.get_num_threads())
        torch.set_grad_enabled(False)
        device = None
        if spec.tensor_parallel > 1:
            from dlm.parallel import ENV_RANK, init_rank

            os.environ.update({ENV_RANK: "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            device, _ = init_rank(spec.tensor_parallel, spec.device, spec.first_gpu)

        def sink(items) -> None:
            out = []
            for job, kind, value in items:
                if kind != "tokens":
                    jobs.pop(job.key, None)
                out.append((job.key, kind, _portable(value), job.first_token))
            send(("events", out, core.stats()))

        core = build_core(spec, sink=sink, device=device)
    except BaseException as e:  # the front end prints it and exits
        send(("failed", f"{type(e).__name__}: {e}" if not isinstance(e, DLMError) else str(e)))
        outbox.close()
        return
    send(("ready", {"pid": os.getpid()}))

    def admit(call: int, specs: list) -> None:
        new = [Job(prompt=p, config=c, seed=s, constraint=con, deadline=d, stream=st, key=k)
               for k, p, c, s, con, d, st in specs]
        for j in new:
            jobs[j.key] = j
        try:
            send(("reply", call, True, core.admit(new)))
        except BaseException as e:
            for j in new:
                jobs.pop(j.key, None)
            send(("reply", call, False, _portable(e)))

    def score(call: int, ids, k, start) -> None:
        try:
            send(("reply", call, True, core.score(ids, k, start)))
        except BaseException as e:
            send(("reply", call, False, _portable(e)))

    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the front end is gone
                break
            kind = msg[0]
            if kind == "admit":
                core.pool.submit(admit, msg[1], msg[2])
            elif kind == "score":
                core.pool.submit(score, *msg[1:])
            elif kind == "cancel":
                job = jobs.pop(msg[1], None)
                if job is not None:
                    core.cancel(job)
            elif kind == "close":
                break
    finally:
        core.close()
        outbox.close()


class _Writer:
    """The engine's messages to the front end, written by a thread of their own: the decoding
    loop hands over a step's events and goes on while they are pickled and written (in order)."""

    def __init__(self, conn):
        import queue

        self.conn, self.queue = conn, queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="dlm-engine-writer", daemon=True)
        self.thread.start()

    def send(self, msg) -> None:
        self.queue.put(msg)

    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            try:
                self.conn.send(msg)
            except (OSError, EOFError):  # the front end is gone; the main loop sees it too
                return

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self.queue.put(None)
        self.thread.join(timeout)


def follower_main(spec: EngineSpec, rank: int, port: int) -> None:
    """Ranks 1..N-1 of a tensor-parallel engine: load and shard the model, then follow rank 0
    (serving/lockstep.py)."""
    import torch

    from dlm.parallel import ENV_RANK, init_rank

    from .lockstep import Follower, _control_group

    os.environ.update({ENV_RANK: str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(spec.threads or 1)
    torch.set_grad_enabled(False)
    device, _ = init_rank(spec.tensor_parallel, spec.device, spec.first_gpu)
    core = build_core(spec, device=device, scheduler=False)  # the shard, decoder and compiler; no scheduler
    Follower(core, _control_group()).run()


class ProcessEngine:
    """The engine core in a child process, restarted when it dies."""

    mode = "process"

    def __init__(self, spec: EngineSpec, start_timeout: float = 900.0, restart: bool = True):
        import multiprocessing

        self.spec, self.start_timeout, self.restart = spec, start_timeout, restart
        if spec.threads is None:  # this process's torch threads, shared among the ranks
            import torch

            spec.threads = max(1, torch.get_num_threads() // spec.tensor_parallel)
        self._ctx = multiprocessing.get_context("spawn")
        self._keys = itertools.count(1)
        self._jobs: dict[int, Job] = {}  # in flight in the engine
        self._calls: dict[int, Future] = {}
        self._lock = threading.Lock()  # sends, and the two tables above
        self._stats = {"running": 0, "queued": 0, "steps": 0, "stepped_jobs": 0, "step_seconds": 0.0}
        self._closing = False
        self.healthy = False
        self.restarts = 0
        self.proc = self.conn = None
        self._launch()

    # ---------------------------------------------------------- the child
    def _launch(self, relaunch: bool = False) -> None:
        """Start the engine process (and, tensor-parallel, its other ranks) and wait for it to
        load; DLMError if it cannot."""
        from dlm.runtime import free_port

        tp = self.spec.tensor_parallel
        port = free_port() if tp > 1 else None
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=engine_main, args=(child, self.spec, port), name="dlm-engine", daemon=True)
        proc.start()
        child.close()
        followers = []
        if tp > 1:
            followers = [self._ctx.Process(target=follower_main, args=(self.spec, r, port), name=f"dlm-engine-{r}",
                                           daemon=True) for r in range(1, tp)]
            for f in followers:
                f.start()
        ranks = [proc, *followers]

        def stop_all():
            for p in ranks:
                if p.is_alive():
                    p.kill()

        deadline = time.monotonic() + self.start_timeout
        while not parent.poll(0.2):
            dead = [i for i, p in enumerate(ranks) if not p.is_alive()]
            if dead:
                stop_all()
                raise DLMError(f"the engine process{' (rank %d)' % dead[0] if tp > 1 else ''} exited while loading "
                               f"{self.spec.model_dir} (exit code {ranks[dead[0]].exitcode})")
            if time.monotonic() > deadline:
                stop_all()
                raise DLMError(f"the engine process did not load {self.spec.model_dir} in {self.start_timeout:.0f} s")
        try:
            msg = parent.recv()
        except EOFError:
            msg = ("failed", f"the engine process exited while loading (exit code {proc.join(5) or proc.exitcode})")
        if msg[0] == "failed":
            stop_all()
            proc.join(5)
            raise DLMError(msg[1])
        self.proc, self.conn, self.followers = proc, parent, followers
        self.pid = msg[1]["pid"]
        self.restarts += relaunch
        self.healthy = True
        threading.Thread(target=self._read, args=(parent,), name="dlm-engine-reader", daemon=True).start()
        if followers:
            threading.Thread(target=self._watch, args=(ranks,), name="dlm-engine-watch", daemon=True).start()

    def _watch(self, ranks: list) -> None:
        """Tensor-parallel: one rank gone leaves the others waiting in a collective. Stop them
        all (rank 0's pipe closes, and the engine restarts as after any death)."""
        while not self._closing and self.proc is ranks[0]:
            if any(not p.is_alive() for p in ranks):
                for p in ranks:
                    if p.is_alive():
                        p.kill()
                return
            time.sleep(0.2)

    def _read(self, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "events":
                items = []
                with self._lock:
                    for key, kind, value, first in msg[1]:
                        job = self._jobs.pop(key, None) if kind != "tokens" else self._jobs.get(key)
                        if job is not None:
                            if first is not None and job.first_token is None:
                                job.first_token = first
                            items.append((job, kind, value))
                self._stats = msg[2]
                deliver_to_loops(items)
            elif msg[0] == "reply":
                with self._lock:
                    fut = self._calls.pop(msg[1], None)
                if fut is not None:
                    fut.set_result(msg[3]) if msg[2] else fut.set_exception(msg[3])
        if conn is self.conn:
            self._died()

    def _died(self) -> None:
        """The engine process is gone: fail everything in flight, then start a new one."""
        self.healthy = False
        gone = EngineUnavailable("the engine process stopped; the request was lost, retry")
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        deliver_to_loops([(j, "error", gone) for j in jobs])
        for f in calls:
            f.set_exception(gone)
        self._stats = {**self._stats, "running": 0, "queued": 0}
        if self._closing or not self.restart:
            return
        code = self.proc.exitcode if self.proc is not None else None
        print(f"dlm serve: the engine process (pid {self.pid}) stopped (exit code {code}); restarting it",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._relaunch, name="dlm-engine-restart", daemon=True).start()

    def _relaunch(self) -> None:
        delay = 1.0
        while not self._closing:
            try:
                self._launch(relaunch=True)
                print(f"dlm serve: the engine is back (pid {self.pid})", file=sys.stderr, flush=True)
                return
            except DLMError as e:
                print(f"dlm serve: restarting the engine failed: {e}; again in {delay:.0f} s",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
                delay = min(30.0, delay * 2)

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError, BrokenPipeError):
            raise EngineUnavailable("the engine process is not running; retry shortly") from None

    def _call(self, *msg) -> Future:
        fut: Future = Future()
        with self._lock:
            if not self.healthy:
                raise EngineUnavailable("the engine is restarting; retry shortly")
            call = next(self._keys)
            self._calls[call] = fut
            try:
                self._send((msg[0], call, *msg[1:]))
            except EngineUnavailable:
                self._calls.pop(call, None)
                raise
        return fut

    # ---------------------------------------------------------- the front end's interface
    async def start(self, jobs: list[Job]) -> Optional[float]:
        specs = []
        with self._lock:
            for j in jobs:
                j.key = next(self._keys)
                self._jobs[j.key] = j
                specs.append((j.key, j.prompt, j.config, j.seed, j.constraint, j.deadline, j.stream))
        try:
            return await asyncio.wrap_future(self._call("admit", specs))
        except BaseException:
            with self._lock:
                for j in jobs:
                    self._jobs.pop(j.key, None)
            raise

    def cancel(self, job: Job) -> None:
        with self._lock:
            if self._jobs.pop(job.key, None) is None:
                return
            try:
                self._send(("cancel", job.key))
            except EngineUnavailable:
                pass

    def score(self, ids: list[int], k: int, start: int):
        return self._call("score", ids, k, start).result()

    def stats(self) -> dict:
        return dict(self._stats)

    def close(self) -> None:
        self._closing = True
        self.healthy = False
        with self._lock:
            try:
                self.conn.send(("close",))
            except Exception:
                pass
        for p in [self.proc, *getattr(self, "followers", [])]:
            if p is None:
                continue
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)

