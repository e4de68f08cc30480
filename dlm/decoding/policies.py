"""Unmask policies: which masked positions of the current block a decoding step commits.

A policy sees one request's step (`StepView`: the chooser's confidences and probabilities at
the block's masked positions, the raw logits, the request's generator, its step budget) and
returns a `Decision`. Adding a rule is one class here (and its test): subclass `UnmaskPolicy`,
give it a `name`, register it in POLICIES.

* fixed-k (`confidence`, `margin`, `entropy`, `random`): ceil(masked / steps left) positions per
  step, ranked by a score; one per step by default (LLaDA's low-confidence remasking).
* `threshold`: every position whose chosen token has probability >= tau, at least the best one
  (Fast-dLLM); owns a batched path for the common serving case (greedy, plain chooser).
* `factor`: the largest n with (n + 1)(1 - c_(n)) < f (Fast-dLLM).
* `ancestral`: MDLM's ancestral step, each mask revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t).
* `first_hitting` (Zheng et al. 2024): one uniformly random mask per step, revealed at its
  sampled hitting time tau = t u^(1/n), which a time-conditioned network is called at.
* `EarlyCommit` wraps any of them: Prophet's rule (Li et al. 2025), the mean top-1 / top-2 logit
  gap against thresholds that fall as decoding progresses; when it passes, the rest of the block
  (or of the answer) takes its argmax at once.

Torch is imported inside the methods: the command line lists the names (POLICIES) without
loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class StepView:
    """One request's step, as a policy sees it (n = masked positions of the current block)."""

    conf: Any  # (n,) probability of each position's chosen token
    probs: Any  # (n, V) the chooser's probabilities
    logits: Any  # (n, V) raw logits at those positions
    generator: Any  # the request's torch.Generator
    steps_left: int  # fixed-k: steps left in this block (>= 1)
    t: float  # the block's time now (1 = fully masked) ...
    s: float  # ... and after this step
    schedule: Any  # dlm.noise schedule (ancestral)
    progress: float  # early commit: steps taken / the request's step budget
    try_fill: Callable[[], bool] = lambda: False  # fill every open position of the answer at once


@dataclass
class Decision:
    commit: Any  # (n,) bool: positions committed now
    tokens: Any = None  # (n,) replaces the chooser's tokens (early commit: the argmax)


class UnmaskPolicy:
    name = ""

    def decide(self, view: StepView) -> Decision:
        return Decision(self.select(view))

    def select(self, view: StepView):
        raise NotImplementedError

    # hooks (default: nothing)
    def before_forward(self, request, decoder) -> None:
        """Called before the request's network call of a step."""

    def noise_time(self, request) -> Optional[float]:
        """The time a time-conditioned network is called at (None: the masked fraction)."""
        return None

    # an optional batched path for many requests at once (see Threshold)
    @classmethod
    def batchable(cls, request) -> bool:
        return False


def select_fixed(scores, k: int):
    """Boolean (n,): the k highest scores (ties: lowest index first)."""
    import torch

    k = min(k, scores.numel())
    sel = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
        sel[order[:k]] = True
    return sel


def select_threshold(conf, tau: float):
    sel = conf >= tau
    if not sel.any():
        sel[int(conf.argmax())] = True
    return sel


def select_factor(conf, f: float):
    """Fast-dLLM factor rule: sort c_(1) >= c_(2) >= ...; take the largest n with (n + 1)(1 - c_(n)) < f."""
    import torch

    order = conf.argsort(descending=True)
    c = conf[order]
    n = 0
    for i in range(1, c.numel() + 1):
        if (i + 1) * (1 - float(c[i - 1])) < f:
            n = i
    n = max(n, 1)
    sel = torch.zeros_like(conf, dtype=torch.bool)
    sel[order[:n]] = True
    return sel


class FixedK(UnmaskPolicy):
    """ceil(n / steps left) positions per step, the highest `score`s."""

    def score(self, view: StepView):
        raise NotImplementedError

    def select(self, view: StepView):
        k = math.ceil(view.conf.numel() / view.steps_left)
        return select_fixed(self.score(view).cpu(), k).to(view.conf.device)


