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
        if output_positions is not None:
            logits = logits[output_positions]
        return type("Out", (), {"logits": logits})()
