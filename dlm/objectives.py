"""Training objectives behind one interface: MDLM, RADD and the autoregressive baseline.

Each objective turns (model, clean tokens, noise) into a loss. Noise is drawn separately by
`draw_noise` (see dlm/noise.py for why), so the same call gives the training loss and, with noise
over the full time range, the NELBO used for perplexity.

    obj = make_objective(model.config)
    noise = obj.draw_noise(batch_size, seq_len, generator)
    out = obj.loss(model, input_ids, attention_mask, noise)
    out.loss.backward()            # mean weighted NLL per scored token
    out.nll_sum, out.n_tokens      # for perplexity = exp(sum nll / sum tokens)

Losses (../shared/REFERENCE.md section 1):
  - MDLM (Sahoo et al. 2024, eq. 10-11): SUBS parameterisation (the [MASK] logit is -inf, clean
    positions carry over and cost nothing), continuous-time NELBO weight -alpha'/(1-alpha) = 1/t
    for the log-linear schedule, low-discrepancy t across the batch.
  - RADD (Ou et al. 2024): the same SUBS network without time input; lambda-DCE (eq. 13: mask
    with probability lambda, weight 1/lambda) or k-DCE, the any-order-AR form (eq. 15: mask exactly
    k ~ U{1..n} positions, weight n/k).
  - AR: next-token cross-entropy under a causal mask on the same backbone.
  - BD3-LM (Arriola et al. 2025): MDLM's loss inside blocks, one t per block, network run on
    cat(x_t, x0) under the block mask of dlm/blocks.py.
  - E2D2: BD3-LM's noise and loss with an encoder over x0 and a light decoder over x_t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from dlm.blocks import (
    bd3_flex_mask,
    bd3_training_mask,
    block_causal_flex_mask,
    block_causal_mask,
    check_block_size,
    e2d2_decoder_mask,
    use_flex,
)
from dlm.errors import DLMError
from dlm.noise import (
    LogLinearSchedule,
    schedule_for,
    bernoulli_mask,
    exact_k_mask,
    low_discrepancy_times,
    mask_tokens,
    padding_mask,
    scored_positions,
)
from dlm.runtime import host_to_device


@dataclass
class LossOutput:
    loss: torch.Tensor  # differentiable scalar: weighted NLL summed over scored tokens / n_tokens
    nll_sum: torch.Tensor  # detached float64 sum of weighted NLLs (nats)
    n_tokens: torch.Tensor  # number of scored tokens
    nll_rows: Optional[torch.Tensor] = None  # detached float64 (B,): each sequence's share of nll_sum


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (MDLM sec. 3.2): log p_theta(x0 | x_t) over the vocabulary.

    Zero-masking: the [MASK] class gets probability 0. Carry-over: at positions that are not
    masked in x_t the distribution is a point mass on the observed token.
    """
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    logp = logits.log_softmax(-1)
    carry = torch.full_like(logp, float("-inf")).scatter_(-1, xt[..., None], 0.0)
    return torch.where((xt != mask_id)[..., None], carry, logp)


