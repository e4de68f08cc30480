"""Reference samplers used by `dlm sample`: MDLM ancestral sampling, block-by-block sampling for
BD3-LM / E2D2, and AR sampling.

These are the plain, paper-faithful samplers (one network call per step for diffusion, one per
token for AR) that later fast decoders are compared against.

    dlm sample runs/mdlm/model --prompt "The" --length 64 --steps 64 -n 4

MDLM ancestral step from t to s < t (Sahoo et al. 2024, eq. 7): a masked token stays masked with
probability (1 - alpha_s) / (1 - alpha_t), otherwise it becomes a draw from p_theta(x0 | x_t);
clean tokens never change (carry-over). Draws use Gumbel-max in float64: float32 Gumbel noise
lowers the effective temperature (Zheng et al. 2024). For a network without time input (RADD,
or MDLM trained without time conditioning) the logits are reused whenever no token changed since
the last call, which saves network calls at no cost in exactness (RADD sec. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dlm.decoding.sampling import gumbel_argmax
from dlm.families import family_of
from dlm.model import KVCache
from dlm.noise import schedule_for
from dlm.objectives import subs_log_probs


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (n, total length): BOS + prompt + generated
    nfe: int  # network function evaluations


def prepare_canvas(prompt_ids: list[int], n: int, length: int, bos_id: int, fill_id: int, device) -> torch.Tensor:
    prefix = torch.tensor([bos_id, *prompt_ids], dtype=torch.long, device=device)
    canvas = torch.full((n, len(prefix) + length), fill_id, dtype=torch.long, device=device)
    canvas[:, : len(prefix)] = prefix
    return canvas


@torch.no_grad()
def sample_mdlm(
    model,
    prompt_ids: list[int],
    n: int = 1,
    length: int = 64,
    steps: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> SampleOutput:
    cfg = model.config
    device = next(model.parameters()).device
    sched = schedule_for(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = prepare_canvas(prompt_ids, n, length, cfg.bos_token_id, cfg.mask_token_id, device)
    reuse = not cfg.time_conditioning
    logp, nfe = None, 0
    for i in range(steps, 0, -1):
        t = torch.full((n,), i / steps, device=device)
        s = torch.full((n,), (i - 1) / steps, device=device)
        if logp is None or not reuse:
            sigma = sched.sigma(t) if cfg.time_conditioning else None
            logits = model(x, sigma=sigma).logits
            logp = subs_log_probs(logits, x, cfg.mask_token_id)
            nfe += 1
        masked = x == cfg.mask_token_id
        draw = gumbel_argmax(logp, temperature, gen)
        p_unmask = sched.reveal_prob(t, s)
        u = torch.rand(x.shape, generator=gen, dtype=torch.float64).to(device)
        commit = masked & (u < p_unmask[:, None].double())
        if commit.any():
            x = torch.where(commit, draw, x)
            logp = None  # tokens changed: the network must look again
    return SampleOutput(x, nfe)


@torch.no_grad()
def sample_ar(
    model, prompt_ids: list[int], n: int = 1, length: int = 64, temperature: float = 1.0, seed: int = 0
) -> SampleOutput:
    cfg = model.config
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = prepare_canvas(prompt_ids, n, 0, cfg.bos_token_id, cfg.pad_token_id, device)
    cache = KVCache(cfg.num_hidden_layers)
    logits = model(x, is_causal=True, cache=cache).logits[:, -1]
    out = [x]
    for i in range(length):
        nxt = gumbel_argmax(logits, temperature, gen)[:, None]
        out.append(nxt)
        if i + 1 < length:
            logits = model(nxt, is_causal=True, cache=cache).logits[:, -1]
    return SampleOutput(torch.cat(out, dim=1), length)


@torch.no_grad()
def sample_blocks(
    model,
    prompt_ids: list[int],
    n: int = 1,
    length: int = 64,
    steps: Optional[int] = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> SampleOutput:
    """BD3-LM / E2D2: blocks left to right, MDLM ancestral steps inside each block, conditioned
    on the finished blocks (exact: that is the model's factorisation). `steps` is the total
    budget, spread evenly over the generated blocks. This reference sampler recomputes the
    prefix at every step; the decoder (dlm.decoding) caches it."""
    from dlm.objectives import make_objective

    cfg = model.config
    device = next(model.parameters()).device
    obj = make_objective(cfg)
    sched = schedule_for(cfg)
    gen = torch.Generator().manual_seed(seed)
    B = cfg.block_size
    start = 1 + len(prompt_ids)
    total = -(-(start + length) // B) * B  # whole blocks; the overhang is cut off at the end
    x = prepare_canvas(prompt_ids, n, total - start, cfg.bos_token_id, cfg.mask_token_id, device)
    first, last = start // B, total // B
    per_block = max(1, (steps or length) // max(1, last - first))
    nfe = 0
    for blk in range(first, last):
        in_block = torch.zeros_like(x, dtype=torch.bool)
        in_block[:, blk * B : (blk + 1) * B] = True
        logp = None
        for i in range(per_block, 0, -1):
            t = torch.tensor(i / per_block, device=device)
            s_ = torch.tensor((i - 1) / per_block, device=device)
            if logp is None:
                logits = obj.masked_logits(model, x, x, None, in_block).view(n, B, -1)
                logp = subs_log_probs(logits, x[:, blk * B : (blk + 1) * B], cfg.mask_token_id)
                nfe += 1
            xb = x[:, blk * B : (blk + 1) * B]
            masked = xb == cfg.mask_token_id
            draw = gumbel_argmax(logp, temperature, gen)
            p_unmask = sched.reveal_prob(t, s_)
            u = torch.rand(xb.shape, generator=gen, dtype=torch.float64).to(device)
            commit = masked & (u < p_unmask.double())
            if commit.any():
                x[:, blk * B : (blk + 1) * B] = torch.where(commit, draw, xb)
                logp = None  # the network takes no time input: reuse logits until a token changes
    return SampleOutput(x[:, : start + length], nfe)


def sample(model, prompt_ids: list[int], n=1, length=64, steps: Optional[int] = None, temperature=1.0, seed=0):
    """Dispatch on the model's family: AR samples left to right, diffusion models denoise,
    block-causal models denoise block by block."""
    fam = family_of(model.config)
    if fam.autoregressive:
        return sample_ar(model, prompt_ids, n, length, temperature, seed)
    if fam.block_causal:
        return sample_blocks(model, prompt_ids, n, length, steps, temperature, seed)
    return sample_mdlm(model, prompt_ids, n, length, steps or length, temperature, seed)


def strip_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