class Confidence(FixedK):
    name = "confidence"

    def score(self, view):
        return view.conf


class Margin(FixedK):
    name = "margin"

    def score(self, view):
        top2 = view.probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


class Entropy(FixedK):
    name = "entropy"

    def score(self, view):
        return (view.probs * view.probs.clamp_min(1e-300).log()).sum(-1)  # -entropy: confident first


class Random(FixedK):
    name = "random"

    def score(self, view):
        import torch

        return torch.rand(view.conf.numel(), generator=view.generator, dtype=torch.float64)


class Threshold(UnmaskPolicy):
    name = "threshold"

    def __init__(self, tau: float = 0.9):
        self.tau = tau

    def select(self, view):
        return select_threshold(view.conf, self.tau)

    @classmethod
    def batchable(cls, r) -> bool:
        """The common serving case: the plain chooser, greedy, no top-k / top-p, no early commit."""
        from dlm.decoding.sampling import TokenChooser

        c = r.config
        return (type(r.policy) is cls and type(r.chooser) is TokenChooser and c.temperature <= 0
                and c.top_k is None and (c.top_p is None or c.top_p >= 1.0))

    @staticmethod
    def commit_batched(reqs, mask_id: int) -> None:
        """Many batchable requests' commits at once: the same float64 softmax, argmax and
        threshold decisions (ties included) as one request at a time, in a few tensor ops and
        no host sync (the decoder reads what changed from its one copy per step). Only the
        blocks' masked columns are scored (the host copy of the canvas says which)."""
        import torch

        from dlm.runtime import to_device

        spans = [r.block for r in reqs]
        R, W = len(reqs), max(hi - lo for lo, hi in spans)
        flat, rows, cols, offset = [], [], [], 0
        for i, (r, (lo, hi)) in enumerate(zip(reqs, spans)):
            for j in r.masked_columns(lo, hi - lo, mask_id):
                flat.append(offset + j)
                rows.append(i)
                cols.append(j)
            offset += hi - lo
        dev = reqs[0].canvas.device
        meta = to_device([flat, rows, cols], dev)
        logits = torch.cat([r.logits[: hi - lo] for r, (lo, hi) in zip(reqs, spans)]).index_select(0, meta[0]).double()
        logits[:, mask_id] = float("-inf")
        tok = logits.argmax(-1)
        at = (meta[1], meta[2])
        conf = torch.full((R, W), -1.0, dtype=torch.float64, device=dev).index_put_(
            at, logits.softmax(-1).gather(-1, tok[:, None])[:, 0])
        tokens = torch.zeros((R, W), dtype=tok.dtype, device=dev).index_put_(at, tok)
        open_ = torch.zeros((R, W), dtype=torch.bool, device=dev).index_put_(at, torch.ones_like(tok, dtype=torch.bool))
        tau = to_device([r.policy.tau for r in reqs], dev, conf.dtype)
        sel = conf >= tau[:, None]
        sel |= ~sel.any(1, keepdim=True) & (torch.arange(W, device=dev)[None] == conf.argmax(1, keepdim=True))  # at least the best
        sel &= open_
        region = torch.nn.utils.rnn.pad_sequence([r.canvas[lo:hi] for r, (lo, hi) in zip(reqs, spans)],
                                                 batch_first=True, padding_value=-1)  # (R, W)
        new = torch.where(sel, tokens.to(region.dtype), region)
        for r, (lo, hi), row in zip(reqs, spans, new):
            r.canvas[lo:hi] = row[: hi - lo]
            r.step_i += 1
            r.s_in_block += 1


class Factor(UnmaskPolicy):
    name = "factor"

    def __init__(self, f: float = 1.0):
        self.f = f

    def select(self, view):
        return select_factor(view.conf, self.f)


