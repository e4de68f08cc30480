"""Per-token log-probabilities of a given sequence (the server's `echo` + `logprobs`).

An autoregressive model gives them exactly: log p(x_i | x_<i).

A masked diffusion model has no left-to-right factorisation of its own; dlm scores token i by
the *left-to-right chain*: the denoiser's probability of x_i when x_<i are clean and x_i and
everything after it are masked (block models: everything after it in its block; later blocks
are invisible to it anyway). Summed over a continuation this is log p of the continuation under
the any-order autoregressive view of the model with the left-to-right order: a lower bound on
the model's log-likelihood like the ELBO, deterministic (no Monte Carlo noise), and defined per
token without knowing where the context ends. One forward per position, batched.
"""

from __future__ import annotations

from typing import Optional

import torch

from dlm.noise import effective_mask


@torch.no_grad()
def token_logprobs(model, ids: list[int], batch_size: int = 64, objective=None, start: int = 1
                   ) -> tuple[list[Optional[float]], list[int], list[Optional[float]]]:
    """For ids = [BOS, x_1, ..., x_n]: (logprob of each x_i, the top token at i, its logprob),
    each a list of n + 1 with None at position 0 (nothing scores BOS) and, for a diffusion model,
    before `start` (only positions from `start` on are computed)."""
    lp, tops = token_top_logprobs(model, ids, 1, batch_size, objective, start)
    return lp, [-1 if t is None else t[0][0] for t in tops], [None if t is None else t[0][1] for t in tops]


@torch.no_grad()
def token_top_logprobs(model, ids: list[int], k: int, batch_size: int = 64, objective=None, start: int = 1
                       ) -> tuple[list[Optional[float]], list[Optional[list[tuple[int, float]]]]]:
    """For ids = [BOS, x_1, ..., x_n]: (logprob of each x_i, the k most likely tokens at i with
    their logprobs, best first), lists of n + 1 with None where nothing is computed."""
    T = len(ids)
    lp: list[Optional[float]] = [None] * T
    tops: list[Optional[list[tuple[int, float]]]] = [None] * T
    for pos, logp in _logp_rows(model, ids, batch_size, objective, start):
        x = torch.tensor([ids[p] for p in pos], device=logp.device)
        own = logp.gather(-1, x[:, None])[:, 0].cpu().tolist()
        best = logp.topk(min(k, logp.shape[-1]), dim=-1)
        vals, idx = best.values.cpu().tolist(), best.indices.cpu().tolist()
        for j, p in enumerate(pos):
            lp[p] = own[j]
            tops[p] = list(zip(idx[j], vals[j]))
    return lp, tops


def _logp_rows(model, ids: list[int], batch_size: int, objective, start: int):
    """Yields (positions, (len, V) float64 log-probs of the token at each position): AR models
    exactly from one causal forward, diffusion models by the left-to-right chain."""
    cfg = model.config
    dev = next(model.parameters()).device
    T = len(ids)
    if T < 2:
        return
    x = torch.tensor(ids, dtype=torch.long, device=dev)
    if cfg.objective == "ar":
        logits = model(x[None], is_causal=True).logits[0, :-1].double()
        yield list(range(1, T)), logits.log_softmax(-1)
        return
    if objective is None and cfg.objective in ("bd3lm", "e2d2"):
        from dlm.objectives import make_objective

        objective = make_objective(cfg)
    for s in range(max(1, start), T, batch_size):
        pos = torch.arange(s, min(T, s + batch_size), device=dev)
        logits = _chain_logits(model, cfg, objective, x, pos).double()
        logits[:, cfg.mask_token_id] = float("-inf")
        yield pos.tolist(), logits.log_softmax(-1)


def _chain_logits(model, cfg, objective, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(len(pos), V): logits at position p of the canvas x with x_p.. masked (row per p)."""
    T, n = x.numel(), pos.numel()
    cols = torch.arange(T, device=x.device)[None, :]
    if cfg.objective in ("bd3lm", "e2d2"):
        bs = cfg.block_size
        L = -(-T // bs) * bs  # whole blocks
        x0 = torch.full((n, L), cfg.pad_token_id, dtype=torch.long, device=x.device)
        x0[:, :T] = x
        am = torch.zeros(n, L, dtype=torch.long, device=x.device)
        am[:, :T] = 1
        end = (pos // bs + 1) * bs
        c = torch.arange(L, device=x.device)[None, :]
        xt = torch.where((c >= pos[:, None]) & (c < end[:, None]), cfg.mask_token_id, x0)
        xt = torch.where(am.bool(), xt, cfg.pad_token_id)
        out = torch.zeros(n, L, dtype=torch.bool, device=x.device)
        out[torch.arange(n), pos] = True
        return objective.masked_logits(model, x0, xt, effective_mask(am), out)
    xt = torch.where(cols >= pos[:, None], cfg.mask_token_id, x[None, :].expand(n, -1))
    out = torch.zeros(n, T, dtype=torch.bool, device=x.device)
    out[torch.arange(n), pos] = True
    sigma = None
    if cfg.time_conditioning:
        from dlm.noise import LogLinearSchedule

        t = ((T - pos).double() / T).clamp(min=1e-3)
        sigma = LogLinearSchedule().sigma(t).float()
    return model(xt, output_positions=out, sigma=sigma).logits
