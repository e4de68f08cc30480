"""The decoder: one loop for every diffusion model, with pluggable policies.

Works on token ids only (no tokenizer inside), for a batch of prompts of different lengths.

    dec = Decoder(model)
    results = dec.generate([[5, 6, 7], [9]], DecodeConfig(max_new_tokens=64, unmask="threshold"))
    results[0].tokens, results[0].finish_reason, results[0].stats

Pieces (each a small function or class, so that the batching scheduler and the constraint
chooser of later issues can drive or replace them):

* Canvas: BOS + prompt + N masks; semi-autoregressive blocks of `block_length` over the N
  generated positions (block_length = N is plain MDLM sampling). Block models (BD3-LM, E2D2)
  always use their own block size, aligned to their absolute positions.
* Unmask policy (`unmask`), which masked positions of the current block to commit at a step:
  "confidence" / "margin" / "entropy" / "random" with a fixed number of tokens per step (one
  per step by default: the LLaDA-style low-confidence-remasking baseline), "threshold" (every
  position whose chosen token has probability >= tau, at least the best one; Fast-dLLM),
  "factor" (the largest n with (n + 1)(1 - c_(n)) < f; Fast-dLLM) and "ancestral" (MDLM's
  ancestral step: each mask is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t))
  and "first_hitting" (Zheng et al. 2024; BD3-LM's `first_hitting` sampler): one uniformly
  random mask per step, revealed at its sampled hitting time. With n masks left at time t, the
  first of them is revealed at tau = t * u^(1/n), u ~ U(0, 1) (the masking probability of the
  log-linear schedule is linear in t), and a time-conditioned network is called at tau. The
  time runs over the answer (MDLM, RADD) or restarts at 1 with every block (BD3-LM, E2D2);
  networks without time input only see the random one-per-step order.
* Early commit (`early_commit`): Prophet's rule. The mean top-1 / top-2 logit gap over the
  masked positions of the scope, against thresholds that fall as decoding progresses; when it
  passes, every remaining mask of the scope ("block" or "answer") takes its argmax at once.
* Sampling: greedy (temperature 0), temperature, top-k, top-p; Gumbel-max in float64 with one
  generator per request, so a request's output depends only on its own seed.
* Chooser hook: `TokenChooser.choose(logits, ...)` turns logits at masked positions into
  (token, confidence); a grammar-constrained chooser replaces the default one.
* Stopping: max_new_tokens; EOS (a row stops as soon as its decided prefix holds EOS, even
  mid-block, and nothing after EOS is output); stop token sequences.
* Statistics per request: network calls (NFE), tokens per forward, wall time per phase.

* Cache (`cache`): "none" recomputes the whole canvas at every step (the vanilla decoder every
  fast configuration is measured against). For bidirectional models (MDLM, RADD), Fast-dLLM's
  approximate caches, refreshed by one full forward at the start of every block: "prefix" keeps
  the K/V of everything before the block and feeds the block and the rest; "dual" also keeps the
  K/V after the block and feeds the block only. For block models (BD3-LM, E2D2) "exact": the
  clean finished blocks are encoded once (BD3-LM: their K/V in every layer; E2D2: the encoder's
  states) and each denoising step feeds only the current block. That is the model's own
  factorisation, so the tokens are identical to the uncached decoder's. Output reuse when
  nothing changed is automatic: a step always commits at least one token, except an ancestral
  step, after which the previous logits are reused (the networks take no time input).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from dlm.errors import DLMError
from dlm.noise import LogLinearSchedule
from dlm.policies import UNMASK_POLICIES


@dataclass
class DecodeConfig:
    max_new_tokens: int = 64
    block_length: Optional[int] = None  # None: the whole answer (MDLM) or the model's block size (BD3-LM/E2D2)
    steps: Optional[int] = None  # denoising steps over the answer for fixed-k policies; default 1 token/step
    unmask: str = "confidence"
    threshold: float = 0.9
    factor: float = 1.0
    early_commit: bool = False
    early_commit_scope: str = "block"  # block | answer
    early_commit_gaps: tuple = (7.5, 5.0, 2.5)  # Prophet: gap needed for progress < 1/3, < 2/3, later
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    stop: Sequence[Sequence[int]] = ()
    stop_at_eos: bool = True
    cache: str = "none"  # none | prefix | dual (MDLM, RADD) | exact (BD3-LM, E2D2)

    def validate(self, block_size: Optional[int] = None) -> None:
        if self.max_new_tokens < 1:
            raise DLMError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.unmask not in UNMASK_POLICIES:
            raise DLMError(f"unknown unmask policy {self.unmask!r}; choose one of {', '.join(UNMASK_POLICIES)}")
        if not 0.0 < self.threshold <= 1.0:
            raise DLMError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor <= 0:
            raise DLMError(f"factor must be positive, got {self.factor}")
        if self.block_length is not None and block_size is None:
            if self.block_length < 1 or self.max_new_tokens % self.block_length:
                raise DLMError(f"block length {self.block_length} does not divide max_new_tokens "
                               f"{self.max_new_tokens}; choose a block length that divides it")
        if self.steps is not None and self.steps < 1:
            raise DLMError(f"steps must be at least 1, got {self.steps}")
        if self.temperature < 0:
            raise DLMError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DLMError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise DLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.early_commit_scope not in ("block", "answer"):
            raise DLMError(f"early_commit_scope must be 'block' or 'answer', got {self.early_commit_scope!r}")
        if any(len(s) == 0 for s in self.stop):
            raise DLMError("stop sequences must not be empty")
        allowed = ("none", "exact") if block_size is not None else ("none", "prefix", "dual")
        if self.cache not in allowed:
            kind = "block models (BD3-LM, E2D2)" if block_size is not None else "bidirectional models (MDLM, RADD)"
            raise DLMError(f"cache {self.cache!r} is not available for {kind}; use one of {', '.join(allowed)}")


@dataclass
class DecodeResult:
    tokens: list[int]  # generated tokens, cut before EOS / a stop sequence
    finish_reason: str  # "stop" (EOS or a stop sequence), "length", "cancelled" or "error"
    stats: dict = field(default_factory=dict)
    error: Optional[BaseException] = None  # finish_reason "error": what failed (this request only)


# ------------------------------------------------------------------ token choice
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

    def __init__(self, config: DecodeConfig, mask_id: int):
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
        gumbel = -torch.log(-torch.log(g.clamp_min(1e-300)))
        return logits + gumbel, probs

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


# ------------------------------------------------------------------ unmask policies
def select_fixed(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (n,): the k highest scores (ties: lowest index first)."""
    k = min(k, scores.numel())
    sel = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
        sel[order[:k]] = True
    return sel