class Ancestral(UnmaskPolicy):
    name = "ancestral"

    def select(self, view):
        import torch

        tt, ss = torch.tensor(view.t, dtype=torch.float64), torch.tensor(view.s, dtype=torch.float64)
        p = float(view.schedule.reveal_prob(tt, ss)) if view.t > 0 else 1.0
        draw = torch.rand(view.conf.numel(), generator=view.generator, dtype=torch.float64)
        return (draw < p).to(view.conf.device)


class FirstHitting(UnmaskPolicy):
    """One uniformly random mask per step at its sampled hitting time. With n masks left at
    time t, the first of them is revealed at tau = t * u^(1/n), u ~ U(0, 1) (the masking
    probability of the log-linear schedule is linear in t). The time runs over the answer
    (MDLM, RADD) or restarts at 1 with every block (block-causal models)."""

    name = "first_hitting"

    def __init__(self):
        self.t, self.block = 1.0, -1

    def before_forward(self, r, decoder) -> None:
        import torch

        mask_id = decoder.cfg.mask_token_id
        if decoder.family.block_causal:
            lo, hi = r.block
            if self.block != r.bi:  # a new block starts fully masked at t = 1
                self.t, self.block = 1.0, r.bi
        else:
            lo, hi = r.P, r.P + r.N
        n = int((r.canvas[lo:hi] == mask_id).sum())
        u = float(torch.rand((), generator=r.gen, dtype=torch.float64))
        self.t *= u ** (1.0 / max(1, n))

    def noise_time(self, r) -> Optional[float]:
        return self.t

    def select(self, view):
        import torch

        sel = torch.zeros(view.conf.numel(), dtype=torch.bool)
        sel[int(torch.randint(view.conf.numel(), (), generator=view.generator))] = True
        return sel.to(view.conf.device)


def prophet_gap(logits) -> float:
    """Mean top-1 minus top-2 logit over the rows of (n, V)."""
    top2 = logits.double().topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).mean())


def prophet_threshold(progress: float, gaps=(7.5, 5.0, 2.5)) -> float:
    return gaps[0] if progress < 1 / 3 else gaps[1] if progress < 2 / 3 else gaps[2]


class EarlyCommit(UnmaskPolicy):
    """Prophet early commit around another policy: when the mean top-2 gap of the block's
    masked positions passes the threshold for this point of decoding, "block" scope commits
    every mask of the block (argmax), "answer" scope fills every mask of the answer at once (a
    constrained chooser fills validly or refuses, and then the wrapped policy decides)."""

    def __init__(self, inner: UnmaskPolicy, gaps=(7.5, 5.0, 2.5), scope: str = "block", mask_id: int = -1):
        self.inner, self.gaps, self.scope, self.mask_id = inner, tuple(gaps), scope, mask_id
        self.name = inner.name

    def decide(self, view):
        import torch

        if prophet_gap(view.logits) >= prophet_threshold(view.progress, self.gaps):
            if self.scope == "answer":
                if view.try_fill():
                    return Decision(torch.zeros(view.conf.numel(), dtype=torch.bool, device=view.conf.device))
            else:
                tokens = view.logits.double().index_fill(
                    -1, torch.tensor([self.mask_id], device=view.logits.device), float("-inf")).argmax(-1)
                return Decision(torch.ones(view.conf.numel(), dtype=torch.bool, device=view.conf.device), tokens)
        return self.inner.decide(view)

    def before_forward(self, r, decoder) -> None:
        self.inner.before_forward(r, decoder)

    def noise_time(self, r):
        return self.inner.noise_time(r)


POLICIES: dict[str, Callable] = {
    "confidence": Confidence, "margin": Margin, "entropy": Entropy, "random": Random,
    "threshold": Threshold, "factor": Factor, "ancestral": Ancestral, "first_hitting": FirstHitting,
}


def make_policy(config, mask_id: int) -> UnmaskPolicy:
    """One request's policy from its DecodeConfig (a fresh object: policies may keep state)."""
    kind = POLICIES[config.unmask]
    policy = kind(config.threshold) if kind is Threshold else kind(config.factor) if kind is Factor else kind()
    if config.early_commit:
        policy = EarlyCommit(policy, config.early_commit_gaps, config.early_commit_scope, mask_id)
    return policy
