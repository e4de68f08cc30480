"""Likelihoods, in one place: what `dlm ppl`, the server's echo / chat logprobs and lm-eval score.

* `perplexity`: over a dataset, the NELBO bound for diffusion models (Monte Carlo over noise
  draws with stratified times; unbiased for the NELBO, and exp(NELBO / tokens) upper-bounds the
  true perplexity, MDLM sec. 3.4) with its standard error, exact for AR models. Both score the
  same tokens: every real token but the BOS at position 0.
* `continuation_elbo`: log p(continuation | context) bounded below by a Monte Carlo ELBO (what
  lm-eval's loglikelihood uses): per sample k ~ U{1..n} continuation tokens are masked (k
  stratified across the samples) and their NLL weighted by n / k (LLaDA's estimator; the any-order
  AR form of RADD's k-DCE, the same expectation as MDLM's bound). Block models: each block's
  continuation tokens get their own k_b, conditioned on the clean earlier blocks.
* `token_logprobs` / `token_top_logprobs`: per token, the *left-to-right chain* for a diffusion
  model (the denoiser's probability of x_i with x_<i clean and x_i.. masked; block models: to the
  end of its block), deterministic and defined without knowing where a context ends; exact
  log p(x_i | x_<i) for AR models. Summed over a continuation it is a lower bound like the ELBO.
* `ar_continuation`: AR models, exact log p(continuation | context) and the greedy check.

The MC estimate's error: the estimator is heavy-tailed (a token masked at a small time t weighs
1/t), so `perplexity` computes the standard error from each sequence's spread over its own draws
(stratified, so conservative), summed over independent sequences.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dlm.families import family_of
from dlm.noise import effective_mask, padding_mask, schedule_for
from dlm.objectives import make_objective


# ------------------------------------------------------------------ perplexity of a dataset
@torch.no_grad()
def perplexity(
    model,
    dataset,
    batch_size: int = 16,
    mc_samples: int = 8,
    seed: int = 0,
    max_batches: Optional[int] = None,
    objective=None,
    progress: bool = False,
) -> dict:
    """Score `dataset` (rows with input_ids / attention_mask, torch format) with `model`.

    Returns {"nll": nats per token, "ppl": exp(nll), "tokens": count, "bound": bool,
    "mc_samples": K, "nll_se": standard error of nll over the noise draws (0 for AR; None with
    one draw), "ppl_low" / "ppl_high": the 95% interval exp(nll -/+ 1.96 nll_se)}. For AR models
    mc_samples is ignored (the likelihood is exact).
    """
    model.eval()
    obj = objective or make_objective(model.config)
    exact = family_of(model.config).autoregressive
    K = 1 if exact else mc_samples
    device = next(model.parameters()).device
    n_batches = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    gen = torch.Generator().manual_seed(seed)
    nll_sum, n_tok = 0.0, 0
    var_sum = 0.0  # sum over sequences of (sample variance over draws) / K
    batches = range(n_batches)
    if progress:
        from rich.progress import track

        batches = track(batches, description="scoring", transient=True)
    for b in batches:
        rows = dataset[b * batch_size : (b + 1) * batch_size]
        ids = rows["input_ids"].to(device)
        am = rows["attention_mask"].to(device)
        am = effective_mask(am)
        B, L = ids.shape
        # One draw over B * K rows: the K samples of a sequence get times K strata apart.
        noise = obj.draw_noise(B * K, L, gen)
        draws = []
        for k in range(K):
            sl = {key: v[k * B : (k + 1) * B] for key, v in noise.items()}
            out = obj.loss(model, ids, am, sl)
            nll_sum += out.nll_sum.item() / K
            draws.append(out.nll_rows)
        if K > 1:
            var_sum += float(torch.stack(draws).var(dim=0, unbiased=True).sum()) / K
        n_tok += int(out.n_tokens)
    nll = nll_sum / max(n_tok, 1)
    se = 0.0 if exact else (math.sqrt(var_sum) / max(n_tok, 1) if K > 1 else None)
    low, high = (math.exp(min(nll - 1.96 * se, 700.0)), math.exp(min(nll + 1.96 * se, 700.0))) if se is not None \
        else (None, None)
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": n_tok, "bound": not exact, "mc_samples": K,
            "nll_se": se, "ppl_low": low, "ppl_high": high}


# ------------------------------------------------------------------ a continuation's likelihood
def layout(model, ctx: list[int], cont: list[int]):
    """(canvas (1, T) padded to whole blocks for block models, its attention mask, the
    continuation's positions)."""
    cfg = model.config
    dev = next(model.parameters()).device
    ids = ctx + cont
    T = len(ids)
    if family_of(cfg).block_causal:
        T = -(-T // cfg.block_size) * cfg.block_size
    x = torch.full((1, T), cfg.pad_token_id, dtype=torch.long, device=dev)
    x[0, : len(ids)] = torch.tensor(ids, device=dev)
    am = torch.zeros_like(x)
    am[0, : len(ids)] = 1
    cpos = torch.arange(len(ctx), len(ids), device=dev)
    return x, am, cpos


def denoiser_logits(model, objective, x0, xt, am, out_pos):
    """Logits at out_pos (N, V) of the denoiser given clean x0 and noisy xt (block models read
    x0 for the clean earlier blocks)."""
    a = padding_mask(am)
    a = None if a is None else a.expand_as(x0)
    if family_of(model.config).block_causal:
        return objective.masked_logits(model, x0, xt, a, out_pos)
    return model(xt, attention_mask=a, output_positions=out_pos).logits


@torch.no_grad()
def continuation_elbo(model, ctx: list[int], cont: list[int], samples: int, generator: torch.Generator,
                      batch_size: int = 8, objective=None) -> float:
    """Monte Carlo estimate of the ELBO, a lower bound on log p(cont | ctx); ctx starts with BOS."""
    cfg = model.config
    objective = objective if objective is not None else make_objective(cfg)
    x0, am, cpos = layout(model, ctx, cont)
    mask_id = cfg.mask_token_id
    # groups of continuation positions that share one k: the whole continuation, or per block
    if family_of(cfg).block_causal:
        blk = cpos // cfg.block_size
        groups = [cpos[blk == b] for b in blk.unique()]
    else:
        groups = [cpos]
    K, total = samples, 0.0
    for start in range(0, K, batch_size):
        kk = min(batch_size, K - start)
        xt = x0.repeat(kk, 1)
        weight = torch.zeros(xt.shape, dtype=torch.float64, device=x0.device)
        for g in groups:
            n = g.numel()
            # stratified k across all K samples: sample s gets k from stratum s of [0, 1)
            u = (torch.rand(1, generator=generator).item() + torch.arange(start, start + kk) / K) % 1.0
            ks = (u * n).floor().long() + 1
            for r in range(kk):
                order = torch.randperm(n, generator=generator)[: ks[r]].to(x0.device)
                xt[r, g[order]] = mask_id
                weight[r, g[order]] = n / ks[r].item()
        masked = xt == mask_id
        logits = denoiser_logits(model, objective, x0.expand_as(xt), xt, am, masked).double()
        logits[:, mask_id] = float("-inf")
        logp = logits.log_softmax(-1).gather(-1, x0.expand_as(xt)[masked][:, None])[:, 0]
        total += (logp * weight[masked]).sum().item()
    return total / K


@torch.no_grad()
def greedy_continuation(model, ctx: list[int], cont: list[int], objective=None) -> bool:
    """Is every continuation token the argmax when all of them are masked together?"""
    cfg = model.config
    objective = objective if objective is not None else make_objective(cfg)
    x0, am, cpos = layout(model, ctx, cont)
    xt = x0.clone()
    xt[0, cpos] = cfg.mask_token_id
    masked = xt == cfg.mask_token_id
    logits = denoiser_logits(model, objective, x0, xt, am, masked)
    logits[:, cfg.mask_token_id] = float("-inf")
    return bool((logits.argmax(-1) == x0[masked]).all())


@torch.no_grad()
def ar_continuation(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """AR models: exact log p(cont | ctx), and whether every token is the argmax."""
    dev = next(model.parameters()).device
    ids = torch.tensor([ctx + cont], device=dev)
    logits = model(ids, is_causal=True).logits[0, len(ctx) - 1 : -1].float()
    logp = logits.log_softmax(-1)
    target = torch.tensor(cont, device=dev)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())


def chain_continuation(model, ctx: list[int], cont: list[int], objective=None) -> tuple[float, bool]:
    """The left-to-right chain score of a continuation and its greedy check (deterministic; what
    the server's echo logprobs sum to)."""
    n = len(ctx)
    lp, top, _ = token_logprobs(model, ctx + cont, objective=objective, start=n)
    return float(sum(lp[n:])), all(top[i] == t for i, t in enumerate(cont, start=n))


# ------------------------------------------------------------------ per token: the chain
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
    fam = family_of(cfg)
    if fam.autoregressive:
        logits = model(x[None], is_causal=True).logits[0, :-1].double()
        yield list(range(1, T)), logits.log_softmax(-1)
        return
    if objective is None and fam.block_causal:
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
    if family_of(cfg).block_causal:
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
        t = ((T - pos).double() / T).clamp(min=1e-3)
        sigma = schedule_for(cfg).sigma(t).float()
    return model(xt, output_positions=out, sigma=sigma).logits
