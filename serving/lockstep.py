"""The serving engine over tensor-parallel ranks (`dlm serve --tensor-parallel N`): rank 0 is the
engine process (scheduler, constraint compiler, the front end's pipe); ranks 1..N-1 hold the
other shards of the model and run the same decoder in lockstep. Every network call is
collective, so every rank must make the same calls in the same order:

* `Lockstep` wraps rank 0's decoder. Before each batched step it broadcasts one message (over a
  gloo group): the requests admitted since the last step (prompt, options, seed, constraint),
  those cancelled, the keys of the requests to step, and the state rank 0 reached after the
  previous step (each stepped request's canvas and whether it changed, the requests that
  finished). Logprob scoring is a message too; the scheduler thread runs it between steps.
* `Follower` is ranks 1..N-1 (started by serving/engine.py's `follower_main`): it applies the message (rank 0's state first, so the
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
        elif hasattr(r, "host"):
            sync[r.tp_key] = (r.host, r.changed)
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


class Follower:
    """Ranks 1..N-1: the same decoder as rank 0 (over this rank's shard), driven by its messages.
    `core` is this rank's EngineCore without a scheduler (serving/engine.py)."""

    def __init__(self, core, group):
        self.core, self.group = core, group
        core.decoder.isolate_failures = False
        self.reqs: dict = {}

    def run(self) -> None:
        while self.apply(_broadcast(None, self.group)):
            pass

    def apply(self, msg) -> bool:
        """Carry out one of rank 0's messages; False on "stop"."""
        core, reqs = self.core, self.reqs
        if msg[0] == "stop":
            return False
        if msg[0] == "score":
            from dlm.likelihood import token_top_logprobs

            token_top_logprobs(core.model, msg[1], msg[2], start=msg[3])
            return True
        import torch

        (sync, done), new, gone, keys = msg[1:]
        for key, (host, changed) in sync.items():  # rank 0's state first
            r = reqs.get(key)
            if r is not None and not r.finished:
                r.canvas.copy_(torch.tensor(host, device=r.canvas.device))
                r.host, r.changed = list(host), changed
        for key in done + list(gone):
            r = reqs.pop(key, None)
            if r is not None:
                core.decoder.cancel(r)
        for key, prompt, config, seed, cspec in new:
            compiled = core.compiler.compile(cspec) if cspec is not None and core.compiler is not None else None
            reqs[key] = core.decoder.new_request(prompt, config, seed, compiled)
        core.decoder.step([reqs[k] for k in keys if k in reqs])
        return True


_GROUP: Optional[object] = None


def _control_group():
    """A gloo group for the control messages (the model's collectives may be on NCCL)."""
    import torch.distributed as dist

    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo")
    return _GROUP
