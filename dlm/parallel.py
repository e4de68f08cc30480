"""Tensor parallelism for inference, with PyTorch's own engine (`torch.distributed.tensor.parallel`):
every rank holds 1/N of each layer's attention heads and MLP width and of the output vocabulary,
and the N ranks run the same decoding loop in lockstep (same requests, same seeds, the same
replicated logits after each layer's all-reduce, so the same choices).

    q / k / v, gate / up     ColwiseParallel   (heads and MLP columns split; no communication)
    o, down                  RowwiseParallel   (partial sums all-reduced: one collective each)
    lm_head                  ColwiseParallel, gathered (vocabulary-parallel output, replicated logits)
    embeddings, norms, adaLN replicated

`dlm generate / bench decode / serve --tensor-parallel N` start N ranks (`launch`): NCCL on GPUs,
one device each; gloo on CPU. Each rank loads the checkpoint on the host and moves only its shard
to its device (`place`, `shard_model`).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from typing import Optional

import torch

from dlm.errors import DLMError

ENV_RANK = "DLM_TP_RANK"  # set in the ranks `launch` starts
_MESH = None  # this rank's device mesh (init_rank)


def check_shardable(config, tp: int) -> None:
    """DLMError naming the first size that does not split over `tp` ranks."""
    if tp < 1:
        raise DLMError(f"--tensor-parallel must be at least 1, got {tp}")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(config, name)
        if n % tp:
            raise DLMError(f"tensor parallelism over {tp} ranks needs {name} ({n}) divisible by {tp}")


def shard_model(model, mesh) -> torch.nn.Module:
    """Split `model` (a DLMModel, on this rank's device, the same weights on every rank) over the
    1-D device mesh `mesh` in place; returns it."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    cfg = model.config
    check_shardable(cfg, tp)
    blocks = list(model.layers) + list(model.decoder_layers or [])
    for block in blocks:
        plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
        if block.mlp.gate_proj is not None:
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        block.self_attn.n_heads //= tp  # the heads this rank computes
        block.self_attn.n_kv //= tp
    if not cfg.tie_word_embeddings and cfg.vocab_size % tp == 0:
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    model.tensor_parallel = tp
    return model


# ------------------------------------------------------------------ ranks
def rank() -> Optional[int]:
    """This process's rank when `launch` started it, else None."""
    r = os.environ.get(ENV_RANK)
    return None if r is None else int(r)


def init_rank(tp: int, device: Optional[str] = None, first_gpu: int = 0):
    """In a rank `launch` started: join the process group and return (device, mesh). On GPUs rank
    r takes cuda:(first_gpu + r)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    r = rank()
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(first_gpu + r)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=r, world_size=tp)
    dev = torch.device(f"cuda:{first_gpu + r}") if cuda else torch.device("cpu")
    global _MESH
    _MESH = init_device_mesh(dev.type, (tp,))
    return dev, _MESH


def place(model, device):
    """`model` on `device`, in eval mode; under `launch`, this rank's shard of it. Give it the model
    as loaded on the host: each split layer's weights then go to the device already split (the
    DTensor placement moves one full weight at a time to the device and keeps this rank's part),
    the replicated rest after, so a model larger than one GPU never has to fit on one."""
    if _MESH is not None and _MESH.size() > 1:
        model = shard_model(model, _MESH)
    return model.to(device).eval()


def is_main() -> bool:
    """Whether this process reports (rank 0, or not tensor-parallel)."""
    return rank() in (None, 0)


def _rank_main(r: int, tp: int, port: int, threads: int, logdir: str, fn, args, results) -> None:
    os.environ.update({ENV_RANK: str(r), "RANK": str(r), "WORLD_SIZE": str(tp), "LOCAL_RANK": str(r),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    if r:  # only rank 0 speaks; the others' stderr is kept for an error report
        devnull = open(os.devnull, "w")
        os.dup2(devnull.fileno(), 1)
        log = open(os.path.join(logdir, f"rank{r}.log"), "w")
        os.dup2(log.fileno(), 2)
    code = 0
    try:
        out = fn(*args)
        if r == 0:  # plain pickle: tensors by value (not shared memory that goes with this process)
            results.put(("ok", pickle.dumps(out)))
    except DLMError as e:  # bad input: one line (rank 0 reports it; the others log it)
        if r == 0:
            results.put(("error", pickle.dumps(e)))
        else:
            print(f"dlm: error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except BaseException as e:
        if r == 0:
            results.put(("error", pickle.dumps(DLMError(f"rank 0 failed: {type(e).__name__}: {e}"))))
        traceback.print_exc()
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


def launch(tp: int, fn, *args):
    """Run fn(*args) on `tp` ranks (spawned processes; fn and args must pickle) and return rank
    0's result (its DLMError raised here). Threads: the machine's cores shared among the ranks."""
    import multiprocessing

    from dlm.runtime import default_threads, free_port

    import tempfile

    ctx = multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    threads = default_threads(local_ranks=tp)
    logdir = tempfile.mkdtemp(prefix="dlm-tp-")
    procs = [ctx.Process(target=_rank_main, args=(r, tp, port, threads, logdir, fn, args, results), daemon=False)
             for r in range(tp)]
    for p in procs:
        p.start()
    got, failed_at = None, None
    while True:  # read while waiting (a large result must not fill the pipe), stop all if one fails
        if got is None and not results.empty():
            got = results.get()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()  # the others may be blocked in a collective: a moment, then stop them
        if failed_at is not None and (got is not None or time.monotonic() - failed_at > 3):
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
        if not any(p.is_alive() for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.join()
    if got is None and not results.empty():
        got = results.get()
    if got is not None:
        status, value = got[0], pickle.loads(got[1])
        if status == "error":
            raise value
        return value
    codes = [p.exitcode for p in procs]
    tails = []
    for r in range(1, tp):
        try:
            with open(os.path.join(logdir, f"rank{r}.log")) as f:
                lines = [x for x in f.read().strip().splitlines() if x.strip()]
            if lines:
                tails.append(f"rank {r}: {lines[-1]}")
        except OSError:
            pass
    raise DLMError(f"tensor-parallel ranks exited with codes {codes} before rank 0 reported"
                   + (f" ({'; '.join(tails)})" if tails else ""))
