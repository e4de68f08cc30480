"""Process-level settings shared by every command: how many CPU threads torch uses.

torch's default (one thread per core) is a poor choice on a busy machine or with several ranks
per host: threads that spin-wait on a core another process holds make every op slower (measured
on this project's 2-core machine with one core busy: training 138 tok/s with the default, 421
with one thread). dlm's default leaves one core free and shares the rest among the local ranks;
`--threads` or OMP_NUM_THREADS override it.
"""

from __future__ import annotations

import os
from typing import Optional


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(local_ranks: int = 1) -> int:
    """OMP_NUM_THREADS when set, else (available cores / local ranks) - 1, at least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cpus() // max(1, local_ranks) - 1)


def free_port() -> int:
    """A free TCP port on loopback (process groups, local servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_threads(threads: Optional[int] = None, local_ranks: int = 1) -> int:
    """Set torch's intra-op threads (`threads`, else the default above); returns the number."""
    import torch

    n = threads if threads and threads > 0 else default_threads(local_ranks)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def compile_model(model, graphs: Optional[bool] = None):
    """`--compile`: the model's forward through torch.compile with dynamic shapes (the decoder's
    changing step lengths reuse one graph; the first calls compile, tens of seconds on a CPU;
    outputs equal eager's, tested on the decoder's tokens). With `graphs` (default: on CUDA) also
    `model.graph_forward`, compiled for CUDA graphs (mode "reduce-overhead", static shapes), which
    the exact cache's block steps call in bucketed shapes (`model.static_shapes`: a few graphs,
    captured once each, then replayed with one launch per step)."""
    import torch

    eager = model.forward
    model.forward = torch.compile(eager, dynamic=True)
    model.compiled = True
    if graphs is None:
        graphs = next(model.parameters()).device.type == "cuda"
    if graphs:
        raise_recompile_limit(256)  # one graph per bucket
        model.graph_forward = torch.compile(eager, mode="reduce-overhead", dynamic=False)
        model.static_shapes = True
    return model


def raise_recompile_limit(n: int) -> None:
    """Let torch.compile keep at least `n` graphs per function (bucketed shapes, mask variants)
    before it falls back to eager."""
    from torch._dynamo import config as cfg

    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


def to_device(values, device, dtype=None):
    """Host values (a list, nested lists) as a tensor on `device` without stalling the host: on
    CUDA through pinned memory with a non-blocking copy (a plain `torch.tensor(..., device=cuda)`
    waits for the copy, and so for every kernel queued before it)."""
    import torch

    return host_to_device(torch.tensor(values, dtype=dtype if dtype is not None else torch.long), device)


def host_to_device(t, device):
    """A tensor on `device`; a host tensor goes to CUDA through pinned memory with a non-blocking
    copy (`.to(cuda)` from pageable memory synchronises the stream: it waits for every kernel
    queued before it)."""
    import torch

    device = torch.device(device)
    if t.device == device or (device.type == t.device.type and device.index is None):
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        # a copy in pinned memory that only this transfer reads (an already pinned tensor would
        # be read as it is, and its owner might change it before the copy runs)
        staged = t.clone().pin_memory() if t.is_pinned() else t.pin_memory()
        return staged.to(device, non_blocking=True)
    return t.to(device)
