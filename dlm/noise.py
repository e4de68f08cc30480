"""Noise schedules and the absorbing (masking) forward process shared by every objective.

Notation follows ../shared/REFERENCE.md section 1: alpha(t) is the probability that a token is
still clean at time t in [0, 1]; the forward process replaces each token by [MASK] independently
with probability 1 - alpha(t) (MDLM, Sahoo et al. 2024, eq. 2).

All randomness is drawn by the caller into explicit tensors (`t`, per-token uniforms `u`), so a
batch's noise is a pure function of the generator state. The trainer draws noise for the whole
*global* batch from a generator seeded by (seed, step) and every rank slices its rows: that is
what makes a 2-process run match a 1-process run and `--resume` continue exactly.
"""

from __future__ import annotations

from typing import Optional

import torch


class LogLinearSchedule:
    """alpha(t) = 1 - (1 - eps) t (MDLM's log-linear schedule; sigma(t) = -log alpha(t))."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1 - self.eps))

    def move_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - alpha(t)."""
        return (1 - self.eps) * t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the NELBO weight of a masked token (= 1/t here).

        MDLM eq. 10: NELBO = E_t [ alpha'(t) / (1 - alpha(t)) * sum_{i masked} log p(x0_i | x_t) ].
        """
        return -self.dalpha(t) / self.move_prob(t)

    def reveal_prob(self, t, s):
        """Probability that a token masked at time t is revealed by time s < t (MDLM eq. 7):
        (alpha(s) - alpha(t)) / (1 - alpha(t)); 1 at t = 0."""
        return (self.alpha(s) - self.alpha(t)) / (1 - self.alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise -log alpha(t), the time-conditioning input of the network."""
        return -torch.log(self.alpha(t))


def schedule_for(config) -> LogLinearSchedule:
    """The noise schedule a model was trained with (its config's `noise_schedule` and
    `noise_eps`; checkpoints from before those fields: the log-linear schedule, eps 1e-3). The one
    place a schedule is built: objectives, decoder, samplers and scorers all ask here."""
    kind = getattr(config, "noise_schedule", None) or "loglinear"
    if kind != "loglinear":
        from dlm.errors import DLMError

        raise DLMError(f"unknown noise schedule {kind!r} in the model config; dlm knows loglinear")
    eps = getattr(config, "noise_eps", None)
    return LogLinearSchedule(1e-3 if eps is None else float(eps))


def low_discrepancy_times(
    n: int, generator: Optional[torch.Generator] = None, lo: float = 0.0, hi: float = 1.0
) -> torch.Tensor:
    """Stratified times t_i = lo + (hi - lo) * ((u + i/n) mod 1), one shared u (MDLM sec. 3.5).

    Every stratum of [lo, hi] gets exactly one sample, which lowers the variance of the batch
    loss compared with i.i.d. times. The affine map (rather than clipping) avoids a point mass at
    the interval's end.
    """
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    t = (u + torch.arange(n, dtype=torch.float64) / n) % 1.0
    return (lo + (hi - lo) * t).float()


def mask_tokens(x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x_t: replace the positions selected by `masked` with the mask id."""
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def bernoulli_mask(u: torch.Tensor, move_prob: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Independent masking: position i is masked iff u_i < move_prob (and it may be masked)."""
    if move_prob.dim() == 1:
        move_prob = move_prob[:, None]
    return (u < move_prob) & maskable


def exact_k_mask(u: torch.Tensor, k: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Mask exactly k[b] maskable positions of row b, chosen uniformly (the k smallest u's)."""
    u = torch.where(maskable, u, torch.full_like(u, 2.0))  # non-maskable positions sort last
    ranks = u.argsort(dim=-1).argsort(dim=-1)
    return (ranks < k[:, None]) & maskable


def scored_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Positions that count towards the likelihood: real tokens except position 0.

    Position 0 holds BOS, which is given, never predicted. Both the AR model (which cannot predict
    its first token) and the diffusion models (which never mask it) therefore score the same L - 1
    tokens, so their perplexities are comparable on the same tokenization. attention_mask 2 marks
    given context (a prompt under --pack sft): attended, never noised or scored.
    """
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask == 1
    valid[:, 0] = False
    return valid


def effective_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None when every position is an ordinary token (all 1: no padding, no given prompt), else
    the mask itself. Not `attention_mask.all()`: a given prompt (2, --pack sft) is truthy too, and
    dropping the mask would noise and score the prompt."""
    if attention_mask is None or bool((attention_mask == 1).all()):
        return None
    return attention_mask


def padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask when some key is padding (0), else None: what the network needs to hide (a given
    prompt, 2, is attended like any token). Read where the mask lives: free on the host."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask
