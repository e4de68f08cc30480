"""Shared helpers for tests that start `dlm` in child processes."""

import os
import subprocess
import sys

import torch


def child_env() -> dict:
    """The environment for child processes, read at call time (conftest sets the private cache)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def dlm_cli(*args, launcher=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m dlm.cli ARGS` (or 2 processes under torchrun / the deepspeed launcher)."""
    cmd = [sys.executable, "-m", "dlm.cli", *map(str, args)]
    if launcher == "torchrun2":
        from dlm.runtime import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "dlm.cli", *map(str, args)]
    elif launcher == "deepspeed2":
        from dlm.runtime import free_port

        runner = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [runner, "--num_accelerators", "2", "--master_port", str(free_port()), "--module", "dlm.cli",
               *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=cwd, timeout=timeout)


class UniformModel(torch.nn.Module):
    """Outputs equal logits everywhere: p(x0 | x_t) is uniform over the V - 1 non-mask tokens."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, x, output_positions=None, **kw):
        logits = torch.zeros(*x.shape, self.config.vocab_size)
        if output_positions is not None:  # a boolean mask, or row-major indices (the objectives')
            flat = logits[output_positions] if output_positions.dtype == torch.bool else None
            logits = flat if flat is not None else logits.reshape(-1, logits.shape[-1])[output_positions]
        return type("Out", (), {"logits": logits})()


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the calls that wait for the device on a GPU: reading tensor values on the host
    (tolist, item, bool / int / float of a tensor, nonzero, boolean-mask indexing, .cpu()) and
    host -> device copies that block (torch.tensor(..., device=...)). On this CPU nothing
    waits, but the same calls run: a step's count here is its count on CUDA."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
             "masked_select", "equal", "allclose", "is_nonzero", "unique"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.READS or (name == "tensor" and "device" in kwargs) or (
                name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor)
                and args[1].dtype == torch.bool):
            self.calls.append(name)
        return func(*args, **kwargs)
