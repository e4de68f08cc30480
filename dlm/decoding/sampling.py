"""Turning logits into tokens: temperature, top-k, top-p, and Gumbel-max in float64.

Sampling in float32 lowers the effective temperature (Zheng et al. 2024, "Masked Diffusion
Models are Secretly Time-Agnostic Masked Models"): every draw here is in float64. Each request
has its own generator, so its output depends only on its own seed. The reference samplers
(dlm/sample.py) draw with the same `gumbel_argmax`.

`TokenChooser` is the decoder's hook from logits to (token, confidence); a grammar-constrained
chooser (dlm.constraints.ConstrainedChooser) wraps it.
"""

from __future__ import annotations

from typing import Optional

import torch


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from float64 uniforms."""
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Sample from softmax(logits / temperature) by Gumbel-max in float64; greedy if temperature == 0."""
    logits = logits.double()
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    return (logits / temperature + gumbel(u)).argmax(-1)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float]):
    """Temperature, top-k and top-p applied to (..., V) logits (float64); greedy keeps them."""
    logits = logits.double()
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


class TokenChooser:
    """Turns logits at masked positions into (token, confidence). Replace it to constrain output.

    choose(logits (n, V), rows (n,), positions (n,), canvas (B, L), generators) ->
        (tokens (n,), confidence (n,) = probability of the chosen token, probs (n, V))
    """

    def __init__(self, config, mask_id: int):
        self.config = config
        self.mask_id = mask_id

    def choose(self, logits, rows, positions, canvas, generators):
        scores, probs = self.scores(logits, rows, generators)
        tokens = scores.argmax(-1)
        conf = probs.gather(-1, tokens[:, None])[:, 0]
        return tokens, conf, probs

    def scores(self, logits, rows, generators):
        """(scores, probs), both (n, V) float64: the chosen token is scores.argmax (greedy: the
        filtered logits; sampling: plus Gumbel noise from each request's own generator)."""
        c = self.config
        logits = logits.double() if logits.dtype != torch.float64 else logits.clone()  # a copy either way
        logits[:, self.mask_id] = float("-inf")
        logits = filter_logits(logits, c.temperature, c.top_k, c.top_p)
        probs = logits.softmax(-1)
        if c.temperature <= 0:
            return logits, probs
        g = torch.empty_like(logits)
        for i, r in enumerate(rows.tolist()):  # per-request generators: reproducible per request
            g[i] = torch.rand(logits.shape[-1], generator=generators[r], dtype=torch.float64)
        return logits + gumbel(g), probs

    # Hooks a constrained chooser overrides (the default accepts every choice).
    def begin(self, answer_start: int, answer_len: int, canvas) -> None:
        """Called once before the first step with the answer region [start, start + len)."""

    def assign(self, rows, positions, commit, tokens, canvas):
        """Final say on the committed tokens of a step: returns (commit, tokens)."""
        return commit, tokens

    def fill(self, row: int, positions, logits, canvas):
        """Tokens for filling every listed masked position of `row` at once (early commit):
        the argmax, or None when the fill is not allowed."""
        logits = logits.double().clone()
        logits[:, self.mask_id] = float("-inf")
        return logits.argmax(-1)

    elapsed = 0.0  # seconds spent constraining