def masked_nll(logits: torch.Tensor, targets: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """-log p(target) per row of `logits` (N, V), with the [MASK] class removed when given."""
    logits = logits.float()
    if mask_id is not None:  # (the index made on the device: a host tensor would be a blocking copy)
        logits = logits.index_fill(-1, torch.full((1,), mask_id, device=logits.device), float("-inf"))
    return F.cross_entropy(logits, targets, reduction="none")


class Objective:
    """Base class: subclasses define draw_noise and loss."""

    name = "base"
    is_causal = False

    def __init__(self, config, eps: Optional[float] = None):
        self.config = config
        self.mask_id = config.mask_token_id
        self.schedule = schedule_for(config) if eps is None else LogLinearSchedule(eps)
        if not self.is_causal and self.mask_id is None:
            raise DLMError("the model config has no mask_token_id; build it from a tokenizer with a mask token")

    def draw_noise(self, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
        return {}

    def loss(self, model, input_ids, attention_mask, noise) -> LossOutput:
        raise NotImplementedError

    @staticmethod
    def _finish(nll: torch.Tensor, plan: "_Plan") -> LossOutput:
        """nll: the weighted NLL at each of the plan's positions (row-major)."""
        total = nll.sum()
        per_row = torch.zeros(plan.batch, dtype=torch.float64, device=nll.device)
        per_row.index_add_(0, plan.rows, nll.detach().double())
        return LossOutput(
            loss=total / plan.n_tokens.clamp(min=1),
            nll_sum=total.detach().double(),
            n_tokens=plan.n_tokens.detach(),
            nll_rows=per_row,
        )


@dataclass
class _Plan:
    """What a loss decides from the batch and its noise before the network runs, computed where
    the batch lives and then moved to the network's device in non-blocking copies. The trainer
    hands the objectives host batches, so the data-dependent parts (which positions are noised
    and scored, how many, which keys are padding) are known on the host: the training step reads
    no value back from the device (no sync). A batch already on the device gives the same numbers
    (the selections then sync, as any boolean indexing does)."""

    at: torch.Tensor  # row-major indices of the scored outputs into (B * L)
    rows: torch.Tensor  # the batch row of each
    targets: torch.Tensor  # the token to predict at each
    weight: Optional[torch.Tensor]  # the loss weight of each (None: 1)
    n_tokens: torch.Tensor  # scored tokens in the batch (the loss's denominator)
    padding: Optional[torch.Tensor]  # the attention mask when some key is padding (0), else None
    batch: int

    @classmethod
    def make(cls, model, input_ids, attention_mask, where, scored, weight=None, targets_at=None) -> "_Plan":
        """where: boolean (B, L) positions whose logits are scored; targets_at: the positions of
        their targets (default `where`); weight: (B, L) or None."""
        param = next(model.parameters(), None)  # (a test's parameter-free model: the batch's device)
        dev = input_ids.device if param is None else param.device
        at = where.reshape(-1).nonzero().squeeze(1)
        tgt = (where if targets_at is None else targets_at).reshape(-1)
        put = lambda t: None if t is None else host_to_device(t, dev)  # noqa: E731
        return cls(at=put(at), rows=put(at // where.shape[1]), targets=put(input_ids.reshape(-1)[tgt]),
                   weight=put(None if weight is None else weight.reshape(-1)[at]),
                   n_tokens=put(scored.sum()), padding=put(padding_mask(attention_mask)), batch=where.shape[0])


class MDLM(Objective):
    """Masked diffusion with the continuous-time NELBO (Sahoo et al. 2024)."""

    name = "mdlm"

    def __init__(self, config, eps: Optional[float] = None, t_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__(config, eps)
        self.t_range = t_range

    def draw_noise(self, batch_size, seq_len, generator):
        lo, hi = self.t_range
        # t in [eps, 1]: below eps the weight 1/t explodes and the bound's gain is negligible.
        lo = max(lo, self.schedule.eps)
        return {
            "t": low_discrepancy_times(batch_size, generator, lo, hi),
            "u": torch.rand(batch_size, seq_len, generator=generator),
        }

    def corrupt(self, input_ids, attention_mask, noise):
        scored = scored_positions(input_ids, attention_mask)
        t = noise["t"].to(input_ids.device)
        masked = bernoulli_mask(noise["u"].to(input_ids.device), self.schedule.move_prob(t), scored)
        return mask_tokens(input_ids, masked, self.mask_id), masked, scored, t

    def loss(self, model, input_ids, attention_mask, noise):
        xt, masked, scored, t = self.corrupt(input_ids, attention_mask, noise)
        plan = _Plan.make(model, input_ids, attention_mask, masked, scored,
                          weight=self.schedule.loss_weight(t)[:, None].expand_as(masked))
        dev = plan.at.device
        sigma = host_to_device(self.schedule.sigma(t), dev) if self.config.time_conditioning else None
        logits = model(host_to_device(xt, dev), attention_mask=plan.padding, sigma=sigma, output_positions=plan.at).logits
        nll = masked_nll(logits, plan.targets, self.mask_id) * plan.weight
        return self._finish(nll, plan)


class RADD(Objective):
    """Reparameterized absorbing discrete diffusion (Ou et al. 2024): time-free network."""

    name = "radd"

    def __init__(self, config, eps: Optional[float] = None, loss_type: str = "lambda"):
        super().__init__(config, eps)
        if loss_type not in ("lambda", "k"):
            raise DLMError(f"unknown RADD loss {loss_type!r}; use 'lambda' (lambda-DCE) or 'k' (k-DCE)")
        if config.time_conditioning:
            raise DLMError("RADD's network takes no time input; build the model with time_conditioning off")
        self.loss_type = loss_type

    def draw_noise(self, batch_size, seq_len, generator):
        eps = self.schedule.eps
        return {
            # lambda (masking ratio) or the fraction that picks k: stratified across the batch.
            "r": low_discrepancy_times(batch_size, generator, eps, 1.0),
            "u": torch.rand(batch_size, seq_len, generator=generator),
        }

    def loss(self, model, input_ids, attention_mask, noise):
        scored = scored_positions(input_ids, attention_mask)
        r = noise["r"].to(input_ids.device)
        u = noise["u"].to(input_ids.device)
        if self.loss_type == "lambda":
            masked = bernoulli_mask(u, r, scored)
            weight = (1.0 / r)[:, None]
        else:
            n = scored.sum(-1)
            k = (r * n).ceil().clamp(min=1).long()  # k ~ U{1..n}, stratified through r
            k = torch.minimum(k, n.clamp(min=1))
            masked = exact_k_mask(u, k, scored)
            weight = (n.float() / k.float())[:, None]
        xt = mask_tokens(input_ids, masked, self.mask_id)
        plan = _Plan.make(model, input_ids, attention_mask, masked, scored, weight=weight.expand_as(masked))
        logits = model(host_to_device(xt, plan.at.device), attention_mask=plan.padding, output_positions=plan.at).logits
        nll = masked_nll(logits, plan.targets, self.mask_id) * plan.weight
        return self._finish(nll, plan)


class AR(Objective):
    """Autoregressive baseline: causal attention, next-token cross-entropy, exact likelihood."""

    name = "ar"
    is_causal = True

    def loss(self, model, input_ids, attention_mask, noise):
        scored = scored_positions(input_ids, attention_mask)
        # Logits at position i predict token i + 1: compute them only where the target is scored.
        predict_from = torch.zeros_like(scored)
        predict_from[:, :-1] = scored[:, 1:]
        plan = _Plan.make(model, input_ids, attention_mask, predict_from, scored, targets_at=scored)
        logits = model(host_to_device(input_ids, plan.at.device), attention_mask=plan.padding, is_causal=True,
                       output_positions=plan.at).logits
        nll = masked_nll(logits, plan.targets, None)
        return self._finish(nll, plan)


class BD3LM(MDLM):
    """Block diffusion (Arriola et al. 2025): AR over blocks of `config.block_size`, masked
    diffusion inside each, one noise level per block, trained in one pass over cat(x_t, x0).

    `t_range` is the clipped schedule of the paper's variance reduction: block times are drawn
    in [beta, omega] for training; evaluation (the reported NELBO) always uses the full range."""

    name = "bd3lm"

    def __init__(self, config, eps: Optional[float] = None, t_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__(config, eps, t_range)
        self.block = int(config.block_size)
        self.backend = getattr(config, "attention_backend", "auto")

    def draw_noise(self, batch_size, seq_len, generator):
        nb = check_block_size(seq_len, self.block)
        lo, hi = max(self.t_range[0], self.schedule.eps), self.t_range[1]
        return {
            "t": low_discrepancy_times(batch_size * nb, generator, lo, hi).view(batch_size, nb),
            "u": torch.rand(batch_size, seq_len, generator=generator),
        }

    def corrupt(self, input_ids, attention_mask, noise):
        scored = scored_positions(input_ids, attention_mask)
        t = noise["t"].to(input_ids.device)
        t_tok = t.repeat_interleave(self.block, dim=1) if t.dim() == 2 else t[:, None].expand_as(input_ids)
        masked = bernoulli_mask(noise["u"].to(input_ids.device), self.schedule.move_prob(t_tok), scored)
        return mask_tokens(input_ids, masked, self.mask_id), masked, scored, t_tok

    def masked_logits(self, model, x0, xt, attention_mask, masked):
        """Logits at `masked` (boolean (B, L), or row-major indices into (B * L): no host sync)
        of the noisy half of [xt ; x0] under the block mask, flattened. attention_mask: the
        padding mask (None: no key is padding)."""
        B, L = x0.shape
        pos = torch.arange(L, device=x0.device)
        am = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=1)
        if masked.dtype == torch.bool:
            out_pos = torch.cat([masked, torch.zeros_like(masked)], dim=1)
        else:  # the same positions in the rows of 2L
            out_pos = masked // L * (2 * L) + masked % L
        if am is None and use_flex(self.backend, x0.device):
            mask = bd3_flex_mask(L, self.block, x0.device)
        else:
            mask = bd3_training_mask(L, self.block, x0.device)
        return model(torch.cat([xt, x0], dim=1), attention_mask=am, position_ids=torch.cat([pos, pos]),
                     attn_mask=mask, output_positions=out_pos).logits

    def loss(self, model, input_ids, attention_mask, noise):
        xt, masked, scored, t_tok = self.corrupt(input_ids, attention_mask, noise)
        plan = _Plan.make(model, input_ids, attention_mask, masked, scored, weight=self.schedule.loss_weight(t_tok))
        dev = plan.at.device
        logits = self.masked_logits(model, host_to_device(input_ids, dev), host_to_device(xt, dev), plan.padding,
                                    plan.at)
        nll = masked_nll(logits, plan.targets, self.mask_id) * plan.weight
        return self._finish(nll, plan)


class E2D2(BD3LM):
    """Encoder-decoder block diffusion (Arriola et al. 2025): the encoder reads the clean tokens
    block-causally once; the light decoder denoises every block reading the encoder's states of
    the blocks before it. Same noise and NELBO as BD3-LM, without its 2L-token pass through
    every layer."""

    name = "e2d2"

    def masked_logits(self, model, x0, xt, attention_mask, masked):
        B, L = x0.shape
        dev = x0.device
        enc_mask, dec_mask = block_causal_mask(L, self.block, dev), e2d2_decoder_mask(L, self.block, dev)
        if attention_mask is not None:  # padding (the loss passes it only then: no host check)
            key_ok = attention_mask.bool()[:, None, None, :]
            eye = torch.eye(L, dtype=torch.bool, device=dev)  # pad queries must see something
            enc_mask = (enc_mask & key_ok) | eye
            dec_mask = dec_mask & torch.cat([key_ok, key_ok], dim=-1)
            dec_mask = torch.cat([dec_mask[..., :L], dec_mask[..., L:] | eye], dim=-1)
        elif use_flex(self.backend, dev):
            enc_mask = block_causal_flex_mask(L, self.block, dev)  # the decoder's (L x 2L) stays dense
        pos = torch.arange(L, device=dev)
        memory = model.encode(x0, attn_mask=enc_mask, position_ids=pos)
        return model.decode(xt, memory, pos, attn_mask=dec_mask, position_ids=pos, output_positions=masked).logits


OBJECTIVE_CLASSES = {"mdlm": MDLM, "radd": RADD, "ar": AR, "bd3lm": BD3LM, "e2d2": E2D2}


def make_objective(config, **options) -> Objective:
    """The objective of the model's family, with the options it takes (RADD: loss_type; block
    models: t_range); options another objective has no use for are left out."""
    import inspect

    from dlm.families import family_of

    cls = OBJECTIVE_CLASSES[family_of(config).objective]
    accepted = inspect.signature(cls).parameters
    return cls(config, **{k: v for k, v in options.items() if k in accepted})
