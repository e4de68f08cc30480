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
  ancestral step: each mask is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t)).
* Early commit (`early_commit`): Prophet's rule. The mean top-1 / top-2 logit gap over the
  masked positions of the scope, against thresholds that fall as decoding progresses; when it
  passes, every remaining mask of the scope ("block" or "answer") takes its argmax at once.
* Sampling: greedy (temperature 0), temperature, top-k, top-p; Gumbel-max in float64 with one
  generator per request, so a request's output depends only on its own seed.
* Chooser hook: `TokenChooser.choose(logits, ...)` turns logits at masked positions into
  (token, confidence); a grammar-constrained chooser replaces the default one.
* Stopping: max_new_tokens; EOS (a row stops once a finished block contains EOS, and
  nothing after EOS is output); stop token sequences.
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
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    stats: dict = field(default_factory=dict)


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
        logits = logits.double().clone()
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

    def keep_rows(self, keep: list[int]) -> None:
        """Rows `keep` of the batch stay (finished ones leave)."""

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
class Decoder:
    """Generate from a diffusion model (MDLM, RADD, BD3-LM, E2D2) for a batch of prompts."""

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

    # -------------------------------------------------------------- network
    def _full_logits(self, canvas: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits (B, L, V) of the whole canvas (rows left-padded: position -1)."""
        if self.block_model:
            out_pos = torch.ones_like(canvas, dtype=torch.bool)
            return self.objective.masked_logits(self.model, canvas, canvas, None, out_pos).view(*canvas.shape, -1)
        am = (positions >= 0).long()
        return self.model(canvas, attention_mask=None if bool(am.all()) else am,
                          position_ids=positions.clamp(min=0), cache=cache, sigma=self._sigma(canvas)).logits

    def _sigma(self, canvas):
        """Noise level for time-conditioned MDLM: t = the masked fraction of the answer region."""
        if not self.cfg.time_conditioning:
            return None
        region = canvas[:, self._answer_start:]
        t = (region == self.cfg.mask_token_id).float().mean(-1).clamp(min=1e-3)
        return LogLinearSchedule().sigma(t)

    def _block_logits(self, st: dict, canvas, positions, lo: int, hi: int, refresh: bool) -> torch.Tensor:
        """Logits for canvas columns [lo, END) where END = hi for dual / exact caches and the end
        of the canvas otherwise (answer-scope early commit reads past the block)."""
        mode = st["mode"]
        if mode == "none":
            return self._full_logits(canvas, positions)[:, lo:]
        if mode in ("prefix", "dual"):
            if refresh:  # one full forward; keep every layer's K/V of the whole canvas
                from dlm.model import KVCache

                st["kv"] = KVCache(self.cfg.num_hidden_layers)
                return self._full_logits(canvas, positions, cache=st["kv"])[:, lo:]
            return self._cached_step(st, canvas, positions, lo, hi if mode == "dual" else canvas.shape[1])
        return self._exact_step(st, canvas, lo, hi)

    def _cached_step(self, st: dict, canvas, positions, lo: int, hi: int) -> torch.Tensor:
        """Feed columns [lo, hi) only; the other columns' keys/values come from the last refresh
        (approximate: they were computed when the fed tokens had other values)."""
        from dlm.model import KVCache

        if st.get("view_key") != (id(st["kv"]), lo, hi):  # gather the kept K/V once per block
            kv = st["kv"]
            view = KVCache(len(kv.k))
            view.k = [torch.cat([k[:, :, :lo], k[:, :, hi:]], dim=2) for k in kv.k]
            view.v = [torch.cat([v[:, :, :lo], v[:, :, hi:]], dim=2) for v in kv.v]
            view.commit = False
            st["view"], st["view_key"] = view, (id(kv), lo, hi)
        view = st["view"]
        am = (positions >= 0).long()
        key_am = torch.cat([am[:, :lo], am[:, hi:], am[:, lo:hi]], dim=1)
        out = self.model(canvas[:, lo:hi], attention_mask=None if bool(key_am.all()) else key_am,
                         position_ids=positions[:, lo:hi].clamp(min=0), cache=view, sigma=self._sigma(canvas))
        return out.logits

    def _exact_step(self, st: dict, canvas, lo: int, hi: int) -> torch.Tensor:
        """Block models: encode finished clean blocks once, then feed only the current block."""
        from dlm.model import KVCache

        bs = self.cfg.block_size
        b0 = (lo // bs) * bs  # the block's first column (the prompt may fill its beginning)
        dev = canvas.device
        done = st.setdefault("clean_len", 0)
        if done < b0:  # append clean blocks [done, b0): block-causal among themselves, see all cached
            new = canvas[:, done:b0]
            n = b0 - done
            blk = torch.arange(done, b0, device=dev) // bs
            mask = torch.cat([torch.ones(n, done, dtype=torch.bool, device=dev), blk[None, :] <= blk[:, None]], dim=1)
            pos = torch.arange(done, b0, device=dev)
            if self.cfg.objective == "e2d2":
                st.setdefault("enc", KVCache(self.cfg.num_hidden_layers))
                states = self.model.encode(new, attn_mask=mask, position_ids=pos, cache=st["enc"])
                st["memory"] = states if done == 0 else torch.cat([st["memory"], states], dim=1)
            else:
                st.setdefault("kv", KVCache(self.cfg.num_hidden_layers))
                st["kv"].commit = True
                self.model(new, position_ids=pos, attn_mask=mask, cache=st["kv"])
            st["clean_len"] = b0
        block = canvas[:, b0 : b0 + bs]
        pos = torch.arange(b0, b0 + bs, device=dev)
        if self.cfg.objective == "e2d2":
            if b0 == 0:
                mem = torch.zeros(block.shape[0], 0, self.cfg.hidden_size, device=dev, dtype=self.model.dtype)
            else:
                mem = st["memory"]
            logits = self.model.decode(block, mem, torch.arange(b0, device=dev), position_ids=pos).logits
        else:
            kv = st.get("kv")
            if kv is not None:
                kv.commit = False  # the noisy block's K/V must not persist
            logits = self.model(block, position_ids=pos, cache=kv).logits
        return logits[:, lo - b0 : hi - b0]

    # -------------------------------------------------------------- public
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], config: Optional[DecodeConfig] = None,
                 seeds: Optional[Sequence[int]] = None, on_step=None,
                 constraints: Optional[Sequence] = None) -> list[DecodeResult]:
        """Decode every prompt. `seeds[i]` (default config.seed + i) seeds request i alone.
        `on_step(rows, answers)`, if given, is called after every network call with the request
        indices and their answer regions (token lists, MASK where still undecided): for progress
        displays and streaming. `constraints[i]` (a `dlm.constraints.CompiledConstraint` or None)
        constrains request i's output to a regular or context-free language."""
        config = config or DecodeConfig()
        if not prompts:
            return []
        if constraints is not None and len(constraints) != len(prompts):
            raise DLMError(f"{len(constraints)} constraints for {len(prompts)} prompts; give one per prompt (or None)")
        if self.block_model:
            # Block models place blocks at absolute positions: rows batch together only when their
            # prompts have the same length (the scheduler groups them); others run one group each.
            groups: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                groups.setdefault(len(p), []).append(i)
            results: list[Optional[DecodeResult]] = [None] * len(prompts)
            for idx in groups.values():
                sub = self._generate([prompts[i] for i in idx], config,
                                     [seeds[i] if seeds else config.seed + i for i in idx], on_step, idx,
                                     [constraints[i] for i in idx] if constraints is not None else None)
                for i, r in zip(idx, sub):
                    results[i] = r
            return results  # type: ignore[return-value]
        return self._generate(prompts, config, [seeds[i] if seeds else config.seed + i for i in range(len(prompts))],
                              on_step, list(range(len(prompts))), constraints)

    def _generate(self, prompts, config: DecodeConfig, seeds, on_step=None, ids=None,
                  constraints=None) -> list[DecodeResult]:
        cfg, dev = self.cfg, self.device
        N = config.max_new_tokens
        config.validate(cfg.block_size if self.block_model else None)
        for p in prompts:
            if len(p) == 0:
                raise DLMError("a prompt is empty; give at least one token (BOS is added in front)")
            if any(not 0 <= int(t) < cfg.vocab_size for t in p):
                raise DLMError(f"prompt token ids must be in [0, {cfg.vocab_size}); got {list(p)[:8]}...")
        t0 = time.perf_counter()
        B = len(prompts)
        P = max(len(p) for p in prompts) + 1  # BOS + prompt, left-padded to the longest
        if self.block_model:
            bs = cfg.block_size
            total = -(-(P + N) // bs) * bs
            gen_len = total - P  # generate to the end of the last block, report N
        else:
            bs = config.block_length or N
            gen_len = N
            total = P + N
        if total > cfg.max_position_embeddings:
            raise DLMError(f"prompt ({P - 1} tokens) + max_new_tokens {N} exceed the model's context of "
                           f"{cfg.max_position_embeddings} positions; shorten the prompt or generate fewer tokens")
        mask_id = cfg.mask_token_id
        canvas = torch.full((B, total), mask_id, dtype=torch.long, device=dev)
        positions = torch.full((B, total), -1, dtype=torch.long, device=dev)
        pad = torch.zeros(B, dtype=torch.long)
        for r, p in enumerate(prompts):
            row = [cfg.bos_token_id, *map(int, p)]
            pad[r] = P - len(row)
            canvas[r, pad[r] : P] = torch.tensor(row, device=dev)
            canvas[r, : pad[r]] = cfg.pad_token_id
            positions[r, pad[r]:] = torch.arange(total - int(pad[r]), device=dev)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        chooser = self.chooser_factory(config)
        if constraints is not None and any(c is not None for c in constraints):
            from dlm.constraints import ConstrainedChooser

            chooser = ConstrainedChooser(chooser, constraints, eos_id=cfg.eos_token_id)
        chooser.begin(P, N, canvas)
        sched = LogLinearSchedule()

        # Blocks over the generated region, as column ranges of the canvas.
        if self.block_model:
            blocks = [(max(P, b * bs), (b + 1) * bs) for b in range(P // bs, total // bs)]
        else:
            blocks = [(P + i * bs, P + (i + 1) * bs) for i in range(math.ceil(N / bs))]
        # Fixed-k policies: total steps spread over blocks; default one token per step.
        steps_total = config.steps or gen_len
        done = torch.zeros(B, dtype=torch.bool)
        nfe, step_i = 0, 0
        t_forward = 0.0
        st = {"mode": config.cache}
        self._answer_start = P
        prev_logits = None
        row_of = list(range(B))  # current row -> request index (finished rows leave the batch)
        finished: dict[int, torch.Tensor] = {}
        ids = list(ids) if ids is not None else list(range(B))
        for lo, hi in blocks:
            if bool(done.all()):
                break
            width = hi - lo
            block_steps = max(1, round(steps_total * width / gen_len))
            changed = True
            for s_in_block in range(block_steps * 4 + width):  # generous cap; each step commits >= 1 (or ancestral)
                region = canvas[:, lo:hi].clone()
                masked = (region == mask_id) & ~done[:, None].to(dev)
                if not bool(masked.any()):
                    break
                if changed or prev_logits is None or cfg.time_conditioning:
                    tf = time.perf_counter()
                    logits = self._block_logits(st, canvas, positions, lo, hi, refresh=s_in_block == 0)
                    t_forward += time.perf_counter() - tf
                    nfe += 1
                else:  # nothing changed since the last call (ancestral step): reuse its output
                    logits = prev_logits
                prev_logits = logits
                step_i += 1
                rows, cols = masked.nonzero(as_tuple=True)
                blk_logits = logits[rows, cols]
                tokens, conf, probs = chooser.choose(blk_logits, rows.cpu(), (lo + cols).cpu(), canvas, gens)
                commit = torch.zeros_like(rows, dtype=torch.bool)
                progress = step_i / max(1, steps_total)
                for r in rows.unique().tolist():
                    sel = rows == r
                    idx = sel.nonzero(as_tuple=True)[0]
                    if config.early_commit:
                        gap = prophet_gap(blk_logits[idx])
                        if gap >= prophet_threshold(progress, config.early_commit_gaps):
                            if config.early_commit_scope == "answer":
                                # fill every mask of the answer with its argmax in this one step
                                # (dual / exact caches see the block only: they fill the block)
                                # (a constrained chooser fills validly or refuses: then no early commit)
                                mcols = (canvas[r, lo : lo + logits.shape[1]] == mask_id).nonzero(as_tuple=True)[0]
                                fill = chooser.fill(r, lo + mcols, logits[r, mcols], canvas)
                                if fill is not None:
                                    canvas[r, lo + mcols] = fill.to(canvas.device)
                                    commit[idx] = False
                                    continue
                            commit[idx] = True
                            tokens[idx] = blk_logits[idx].double().index_fill(
                                -1, torch.tensor([mask_id], device=blk_logits.device), float("-inf")).argmax(-1)
                            continue
                    commit[idx] = self._select(config, conf[idx], probs[idx], blk_logits[idx], gens[r],
                                               n_masked=idx.numel(), steps_left=max(1, block_steps - s_in_block),
                                               t=(block_steps - s_in_block) / block_steps,
                                               s=(block_steps - s_in_block - 1) / block_steps, sched=sched)
                commit, tokens = chooser.assign(rows.cpu(), (lo + cols).cpu(), commit, tokens, canvas)
                if bool(commit.any()):
                    canvas[rows[commit], lo + cols[commit]] = tokens[commit].to(canvas.device)
                changed = bool((canvas[:, lo:hi] != region).any())  # commits or an early-commit fill
                if on_step is not None:
                    on_step(ids, canvas[:, P : P + N].tolist())
            # Rows whose finished block holds EOS (or a stop sequence) stop generating.
            for r in range(canvas.shape[0]):
                if not done[r] and self._stopped(canvas[r, P:hi].tolist(), config):
                    done[r] = True
            if bool(done.any()) and not bool(done.all()):
                # Finished rows leave the batch: later blocks cost only what is still running.
                for r in done.nonzero(as_tuple=True)[0].tolist():
                    finished[row_of[r]] = canvas[r].clone()
                keep = (~done).nonzero(as_tuple=True)[0]
                kd = keep.to(dev)
                canvas, positions, pad = canvas[kd], positions[kd], pad[keep]
                gens = [gens[i] for i in keep.tolist()]
                row_of = [row_of[i] for i in keep.tolist()]
                ids = [ids[i] for i in keep.tolist()]
                done = done[keep]
                _keep_rows(st, kd)
                chooser.keep_rows(keep.tolist())
                prev_logits = None
        for r in range(canvas.shape[0]):
            finished[row_of[r]] = canvas[r]
        wall = time.perf_counter() - t0
        results = []
        for r in range(B):
            gen = finished[r][P : P + N].tolist()
            out, reason = self._cut(gen, config)
            results.append(DecodeResult(out, reason, {
                "nfe": nfe, "generated_tokens": len(out), "tokens_per_forward": len(out) / max(1, nfe),
                "wall_s": wall, "forward_s": t_forward, "other_s": wall - t_forward,
                "constraint_s": chooser.elapsed,
            }))
        return results

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
        mask_id = self.cfg.mask_token_id
        if mask_id in tokens:  # only a fully decoded prefix can stop the row
            tokens = tokens[: tokens.index(mask_id)]
        if config.stop_at_eos and self.cfg.eos_token_id in tokens:
            return True
        return any(_find(tokens, list(s)) >= 0 for s in config.stop)

    def _cut(self, tokens: list[int], config: DecodeConfig) -> tuple[list[int], str]:
        end, reason = len(tokens), "length"
        if config.stop_at_eos and self.cfg.eos_token_id in tokens:
            end, reason = tokens.index(self.cfg.eos_token_id), "stop"
        for s in config.stop:
            i = _find(tokens[:end], list(s))
            if i >= 0:
                end, reason = i, "stop"
        return tokens[:end], reason


def _keep_rows(st: dict, keep: torch.Tensor) -> None:
    """Keep only rows `keep` of every cached tensor in the decoding state."""
    for key in ("kv", "enc"):
        cache = st.get(key)
        if cache is not None:
            cache.k = [None if k is None else k[keep] for k in cache.k]
            cache.v = [None if v is None else v[keep] for v in cache.v]
    if st.get("memory") is not None:
        st["memory"] = st["memory"][keep]
    st.pop("view", None)
    st.pop("view_key", None)


def _find(seq: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return i
    return -1
