"""The run's deterministic schedule: learning rate, the data rows and the diffusion noise of every
step, and the EMA of the weights.

The data order and the noise of step s are functions of (seed, s) over the *global* batch; every
rank takes its rows. Hence `--resume` continues the exact loss curve and N processes x
micro-batch b match one process x (N b) up to float reduction order.
"""

from __future__ import annotations

import math

import torch

from dlm.training.config import TrainConfig


class EMA:
    """Exponential moving average of the weights, kept in float32 on the model's device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, sd: dict) -> None:
        for n, t in sd.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the live weights and the EMA weights (call twice to restore)."""
        for n, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n].to(p.dtype))
            self.shadow[n].copy_(tmp.float())


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def global_rows(step: int, n_rows: int, global_batch: int, seed: int) -> torch.Tensor:
    """Dataset rows of optimizer step `step`: consecutive slices of per-epoch permutations."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.extend(perm[offset : offset + global_batch - len(out)].tolist())
    return torch.tensor(out)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 1_000_003 + step)
