"""Perplexity: the NELBO bound for diffusion models, exact perplexity for the AR baseline.

    dlm ppl runs/mdlm/model --data default --split validation --mc-samples 8

Both score the same tokens of the same packed sequences (every real token but the BOS at
position 0; see `dlm.noise.scored_positions`), so AR perplexity and the diffusion bound are
directly comparable. For diffusion models each sequence is scored under `mc_samples` noise draws
whose times are stratified over [eps, 1]; the estimate is unbiased for the NELBO, and
exp(NELBO / tokens) upper-bounds the true perplexity (MDLM sec. 3.4).

The Monte Carlo estimate has an error of its own, reported as `nll_se` (standard error of the
per-token NELBO over the noise draws) and a 95% interval of the perplexity. The estimator is
heavy-tailed: a token masked at a small time t weighs 1/t (log-linear schedule), so a few draws
carry much of the variance; the standard error is computed from each sequence's spread over its
own draws (stratified, so it is conservative), summed over independent sequences. Two models
whose bounds differ by less than about twice their combined error are not told apart by it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dlm.noise import effective_mask
from dlm.objectives import make_objective


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
    exact = obj.name == "ar"
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
