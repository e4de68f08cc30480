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
    cfg = model.config
    dev = next(model.parameters()).device
    T = len(ids)
    x = torch.tensor(ids, dtype=torch.long, device=dev)
    lp = torch.empty(T - 1, dtype=torch.float64)
    top = torch.empty(T - 1, dtype=torch.long)
    top_lp = torch.empty(T - 1, dtype=torch.float64)
    if T > 1:
        if cfg.objective == "ar":
            logits = model(x[None], is_causal=True).logits[0, :-1].double()
            logp = logits.log_softmax(-1)
            lp = logp.gather(-1, x[1:, None])[:, 0].cpu()
            best = logp.max(-1)
            top, top_lp = best.indices.cpu(), best.values.cpu()
        else:
            if objective is None and cfg.objective in ("bd3lm", "e2d2"):
                from dlm.objectives import make_objective

                objective = make_objective(cfg)
            lp.fill_(float("nan"))
            top_lp.fill_(float("nan"))
            top.fill_(-1)
            for s in range(max(1, start), T, batch_size):
                pos = torch.arange(s, min(T, s + batch_size), device=dev)
                logits = _chain_logits(model, cfg, objective, x, pos).double()
                logits[:, cfg.mask_token_id] = float("-inf")
                logp = logits.log_softmax(-1)
                i = pos - 1
                lp[i.cpu()] = logp.gather(-1, x[pos][:, None])[:, 0].cpu()
                best = logp.max(-1)
                top[i.cpu()], top_lp[i.cpu()] = best.indices.cpu(), best.values.cpu()
    def listed(t):
        return [None, *(None if v != v else v for v in t.tolist())]  # NaN (not computed) -> None

    return listed(lp), [-1, *top.tolist()], listed(top_lp)


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
