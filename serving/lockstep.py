"""The serving engine over tensor-parallel ranks (`dlm serve --tensor-parallel N`): rank 0 is the
engine process (scheduler, constraint compiler, the front end's pipe); ranks 1..N-1 hold the
other shards of the model and run the same decoder in lockstep. Every network call is
collective, so every rank must make the same calls in the same order:

* `Lockstep` wraps rank 0's decoder. Before each batched step it broadcasts one message (over a
  gloo group): the requests admitted since the last step (prompt, options, seed, constraint),
  those cancelled, the keys of the requests to step, and the state rank 0 reached after the
  previous step (each stepped request's canvas and whether it changed, the requests that
  finished). Logprob scoring is a message too; the scheduler thread runs it between steps.
* `follower_main` is ranks 1..N-1: it applies the message (rank 0's state first, so the
  forward inputs are rank 0's even if a follower's own choice differed, e.g. a constraint
  routed to another engine under a time budget), then steps the same requests.
"""

from __future__ import annotations

import itertools
import threading
from typing import Optional


def _broadcast(msg, group) -> object:
    import torch.distributed as dist

    box = [msg]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _state(reqs) -> tuple[dict, list]:
    """What followers copy from rank 0 after a step: canvas and changed flag per request, and
    the keys of finished requests."""
    sync, done = {}, []
    for r in reqs:
        if r.finished:
            done.append(r.tp_key)
        elif hasattr(r, "canvas"):
            sync[r.tp_key] = (r.canvas.cpu(), r.changed)
    return sync, done


class Lockstep:
    """Rank 0's decoder, announcing every step to the other ranks (the Decoder interface the
    scheduler uses: new_request, step, cancel, cfg)."""

    def __init__(self, decoder, group):
        self.decoder, self.group = decoder, group
        decoder.isolate_failures = False  # a retry alone would be a call the other ranks do not make
        self.cfg = decoder.cfg
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._new: list = []
        self._gone: list = []
        self._sync: tuple = ({}, [])

    def new_request(self, prompt, config, seed=None, constraint=None, spec=None):
        req = self.decoder.new_request(prompt, config, seed, constraint)
        req.tp_key = next(self._keys)
        with self._lock:
            self._new.append((req.tp_key, [int(t) for t in prompt], config, seed, spec))
        return req

    def cancel(self, req) -> None:
        self.decoder.cancel(req)
        with self._lock:
            self._gone.append(req.tp_key)

    def step(self, reqs):
        with self._lock:
            new, gone, self._new, self._gone = self._new, self._gone, [], []
        _broadcast(("step", self._sync, new, gone, [r.tp_key for r in reqs]), self.group)
        out = self.decoder.step(reqs)
        self._sync = _state(reqs)
        return out

    def score(self, ids, k, start):
        """Token logprobs (dlm.likelihood.token_top_logprobs) on every rank: call it in the
        thread that steps (the scheduler's), between steps."""
        from dlm.likelihood import token_top_logprobs

        _broadcast(("score", list(ids), k, start), self.group)
        return token_top_logprobs(self.decoder.model, ids, k, start=start)

    def stop(self) -> None:
        _broadcast(("stop",), self.group)


def follower_main(spec, rank: int, port: int) -> None:
    """Ranks 1..N-1 of a tensor-parallel engine: load and shard the model, then follow rank 0."""
    import os

    import torch

    from dlm.parallel import ENV_RANK, init_rank

    os.environ.update({ENV_RANK: str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(spec.threads or 1)
    torch.set_grad_enabled(False)
    from .engine import build_core

    _, _ = init_rank(spec.tensor_parallel, spec.device, spec.first_gpu)
    core = build_core(spec, scheduler=False)  # the sharded model, decoder and compiler; no scheduler
    core.decoder.isolate_failures = False
    group = _control_group()
    reqs: dict = {}
    while True:
        msg = _broadcast(None, group)
        if msg[0] == "stop":
            break
        if msg[0] == "score":
            from dlm.likelihood import token_top_logprobs

            token_top_logprobs(core.model, msg[1], msg[2], start=msg[3])
            continue
        (sync, done), new, gone, keys = msg[1:]
        for key, (canvas, changed) in sync.items():
            r = reqs.get(key)
            if r is not None and not r.finished:
                r.canvas.copy_(canvas.to(r.canvas.device))
                r.changed = changed
        for key in done + list(gone):
            r = reqs.pop(key, None)
            if r is not None:
                core.decoder.cancel(r)
        for key, prompt, config, seed, cspec in new:
            compiled = core.compiler.compile(cspec) if cspec is not None and core.compiler is not None else None
            reqs[key] = core.decoder.new_request(prompt, config, seed, compiled)
        core.decoder.step([reqs[k] for k in keys if k in reqs])


_GROUP: Optional[object] = None


def _control_group():
    """A gloo group for the control messages (the model's collectives may be on NCCL)."""
    import torch.distributed as dist

    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo")
    return _GROUP
