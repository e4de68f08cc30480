"""Process-group set-up that works the same under `deepspeed`, `torchrun` and plain `python`.

Launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python`
run has none, so we fill in a one-process group on a free loopback port (otherwise DeepSpeed
goes looking for MPI). Backend: NCCL on CUDA, gloo otherwise.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from dlm.runtime import free_port, set_threads


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(threads: Optional[int] = None) -> DistInfo:
    """Join (or make) the process group; `threads`: CPU threads of this process (default:
    dlm.runtime.default_threads for the local ranks)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # Share the cores among the processes on this host instead of oversubscribing them.
    set_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    _shm_comm(enabled=not cuda and world > 1)

    import deepspeed

    if not torch.distributed.is_initialized():
        # DeepSpeed prints build and load notices on stdout, every run: keep stdout for results
        # (paths, JSON) and show them only if starting fails.
        notes = io.StringIO()
        try:
            with contextlib.redirect_stdout(notes):
                deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        except BaseException:
            sys.stderr.write(notes.getvalue())
            raise
    return DistInfo(rank, world, local_rank, device)


def _shm_comm(enabled: bool) -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce (C++, minutes, needs a compiler) when it
    starts on a CPU. One process has nothing to reduce: it is switched off. Several processes on
    one host build it once, into this environment's own folder (not the shared
    ~/.cache/torch_extensions, where two environments would rebuild it in turn)."""
    if enabled:
        if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
            os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # filled on first access; the shm op is left out
    compatible["deepspeed_shm_comm"] = False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


_CPU_GROUP = []


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank, through a CPU (gloo) group: no wait on an accelerator
    (a stop request is checked every step; the loss is only read at logging steps)."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    if not _CPU_GROUP:
        _CPU_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, group=_CPU_GROUP[0])
    return bool(t.item())


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Destroy the process group before the process exits. Left to interpreter shutdown, the
    communication backend's threads can be torn down mid-flight and a rank aborts after a
    successful run ("terminate called without an active exception"). Multi-process runs only: a
    single process keeps its group, since DeepSpeed caches it for later runs in the same process."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank0_first(fn):
    """Run `fn` on rank 0, then on the other ranks (which can then read what rank 0 cached).

    Every rank learns whether rank 0 failed, so a failure (bad data, say) ends all of them, rank
    0 with its error and the others quietly, instead of leaving some waiting for ever.
    """
    from dlm.errors import DLMError

    dist = torch.distributed
    multi = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, once every rank knows
            error = e
    failed = error is not None
    if multi:
        flag = torch.tensor([1.0 if failed else 0.0], device=_collective_device())
        dist.broadcast(flag, src=0)
        failed = bool(flag.item())
    if error is not None:
        raise error
    if rank != 0 and failed:
        # Input errors are deterministic: this rank meets the same one, which the caller may
        # handle (a missing split, say). Printing is left to rank 0.
        try:
            fn()
        except DLMError as e:
            e.quiet = True
            raise
        err = DLMError("rank 0 stopped with an error (printed by rank 0)")
        err.quiet = True
        raise err
    if rank != 0:
        result = fn()
    return result


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