def select_threshold(conf: torch.Tensor, tau: float) -> torch.Tensor:
    sel = conf >= tau
    if not sel.any():
        sel[int(conf.argmax())] = True
    return sel


def select_factor(conf: torch.Tensor, f: float) -> torch.Tensor:
    """Fast-dLLM factor rule: sort c_(1) >= c_(2) >= ...; take the largest n with (n + 1)(1 - c_(n)) < f."""
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


def prophet_gap(logits: torch.Tensor) -> float:
    """Mean top-1 minus top-2 logit over the rows of (n, V)."""
    top2 = logits.double().topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).mean())


def prophet_threshold(progress: float, gaps=(7.5, 5.0, 2.5)) -> float:
    return gaps[0] if progress < 1 / 3 else gaps[1] if progress < 2 / 3 else gaps[2]


# ------------------------------------------------------------------ the decoder
class DecodeRequest:
    """One request's decoding state: its own canvas (BOS + prompt + N masks, no padding), blocks,
    step counters, token chooser, generator and caches. The decoder steps many of these together;
    they may start at different times, have different prompt lengths, policies and block
    positions, and leave as soon as they finish."""

    def __init__(self, rid, prompt, config: DecodeConfig, seed: int, chooser, decoder: "Decoder"):
        cfg = decoder.cfg
        self.rid, self.config, self.chooser = rid, config, chooser
        self.prompt = [int(t) for t in prompt]
        N = config.max_new_tokens
        P = len(self.prompt) + 1  # BOS + prompt
        if decoder.block_model:
            bs = cfg.block_size
            total = -(-(P + N) // bs) * bs  # to the end of the last block; N are reported
            self.blocks = [(max(P, b * bs), (b + 1) * bs) for b in range(P // bs, total // bs)]
        else:
            bs = config.block_length or N
            total = P + N
            self.blocks = [(P + i * bs, P + (i + 1) * bs) for i in range(math.ceil(N / bs))]
        self.P, self.N, self.total, self.gen_len = P, N, total, total - P
        self.canvas = torch.full((total,), cfg.mask_token_id, dtype=torch.long, device=decoder.device)
        self.canvas[:P] = torch.tensor([cfg.bos_token_id, *self.prompt], device=decoder.device)
        self.gen = torch.Generator().manual_seed(int(seed) % 2**64)  # any int: torch takes [0, 2^64)
        self.steps_total = config.steps or self.gen_len  # fixed-k policies: spread over blocks
        self.bi, self.s_in_block, self.step_i = 0, 0, 0
        self.hit_t, self.hit_block = 1.0, -1  # first-hitting sampler: current time, its block
        self.st: dict = {"mode": config.cache}
        self.prev_logits, self.changed = None, True
        self.logits = None
        self.nfe, self.t_forward = 0, 0.0
        self.t0 = time.perf_counter()
        self.finished, self.cancelled = False, False
        self.result: Optional[DecodeResult] = None

    @property
    def block(self) -> tuple[int, int]:
        return self.blocks[self.bi]

    @property
    def block_steps(self) -> int:
        lo, hi = self.block
        return max(1, round(self.steps_total * (hi - lo) / self.gen_len))

    def answer(self) -> list[int]:
        """The answer region (MASK where still undecided)."""
        return self.canvas[self.P : self.P + self.N].tolist()


class Decoder:
    """Generate from a diffusion model (MDLM, RADD, BD3-LM, E2D2) for many requests at once.

    `generate` decodes a list of prompts. A serving scheduler instead keeps a set of
    `DecodeRequest`s (`new_request`) and calls `step` between admissions and departures: every
    call advances each unfinished request by one network call, batched across requests."""

    def __init__(self, model, chooser_factory=None):
        self.model = model.eval()
        self.cfg = model.config
        if self.cfg.objective == "ar":
            raise DLMError("the decoder is for diffusion models; decode AR models with HF generate "
                           "(dlm export gives a LlamaForCausalLM)")
        self.device = next(model.parameters()).device
        self.block_model = self.cfg.objective in ("bd3lm", "e2d2")
        self.chooser_factory = chooser_factory or (lambda config: TokenChooser(config, self.cfg.mask_token_id))
        if self.block_model:
            from dlm.objectives import make_objective

            self.objective = make_objective(self.cfg)
        self._slab = _KVSlab(self.cfg.num_hidden_layers)  # BD3-LM exact caches of all live requests

    # -------------------------------------------------------------- public
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], config: Optional[DecodeConfig] = None,
                 seeds: Optional[Sequence[int]] = None, on_step=None,
                 constraints: Optional[Sequence] = None, raise_errors: bool = True) -> list[DecodeResult]:
        """Decode every prompt. `seeds[i]` (default config.seed + i) seeds request i alone.
        `on_step(rows, answers)`, if given, is called after every network call with the request
        indices and their answer regions (token lists, MASK where still undecided): for progress
        displays and streaming. `constraints[i]` (a `dlm.constraints.CompiledConstraint` or None)
        constrains request i's output to a regular or context-free language. A request that fails
        while decoding fails alone (the others finish); with `raise_errors` its error is then
        raised, else its result has finish_reason "error" and `.error`."""
        config = config or DecodeConfig()
        if not prompts:
            return []
        if constraints is not None and len(constraints) != len(prompts):
            raise DLMError(f"{len(constraints)} constraints for {len(prompts)} prompts; give one per prompt (or None)")
        reqs = [self.new_request(p, config, seeds[i] if seeds else config.seed + i,
                                 constraints[i] if constraints is not None else None, rid=i)
                for i, p in enumerate(prompts)]
        while True:
            stepped = self.step(reqs)
            if not stepped:
                break
            if on_step is not None:
                on_step([r.rid for r in stepped], [r.answer() for r in stepped])
        if raise_errors:
            failed = next((r.result.error for r in reqs if r.result.error is not None), None)
            if failed is not None:
                raise failed
        return [r.result for r in reqs]

    def new_request(self, prompt: Sequence[int], config: DecodeConfig, seed: Optional[int] = None,
                    constraint=None, rid=None) -> DecodeRequest:
        """Validate and set up one request (raises DLMError on bad input, before any decoding)."""
        cfg = self.cfg
        config.validate(cfg.block_size if self.block_model else None)
        _check_prompt(prompt, cfg)
        chooser = self.chooser_factory(config)
        if constraint is not None:
            from dlm.constraints import ConstrainedChooser

            chooser = ConstrainedChooser(chooser, constraint, eos_id=cfg.eos_token_id)
        req = DecodeRequest(rid, prompt, config, config.seed if seed is None else seed, chooser, self)
        _check_length(req.total, prompt, config, cfg)
        chooser.begin(req.P, req.N, req.canvas[None])
        return req

    @torch.no_grad()
    def step(self, reqs: Sequence[DecodeRequest]) -> list[DecodeRequest]:
        """One round: each unfinished request in `reqs` gets one network call (batched with the
        others) and commits tokens. Returns the requests that stepped; finished ones have
        `.result` set and drop their caches. A request whose own work fails (its constraint
        cannot be met, its final check fails, its forward pass fails when run alone) finishes
        with finish_reason "error"; the others step on unaffected."""
        work = [r for r in reqs if not r.finished and self._guarded(r, self._advance)]
        if not work:
            return []
        need = []
        for r in work:
            if r.config.unmask == "first_hitting":
                self._next_hitting_time(r)
            if r.changed or r.prev_logits is None or self.cfg.time_conditioning:
                need.append(r)
            else:  # nothing changed since the last call (ancestral step): reuse its output
                r.logits = r.prev_logits
        try:
            self._forward(need)
        except Exception:  # find whose forward fails: each request alone
            for r in need:
                self._guarded(r, lambda r: self._forward([r]))
            work = [r for r in work if not r.finished]
        fast = [r for r in work if self._greedy_threshold(r)]
        batched = set()
        if len(fast) > 1:
            try:
                self._commit_greedy_threshold(fast)
                batched = {id(r) for r in fast}
            except Exception:  # each on its own below, failures isolated
                pass
        for r in work:
            r.prev_logits = r.logits
            if id(r) not in batched:
                self._guarded(r, self._commit)
        return work

    def _guarded(self, r: DecodeRequest, fn):
        """fn(r); if it raises, r fails alone (finish_reason "error") and the result is None."""
        try:
            return fn(r)
        except Exception as e:  # noqa: BLE001 - recorded on the request, raised by generate()
            if not r.finished:
                self._finish(r, error=e)
            return None

    def cancel(self, req: DecodeRequest) -> None:
        """Stop a request now (e.g. its client went away); its caches are freed."""
        if not req.finished:
            req.cancelled = True
            self._finish(req)

    # -------------------------------------------------------------- per-request control
    def _advance(self, r: DecodeRequest) -> bool:
        """Move past finished blocks; finish the request when it is done. True if it has work."""
        mask_id = self.cfg.mask_token_id
        while True:
            if r.bi >= len(r.blocks):
                self._finish(r)
                return False
            lo, hi = r.block
            # A request whose decided prefix already fixes the output (EOS or a stop sequence in
            # it, with nothing undecided that could move the cut) stops, even mid-block: what
            # follows is cut from the output anyway.
            if self._stopped(r.canvas[r.P : hi].tolist(), r.config):
                self._finish(r)
                return False
            if bool((r.canvas[lo:hi] == mask_id).any()) and r.s_in_block < r.block_steps * 4 + (hi - lo):
                return True
            r.bi += 1
            r.s_in_block = 0
            r.changed, r.prev_logits = True, None

    def _finish(self, r: DecodeRequest, error: Optional[BaseException] = None) -> None:
        gen = r.canvas[r.P : r.P + r.N].tolist()
        out, reason = self._cut(gen, r.config)
        if r.cancelled:
            reason = "cancelled"
        elif error is None and hasattr(r.chooser, "check"):  # constrained: the final check
            why = r.chooser.check(out)
            if why is not None:
                from dlm.constraints import ConstraintViolation

                error = ConstraintViolation(f"the output does not satisfy the constraint {r.chooser.c.constraint.describe()}"
                                            f" ({why}); keywords enforced only approximately while decoding: "
                                            f"{', '.join(r.chooser.c.approximate) or 'none'}")
        if error is not None:
            out, reason = [], "error"
        wall = time.perf_counter() - r.t0
        r.result = DecodeResult(out, reason, {
            "nfe": r.nfe, "generated_tokens": len(out), "tokens_per_forward": len(out) / max(1, r.nfe),
            "wall_s": wall, "forward_s": r.t_forward, "other_s": wall - r.t_forward,
            "constraint_s": r.chooser.elapsed,
        }, error)
        r.finished = True
        if "slot" in r.st:
            self._slab.release(r.st["slot"])
        r.st, r.prev_logits, r.logits = {"mode": r.config.cache}, None, None

    def _commit(self, r: DecodeRequest) -> None:
        config, mask_id, chooser = r.config, self.cfg.mask_token_id, r.chooser
        lo, hi = r.block
        canvas = r.canvas
        logits = r.logits  # (W, V): canvas columns [lo, lo + W)
        region = canvas[lo:hi].clone()
        cols = (region == mask_id).nonzero(as_tuple=True)[0]
        r.step_i += 1
        blk_logits = logits[cols]
        rows = torch.zeros(cols.numel(), dtype=torch.long)
        view = canvas[None]
        tokens, conf, probs = chooser.choose(blk_logits, rows, (lo + cols).cpu(), view, [r.gen])
        commit = None
        if config.early_commit:
            gap = prophet_gap(blk_logits)
            if gap >= prophet_threshold(r.step_i / max(1, r.steps_total), config.early_commit_gaps):
                if config.early_commit_scope == "answer":
                    # fill every mask of the answer with its argmax in this one step (dual / exact
                    # caches see the block only: they fill the block); a constrained chooser fills
                    # validly or refuses, and then there is no early commit
                    mcols = (canvas[lo : lo + logits.shape[0]] == mask_id).nonzero(as_tuple=True)[0]
                    fill = chooser.fill(0, (lo + mcols).cpu(), logits[mcols], view)
                    if fill is not None:
                        canvas[lo + mcols] = fill.to(canvas.device)
                        commit = torch.zeros_like(rows, dtype=torch.bool)
                else:
                    commit = torch.ones_like(rows, dtype=torch.bool)
                    tokens = blk_logits.double().index_fill(
                        -1, torch.tensor([mask_id], device=blk_logits.device), float("-inf")).argmax(-1)
        if commit is None:
            bsteps, s = r.block_steps, r.s_in_block
            commit = self._select(config, conf, probs, blk_logits, r.gen, n_masked=cols.numel(),
                                  steps_left=max(1, bsteps - s), t=(bsteps - s) / bsteps,
                                  s=(bsteps - s - 1) / bsteps, sched=_SCHEDULE)
        commit, tokens = chooser.assign(rows, (lo + cols).cpu(), commit, tokens, view)
        if bool(commit.any()):
            canvas[lo + cols[commit.to(cols.device)]] = tokens[commit].to(canvas.device)
        r.changed = bool((canvas[lo:hi] != region).any())  # commits or an early-commit fill
        r.s_in_block += 1

    @staticmethod
    def _greedy_threshold(r: DecodeRequest) -> bool:
        """The common serving case that `_commit_greedy_threshold` handles for many requests at
        once: the plain chooser, greedy, no top-k / top-p, the threshold rule, no early commit."""
        c = r.config
        return (type(r.chooser) is TokenChooser and c.unmask == "threshold" and c.temperature <= 0
                and c.top_k is None and (c.top_p is None or c.top_p >= 1.0) and not c.early_commit)

    def _commit_greedy_threshold(self, reqs: list[DecodeRequest]) -> None:
        """`_commit` for greedy threshold requests, batched: the same float64 softmax, argmax and
        threshold decisions (ties included) as one request at a time, in a few tensor ops."""
        mask_id = self.cfg.mask_token_id
        lows = [r.block[0] for r in reqs]
        blocks = [r.canvas[lo:hi] for r, (lo, hi) in zip(reqs, (r.block for r in reqs))]
        region = torch.nn.utils.rnn.pad_sequence(blocks, batch_first=True, padding_value=-1)  # (R, W)
        logits = torch.nn.utils.rnn.pad_sequence([r.logits[: b.numel()] for r, b in zip(reqs, blocks)],
                                                 batch_first=True).double()
        logits[..., mask_id] = float("-inf")
        tokens = logits.argmax(-1)
        conf = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0]
        open_ = region == mask_id
        conf = conf.masked_fill(~open_, -1.0)
        tau = torch.tensor([r.config.threshold for r in reqs], dtype=conf.dtype, device=conf.device)
        sel = conf >= tau[:, None]
        none = ~sel.any(1)
        if bool(none.any()):
            best = conf.argmax(1)
            sel[none, best[none]] = True
        sel &= open_
        for i, (r, lo) in enumerate(zip(reqs, lows)):
            cols = sel[i].nonzero(as_tuple=True)[0]
            r.canvas[lo + cols] = tokens[i, cols].to(r.canvas.device)
            r.step_i += 1
            r.changed = cols.numel() > 0
            r.s_in_block += 1

    # -------------------------------------------------------------- network (batched)
    def _forward(self, reqs: list[DecodeRequest]) -> None:
        """Set r.logits for every request: one call per group of requests of the same kind."""
        groups: dict[tuple, list[DecodeRequest]] = {}
        for r in reqs:
            lo, hi = r.block
            mode = r.st["mode"]
            if self.block_model:
                key = ("exact",) if mode == "exact" else ("blockfull", r.total)
            elif mode == "none" or r.s_in_block == 0:  # prefix / dual refresh once per block
                key = ("full",)
            else:
                key = ("view", (hi if mode == "dual" else r.total) - lo)
            groups.setdefault(key, []).append(r)
        for key, group in groups.items():
            tf = time.perf_counter()
            if key[0] == "full":
                self._full(group)
            elif key[0] == "view":
                self._view(group, key[1])
            elif key[0] == "blockfull":
                canvas = torch.stack([r.canvas for r in group])
                out = torch.zeros_like(canvas, dtype=torch.bool)
                for i, r in enumerate(group):
                    out[i, r.block[0] :] = True  # the LM head only from the current block on
                flat = self.objective.masked_logits(self.model, canvas, canvas, None, out)
                for r, part in zip(group, flat.split([r.total - r.block[0] for r in group])):
                    r.logits = part
            else:
                self._exact(group)
            dt = time.perf_counter() - tf
            for r in group:
                r.nfe += 1
                r.t_forward += dt

    def _next_hitting_time(self, r: DecodeRequest) -> None:
        """First-hitting sampler: move r.hit_t to the time the next of its n masks is revealed,
        tau = t * u^(1/n) (u from the request's own generator, so seeded runs repeat)."""
        mask_id = self.cfg.mask_token_id
        if self.block_model:
            lo, hi = r.block
            if r.hit_block != r.bi:  # a new block starts fully masked at t = 1
                r.hit_t, r.hit_block = 1.0, r.bi
        else:
            lo, hi = r.P, r.P + r.N
        n = int((r.canvas[lo:hi] == mask_id).sum())
        u = float(torch.rand((), generator=r.gen, dtype=torch.float64))
        r.hit_t *= u ** (1.0 / max(1, n))

    def _sigma(self, group: list[DecodeRequest]):
        """Noise level for time-conditioned MDLM: t = the masked fraction of each answer, or the
        sampled hitting time under the first-hitting sampler."""
        if not self.cfg.time_conditioning:
            return None
        mask_id = self.cfg.mask_token_id
        t = torch.stack([torch.tensor(r.hit_t, dtype=torch.float32, device=self.device)
                         if r.config.unmask == "first_hitting" else (r.canvas[r.P :] == mask_id).float().mean()
                         for r in group]).clamp(min=1e-3)
        return _SCHEDULE.sigma(t)

    def _full(self, group: list[DecodeRequest]) -> None:
        """Whole canvases, left-padded to the longest; prefix / dual caches keep their K/V."""
        from dlm.model import KVCache

        dev, L = self.device, max(r.total for r in group)
        canvas = torch.full((len(group), L), self.cfg.pad_token_id, dtype=torch.long, device=dev)
        positions = torch.full((len(group), L), -1, dtype=torch.long, device=dev)
        for i, r in enumerate(group):
            canvas[i, L - r.total :] = r.canvas
            positions[i, L - r.total :] = torch.arange(r.total, device=dev)
        am = (positions >= 0).long()
        refresh = any(r.st["mode"] in ("prefix", "dual") for r in group)
        kv = KVCache(self.cfg.num_hidden_layers) if refresh else None
        # the LM head only where logits are read: from each request's current block on
        out = torch.zeros_like(canvas, dtype=torch.bool)
        for i, r in enumerate(group):
            out[i, L - r.total + r.block[0] :] = True
        flat = self.model(canvas, attention_mask=None if bool(am.all()) else am, position_ids=positions.clamp(min=0),
                          cache=kv, sigma=self._sigma(group), output_positions=out).logits
        parts = flat.split([r.total - r.block[0] for r in group])
        for i, r in enumerate(group):
            pad = L - r.total
            r.logits = parts[i]
            if r.st["mode"] in ("prefix", "dual"):
                own = KVCache(self.cfg.num_hidden_layers)
                own.k = [k[i : i + 1, :, pad:] for k in kv.k]
                own.v = [v[i : i + 1, :, pad:] for v in kv.v]
                r.st = {"mode": r.st["mode"], "kv": own}

    def _view(self, group: list[DecodeRequest], width: int) -> None:
        """Approximate caches: feed columns [lo, lo + width) only; every other column's K/V comes
        from the block's refresh (computed when the fed tokens had other values)."""
        from dlm.model import KVCache

        dev = self.device
        views = []
        for r in group:
            lo = r.block[0]
            key = (lo, width)
            if r.st.get("view_key") != key:  # gather the kept K/V once per block
                kv = r.st["kv"]
                r.st["view"] = ([torch.cat([k[:, :, :lo], k[:, :, lo + width :]], dim=2) for k in kv.k],
                                [torch.cat([v[:, :, :lo], v[:, :, lo + width :]], dim=2) for v in kv.v])
                r.st["view_key"] = key
            views.append(r.st["view"])
        lk = [v[0][0].shape[2] for v in views]
        M = max(lk)
        batch = KVCache(self.cfg.num_hidden_layers)
        batch.commit = False
        batch.k = [_left_pad_cat([v[0][layer] for v in views], M) for layer in range(self.cfg.num_hidden_layers)]
        batch.v = [_left_pad_cat([v[1][layer] for v in views], M) for layer in range(self.cfg.num_hidden_layers)]
        key_am = torch.zeros(len(group), M + width, dtype=torch.long, device=dev)
        for i, n in enumerate(lk):
            key_am[i, M - n :] = 1
        ids = torch.stack([r.canvas[r.block[0] : r.block[0] + width] for r in group])
        pos = torch.stack([torch.arange(r.block[0], r.block[0] + width, device=dev) for r in group])
        out = self.model(ids, attention_mask=None if bool(key_am.all()) else key_am, position_ids=pos,
                         cache=batch, sigma=self._sigma(group))
        for i, r in enumerate(group):
            r.logits = out.logits[i]

    def _exact(self, group: list[DecodeRequest]) -> None:
        """Block models: each request's finished clean blocks are encoded once (BD3-LM: their K/V
        in every layer; E2D2: the encoder's states); a step feeds only the current blocks.

        BD3-LM encodes newly finished clean blocks in the same call as the step (one network call
        per step, whichever requests just finished a block): E2D2 needs its encoder for them."""
        cfg, dev, bs = self.cfg, self.device, self.cfg.block_size
        if cfg.objective != "e2d2":
            self._exact_fused(group)
            return
        self._append_clean(group)
        b0s = [(r.block[0] // bs) * bs for r in group]
        M = max(b0s)
        ids = torch.stack([r.canvas[b : b + bs] for r, b in zip(group, b0s)])
        pos = torch.stack([torch.arange(b, b + bs, device=dev) for b in b0s])
        key_ok = torch.zeros(len(group), M, dtype=torch.bool, device=dev)
        for i, b in enumerate(b0s):
            key_ok[i, M - b :] = True
        mem = torch.zeros(len(group), M, cfg.hidden_size, device=dev, dtype=self.model.dtype)
        mem_pos = torch.zeros(len(group), M, dtype=torch.long, device=dev)
        for i, (r, b) in enumerate(zip(group, b0s)):
            if b:
                mem[i, M - b :] = r.st["memory"][0]
                mem_pos[i, M - b :] = torch.arange(b, device=dev)
        attn = None
        if not bool(key_ok.all()):
            attn = torch.cat([key_ok[:, None, None, :].expand(-1, 1, bs, -1),
                              torch.ones(len(group), 1, bs, bs, dtype=torch.bool, device=dev)], dim=-1)
        logits = self.model.decode(ids, mem, mem_pos, attn_mask=attn, position_ids=pos).logits
        for i, (r, b) in enumerate(zip(group, b0s)):
            lo, hi = r.block
            r.logits = logits[i, lo - b : hi - b]

    def _exact_fused(self, group: list[DecodeRequest]) -> None:
        """BD3-LM step with the clean-block update folded in. Per request: `done` tokens cached,
        c = b0 - done clean tokens to add, then the noisy block [b0, b0 + bs). Queries are
        [clean (left-padded to C) ; noisy block]; keys [cache (the slab's rows, valid up to each
        request's `done`) ; clean ; noisy].
        Clean queries see the cache and the clean part block-causally (exactly as when the
        blocks are encoded on their own), noisy queries see everything valid; pad queries see
        themselves only. The clean part's K/V is written to each request's slab slot, the noisy
        block's is dropped."""
        from dlm.model import KVCache

        cfg, dev, bs = self.cfg, self.device, self.cfg.block_size
        R = len(group)
        b0s = [(r.block[0] // bs) * bs for r in group]
        dones = [r.st.get("clean_len", 0) for r in group]
        cs = [b - d for b, d in zip(b0s, dones)]
        M, C = max(dones), max(cs)
        Lq = C + bs
        ids = torch.nn.utils.rnn.pad_sequence([r.canvas[d : b + bs] for r, b, d in zip(group, b0s, dones)],
                                              batch_first=True, padding_value=cfg.mask_token_id, padding_side="left")
        col = torch.arange(Lq, device=dev)[None]
        valid_q = col >= (C - torch.tensor(cs, device=dev))[:, None]  # left padding of the clean part
        pos = (torch.tensor(b0s, device=dev)[:, None] + bs - Lq + col).masked_fill(~valid_q, 0)
        q_blk = (pos // bs).masked_fill(~valid_q, -1)  # block index of each query (-1: pad)
        # keys: cache part (all valid entries precede every query), then the queries themselves;
        # slab rows hold a request's prefix at [0, done)
        cache_ok = torch.arange(M, device=dev)[None] < torch.tensor(dones, device=dev)[:, None]
        qk = (q_blk[:, None, :] <= q_blk[:, :, None]) & valid_q[:, None, :] & valid_q[:, :, None]
        qk |= torch.eye(Lq, dtype=torch.bool, device=dev)[None]  # pad queries see themselves
        mask = torch.cat([cache_ok[:, None, :].expand(R, Lq, M) & valid_q[:, :, None], qk], dim=-1)[:, None]
        if M:  # the cached prefixes, gathered into tensors with room for this call's K/V
            batch = KVCache.preallocated(*self._slab.gather([r.st.get("slot", 0) for r in group], M, dev, room=Lq), M)
        else:
            batch = KVCache(cfg.num_hidden_layers)
        out = torch.zeros(R, Lq, dtype=torch.bool, device=dev)
        out[:, C:] = True  # the LM head on the noisy blocks only
        # rows of different lengths (a request that just finished a block, or a new one with its
        # prompt, among requests that only step): padding stays out of the per-token layers
        logits = self.model(ids, position_ids=pos, attn_mask=mask, cache=batch, output_positions=out,
                            query_valid=valid_q if C else None).logits
        logits = logits.view(R, bs, -1)
        for i, (r, b, d, c) in enumerate(zip(group, b0s, dones, cs)):
            if c:
                if "slot" not in r.st:
                    r.st["slot"] = self._slab.acquire()
                self._slab.write(r.st["slot"], d, [k[i : i + 1, :, M + C - c : M + C] for k in batch.k],
                                 [v[i : i + 1, :, M + C - c : M + C] for v in batch.v])
                r.st["clean_len"] = b
            lo, hi = r.block
            r.logits = logits[i, lo - b : hi - b]

    def _append_clean(self, group: list[DecodeRequest]) -> None:
        """E2D2's exact cache: encode each request's newly finished clean blocks [done, b0) (block-causal
        among themselves, attending to everything before), batched across the requests that
        append the same number of tokens, their stored K/V (E2D2: encoder K/V) left-padded
        under a key mask; the new entries are then appended to each request's own cache."""
        from dlm.model import KVCache

        cfg, dev, bs = self.cfg, self.device, self.cfg.block_size
        e2d2 = cfg.objective == "e2d2"
        by_n: dict[int, list[tuple[DecodeRequest, int, int]]] = {}
        for r in group:
            b0 = (r.block[0] // bs) * bs
            done = r.st.get("clean_len", 0)
            if done < b0:
                by_n.setdefault(b0 - done, []).append((r, done, b0))
        for n, items in by_n.items():
            R, M = len(items), max(done for _, done, _ in items)
            blk = torch.arange(n, device=dev) // bs  # done is a block boundary: blocks align
            own = (blk[None, :] <= blk[:, None]).expand(R, 1, n, n)
            key_ok = torch.zeros(R, 1, n, M, dtype=torch.bool, device=dev)
            for i, (_, done, _) in enumerate(items):
                key_ok[i, :, :, M - done :] = True
            mask = torch.cat([key_ok, own], dim=-1)
            ids = torch.stack([r.canvas[done:b0] for r, done, b0 in items])
            pos = torch.stack([torch.arange(done, b0, device=dev) for _, done, b0 in items])
            name = "enc" if e2d2 else "kv"
            batch = KVCache(cfg.num_hidden_layers)
            if M:
                stored = [r.st[name] if done else None for r, done, _ in items]
                for layer in range(cfg.num_hidden_layers):
                    batch.k[layer] = _left_pad_cat([c.k[layer] if c else None for c in stored], M, like=ids)
                    batch.v[layer] = _left_pad_cat([c.v[layer] if c else None for c in stored], M, like=ids)
            if e2d2:
                states = self.model.encode(ids, attn_mask=mask, position_ids=pos, cache=batch)
            else:
                self.model(ids, position_ids=pos, attn_mask=mask, cache=batch)
            for i, (r, done, b0) in enumerate(items):
                mine = r.st.setdefault(name, KVCache(cfg.num_hidden_layers))
                for layer in range(cfg.num_hidden_layers):
                    k, v = batch.k[layer][i : i + 1, :, M:], batch.v[layer][i : i + 1, :, M:]
                    mine.k[layer] = k if mine.k[layer] is None else torch.cat([mine.k[layer], k], dim=2)
                    mine.v[layer] = v if mine.v[layer] is None else torch.cat([mine.v[layer], v], dim=2)
                if e2d2:
                    r.st["memory"] = states[i : i + 1] if done == 0 else torch.cat([r.st["memory"], states[i : i + 1]], dim=1)
                r.st["clean_len"] = b0

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _select(config, conf, probs, logits, gen, n_masked, steps_left, t, s, sched) -> torch.Tensor:
        u = config.unmask
        if u == "threshold":
            return select_threshold(conf, config.threshold)
        if u == "factor":
            return select_factor(conf, config.factor)
        if u == "ancestral":
            tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            p = float(sched.reveal_prob(tt, ss)) if t > 0 else 1.0
            draw = torch.rand(n_masked, generator=gen, dtype=torch.float64)
            return (draw < p).to(conf.device)
        if u == "first_hitting":  # one uniformly random mask (its time was drawn before the call)
            sel = torch.zeros(n_masked, dtype=torch.bool)
            sel[int(torch.randint(n_masked, (), generator=gen))] = True
            return sel.to(conf.device)
        k = math.ceil(n_masked / steps_left)
        if u == "confidence":
            scores = conf
        elif u == "margin":
            top2 = probs.topk(2, dim=-1).values
            scores = top2[:, 0] - top2[:, 1]
        elif u == "entropy":
            scores = (probs * probs.clamp_min(1e-300).log()).sum(-1)  # -entropy: confident first
        else:  # random
            scores = torch.rand(n_masked, generator=gen, dtype=torch.float64)
        return select_fixed(scores.cpu(), k).to(conf.device)

    def _stopped(self, tokens: list[int], config: DecodeConfig) -> bool:
        """Is the output already decided by the prefix of `tokens` before the first MASK? It is
        when that prefix holds EOS or a stop sequence and every stop sequence that could start
        before the cut lies inside the prefix (so no undecided token can move the cut)."""
        mask_id = self.cfg.mask_token_id
        if mask_id in tokens:  # only a decided prefix can stop the request
            tokens = tokens[: tokens.index(mask_id)]
        out, reason = self._cut(tokens, config)
        if reason != "stop":
            return False
        longest = max((len(s) for s in config.stop), default=1)
        return len(out) + longest - 1 <= len(tokens)

    def _cut(self, tokens: list[int], config: DecodeConfig) -> tuple[list[int], str]:
        return _cut_output(tokens, config, self.cfg.eos_token_id)


def _check_prompt(prompt: Sequence[int], cfg) -> None:
    if len(prompt) == 0:
        raise DLMError("a prompt is empty; give at least one token (BOS is added in front)")
    if any(not 0 <= int(t) < cfg.vocab_size for t in prompt):
        raise DLMError(f"prompt token ids must be in [0, {cfg.vocab_size}); got {list(prompt)[:8]}...")


def _check_length(total: int, prompt: Sequence[int], config: DecodeConfig, cfg) -> None:
    """`total` positions (BOS + prompt + output, block models: to the end of the last block)."""
    if total > cfg.max_position_embeddings:
        raise DLMError(f"prompt ({len(prompt)} tokens) + max_new_tokens {config.max_new_tokens} exceed the "
                       f"model's context of {cfg.max_position_embeddings} positions; shorten the prompt or "
                       "generate fewer tokens")


def _cut_output(tokens: list[int], config: DecodeConfig, eos_id: int) -> tuple[list[int], str]:
    """The output: tokens before EOS or the first stop sequence, and why it ended."""
    end, reason = len(tokens), "length"
    if config.stop_at_eos and eos_id in tokens:
        end, reason = tokens.index(eos_id), "stop"
    text = tokens[:end]
    for s in config.stop:  # the earliest occurrence of any of them, whatever their order
        i = _find(text, list(s))
        if 0 <= i < end:
            end, reason = i, "stop"
    return tokens[:end], reason


_SCHEDULE = LogLinearSchedule()


class _KVSlab:
    """Clean-prefix K/V of many requests in one (slots, heads, T, head_dim) tensor per layer: a
    request's cached prefix sits at [0, done) of its slot, so a batched step gathers its rows with
    one index_select per layer (instead of copying each request's cache into a padded batch), and
    a finished block is written in place. Slots are reused; capacity grows on demand (slots
    doubling, T to the longest canvas seen, rounded up to 64)."""

    def __init__(self, num_layers: int):
        self.L = num_layers
        self.k: Optional[list[torch.Tensor]] = None
        self.v: Optional[list[torch.Tensor]] = None
        self.free: list[int] = []
        self.used = 0

    def acquire(self) -> int:
        if self.free:
            return self.free.pop()
        self.used += 1
        return self.used - 1

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def _grow(self, like: torch.Tensor, slots: int, length: int) -> None:
        S = 0 if self.k is None else self.k[0].shape[0]
        T = 0 if self.k is None else self.k[0].shape[2]
        if slots <= S and length <= T:
            return
        S2, T2 = max(S, slots, 2 * S if slots > S else 0), max(T, -(-length // 64) * 64)
        H, D = like.shape[1], like.shape[3]

        def grown(old):
            new = like.new_zeros(S2, H, T2, D)
            if old is not None:
                new[:S, :, :T] = old
            return new

        self.k = [grown(None if self.k is None else self.k[i]) for i in range(self.L)]
        self.v = [grown(None if self.v is None else self.v[i]) for i in range(self.L)]

    def write(self, slot: int, start: int, ks: list, vs: list) -> None:
        """Store per-layer (1, H, n, D) keys / values at [start, start + n) of `slot`."""
        n = ks[0].shape[2]
        self._grow(ks[0], slot + 1, start + n)
        for layer in range(self.L):
            self.k[layer][slot, :, start : start + n] = ks[layer][0]
            self.v[layer][slot, :, start : start + n] = vs[layer][0]

    def gather(self, slots: list[int], length: int, device, room: int = 0) -> tuple[list, list]:
        """Per layer, the slots' first `length` entries as (R, H, length + room, D); the last
        `room` entries are uninitialised."""
        idx = torch.tensor(slots, dtype=torch.long, device=device)
        out = ([], [])
        for src, dst in ((self.k, out[0]), (self.v, out[1])):
            for t in src:
                buf = t.new_empty(len(slots), t.shape[1], length + room, t.shape[3])
                torch.index_select(t[:, :, :length], 0, idx, out=buf[:, :, :length])
                dst.append(buf)
        return out


def _left_pad_cat(parts: list, length: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stack (1, H, n_i, D) tensors (None = empty) into (B, H, length, D), zero-padded on the left."""
    ref = next(p for p in parts if p is not None)
    out = ref.new_zeros(len(parts), ref.shape[1], length, ref.shape[3])
    for i, p in enumerate(parts):
        if p is not None and p.shape[2]:
            out[i, :, length - p.shape[2] :] = p[0]
    return out


def _find(seq: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return i
    return -1


# ------------------------------------------------------------------ the AR baseline
class ARRequest:
    """One AR request: BOS + prompt, its generated tokens, its own K/V cache and generator."""

    def __init__(self, rid, prompt, config: DecodeConfig, seed: int, decoder: "ARDecoder"):
        self.rid, self.config = rid, config
        self.prompt = [int(t) for t in prompt]
        self.tokens: list[int] = []
        self.gen = torch.Generator().manual_seed(int(seed) % 2**64)  # any int: torch takes [0, 2^64)
        self.chooser = TokenChooser(config, decoder.cfg.mask_token_id)
        self.cache = None
        self.nfe, self.t_forward = 0, 0.0
        self.t0 = time.perf_counter()
        self.finished, self.cancelled = False, False
        self.result: Optional[DecodeResult] = None

    def answer(self) -> list[int]:
        return list(self.tokens)


class ARDecoder:
    """The AR baseline behind the same interface as `Decoder` (`new_request` / `step` / `cancel`),
    so `dlm serve` and its scheduler serve it too: one token per request per step, greedy or
    sampled (temperature, top-k, top-p, Gumbel-max in float64 from the request's seed), KV
    cache, EOS and stop sequences. The diffusion options (blocks, unmask policy, caches, early
    commit) do not apply; requests step one forward each (vllm serve is the batched AR server)."""

    def __init__(self, model):
        self.model = model.eval()
        self.cfg = model.config
        if self.cfg.objective != "ar":
            raise DLMError("ARDecoder decodes AR models; use Decoder for diffusion models")
        self.device = next(model.parameters()).device

    def new_request(self, prompt: Sequence[int], config: DecodeConfig, seed: Optional[int] = None,
                    constraint=None, rid=None) -> ARRequest:
        cfg = self.cfg
        config.validate(None)
        if constraint is not None:
            raise DLMError("structured outputs (regex, JSON schema, choice, grammar) need a diffusion model; "
                           "this server runs the AR baseline")
        _check_prompt(prompt, cfg)
        _check_length(len(prompt) + 1 + config.max_new_tokens, prompt, config, cfg)
        return ARRequest(rid, prompt, config, config.seed if seed is None else seed, self)

    @torch.no_grad()
    def step(self, reqs: Sequence[ARRequest]) -> list[ARRequest]:
        work = [r for r in reqs if not r.finished]
        for r in work:
            try:
                self._step_one(r)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                if not r.finished:
                    self._finish(r, error=e)
        return work

    def _step_one(self, r: ARRequest) -> None:
        from dlm.model import KVCache

        t = time.perf_counter()
        if r.cache is None:  # prefill: BOS + prompt
            r.cache = KVCache(self.cfg.num_hidden_layers)
            ids = [self.cfg.bos_token_id, *r.prompt]
        else:
            ids = r.tokens[-1:]
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(x, is_causal=True, cache=r.cache).logits[0, -1:]
        r.nfe += 1
        r.t_forward += time.perf_counter() - t
        tok, _, _ = r.chooser.choose(logits, torch.zeros(1, dtype=torch.long), None, None, [r.gen])
        r.tokens.append(int(tok[0]))
        c = r.config
        done = len(r.tokens) >= c.max_new_tokens or (c.stop_at_eos and r.tokens[-1] == self.cfg.eos_token_id)
        if done or any(_find(r.tokens, list(s)) >= 0 for s in c.stop):
            self._finish(r)

    def cancel(self, req: ARRequest) -> None:
        if not req.finished:
            req.cancelled = True
            self._finish(req)

    def _finish(self, r: ARRequest, error: Optional[BaseException] = None) -> None:
        out, reason = _cut_output(r.tokens, r.config, self.cfg.eos_token_id)
        if r.cancelled:
            reason = "cancelled"
        if error is not None:
            out, reason = [], "error"
        wall = time.perf_counter() - r.t0
        r.result = DecodeResult(out, reason, {
            "nfe": r.nfe, "generated_tokens": len(out), "tokens_per_forward": len(out) / max(1, r.nfe),
            "wall_s": wall, "forward_s": r.t_forward, "other_s": wall - r.t_forward, "constraint_s": 0.0,
        }, error)
        r.finished, r.cache = True, None
