"""The decoder: one loop for every diffusion model, batched across requests.

    dec = Decoder(model)
    results = dec.generate([[5, 6, 7], [9]], DecodeConfig(max_new_tokens=64, unmask="threshold"))
    results[0].tokens, results[0].finish_reason, results[0].stats

A step reads: advance (move past finished blocks, stop a request whose output is decided) ->
forward (each request's cache backend says which batched network call it needs) -> policy
(which masked positions of the block to commit) -> chooser (which tokens they take; a
constrained chooser keeps the canvas completable) -> commit. A serving scheduler keeps requests
(`new_request`) and calls `step` between admissions and departures. Works on token ids only.

Statistics per request: network calls (NFE), tokens per forward, wall time per phase, time spent
constraining.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from dlm.blocks import dense_as_flex_mask, use_flex
from dlm.decoding import caches
from dlm.decoding.config import DecodeConfig
from dlm.decoding.policies import StepView, Threshold, make_policy
from dlm.decoding.sampling import TokenChooser
from dlm.decoding.state import DecodeRequest, DecodeResult
from dlm.decoding.stopping import cut_output, decided
from dlm.errors import DLMError
from dlm.families import family_of


class Decoder:
    """Generate from a diffusion model (MDLM, RADD, BD3-LM, E2D2) for many requests at once.

    `generate` decodes a list of prompts; `new_request` / `step` / `cancel` let a scheduler run
    requests that join and leave at any step (every call advances each unfinished request by
    one network call, batched across requests)."""

    def __init__(self, model, chooser_factory=None, static_shapes: Optional[bool] = None):
        from dlm.noise import schedule_for

        self.model = model.eval()
        self.cfg = model.config
        self.family = family_of(self.cfg)
        if self.family.autoregressive:
            raise DLMError("the decoder is for diffusion models; AR models decode with ARDecoder (dlm serve does) "
                           "or HF generate (dlm export gives a LlamaForCausalLM)")
        self.device = next(model.parameters()).device
        self.schedule = schedule_for(self.cfg)
        self.chooser_factory = chooser_factory or (lambda config: TokenChooser(config, self.cfg.mask_token_id))
        self.objective = None
        if self.family.block_causal:
            from dlm.objectives import make_objective

            self.objective = make_objective(self.cfg)
        self.backends = caches.backends_for(self)
        # the exact cache's block steps in bucketed shapes (a model compiled for CUDA graphs, see
        # dlm.runtime.compile_model, asks for them); the same tokens either way
        self.static_shapes = bool(getattr(model, "static_shapes", False)) if static_shapes is None else static_shapes
        # the steps' attention masks as FlexAttention block masks when the model asks for Flex
        # (attention_backend "flex"; it then skips the padding tiles of a batch's shorter caches),
        # dense for SDPA otherwise: "auto" too (Flex in decode steps gives SDPA's tokens, tested,
        # but its speed has not been measured on a GPU) and in bucketed shapes (CUDA graphs)
        with torch.no_grad():
            self.flex = (getattr(self.cfg, "attention_backend", "auto") == "flex" and use_flex("flex", self.device)
                         and not self.static_shapes)
        # a failed batched forward is retried request by request, so only the failing one fails;
        # off when ranks must make the same calls (serving/lockstep.py): the failure is raised
        self.isolate_failures = True

    def attention_mask(self, mask: Optional[torch.Tensor], q_len: int):
        """A step's dense boolean attention mask (None: attend everywhere) as this decoder's
        attention kernel takes it, for `q_len` queries."""
        if mask is None or not self.flex:
            return mask
        return dense_as_flex_mask(mask, q_len)

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
        config = config or DecodeConfig.for_family(self.family, self.cfg.block_size)
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
        config.validate(self.family, cfg.block_size)
        check_prompt(prompt, cfg)
        chooser = self.chooser_factory(config)
        if constraint is not None:
            from dlm.constraints import ConstrainedChooser

            chooser = ConstrainedChooser(chooser, constraint, eos_id=cfg.eos_token_id)
        backend = self.backends[self.family.resolve_cache(config.cache)]
        req = DecodeRequest(rid, prompt, config, config.seed if seed is None else seed, chooser,
                            make_policy(config, cfg.mask_token_id), backend, self)
        check_length(req.total, prompt, config, cfg)
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
            r.policy.before_forward(r, self)
            if r.changed or r.prev_logits is None or self.cfg.time_conditioning:
                need.append(r)
            else:  # nothing changed since the last call (ancestral step): reuse its output
                r.logits = r.prev_logits
        try:
            self._forward(need)
        except Exception:  # find whose forward fails: each request alone
            if not self.isolate_failures:
                raise
            for r in need:
                self._guarded(r, lambda r: self._forward([r]))
            work = [r for r in work if not r.finished]
        fast = [r for r in work if Threshold.batchable(r)]
        batched = set()
        if fast:
            try:
                Threshold.commit_batched(fast, self.cfg.mask_token_id)
                batched = {id(r) for r in fast}
            except Exception:  # each on its own below, failures isolated
                pass
        for r in work:
            r.prev_logits = r.logits
            if id(r) not in batched:
                self._guarded(r, self._commit)
        self._to_host(work)
        return work

    def cancel(self, req: DecodeRequest) -> None:
        """Stop a request now (e.g. its client went away); its caches are freed."""
        if not req.finished:
            req.cancelled = True
            self._finish(req)

    # -------------------------------------------------------------- per request
    def _guarded(self, r: DecodeRequest, fn):
        """fn(r); if it raises, r fails alone (finish_reason "error") and the result is None."""
        try:
            return fn(r)
        except Exception as e:  # noqa: BLE001 - recorded on the request, raised by generate()
            if not r.finished:
                self._finish(r, error=e)
            return None

    def _to_host(self, reqs: list[DecodeRequest]) -> None:
        """The step's one host sync: the stepped requests' canvases copied to the host at once
        (`r.host`), which the next step's checks, streaming (`answer`) and the result read.
        `r.changed`: did this step change the canvas (commits, or an early-commit fill)."""
        reqs = [r for r in reqs if not r.finished]
        if not reqs:
            return
        flat = torch.cat([r.canvas for r in reqs]).tolist()
        i = 0
        for r in reqs:
            new = flat[i : i + r.total]
            i += r.total
            r.changed, r.host = new != r.host, new

    def _advance(self, r: DecodeRequest) -> bool:
        """Move past finished blocks; finish the request when it is done. True if it has work.
        Reads the host copy of the canvas (no device sync)."""
        mask_id = self.cfg.mask_token_id
        while True:
            if r.bi >= len(r.blocks):
                self._finish(r)
                return False
            lo, hi = r.block
            # A request whose decided prefix already fixes the output stops, even mid-block:
            # what follows is cut from the output anyway.
            if decided(r.host[r.P : hi], r.config, self.cfg.eos_token_id, mask_id):
                self._finish(r)
                return False
            if mask_id in r.host[lo:hi] and r.s_in_block < r.block_steps * 4 + (hi - lo):
                return True
            r.bi += 1
            r.s_in_block = 0
            r.changed, r.prev_logits = True, None

    def _finish(self, r: DecodeRequest, error: Optional[BaseException] = None) -> None:
        gen = r.host[r.P : r.P + r.N]
        out, reason = cut_output(gen, r.config, self.cfg.eos_token_id)
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
        r.backend.release(r)
        r.cache, r.prev_logits, r.logits = r.backend.new_state(), None, None

    def _commit(self, r: DecodeRequest) -> None:
        """The policy decides which masked positions of the block commit, the chooser which tokens."""
        mask_id, chooser = self.cfg.mask_token_id, r.chooser
        lo, hi = r.block
        canvas = r.canvas
        logits = r.logits  # (W, V): canvas columns [lo, lo + W)
        cols = (canvas[lo:hi] == mask_id).nonzero(as_tuple=True)[0]
        r.step_i += 1
        blk_logits = logits[cols]
        rows = torch.zeros(cols.numel(), dtype=torch.long)
        view = canvas[None]
        tokens, conf, probs = chooser.choose(blk_logits, rows, (lo + cols).cpu(), view, [r.gen])

        def try_fill() -> bool:
            """Every mask in the fed view takes its argmax at once (a constrained chooser fills
            validly or refuses)."""
            mcols = (canvas[lo : lo + logits.shape[0]] == mask_id).nonzero(as_tuple=True)[0]
            fill = chooser.fill(0, (lo + mcols).cpu(), logits[mcols], view)
            if fill is None:
                return False
            canvas[lo + mcols] = fill.to(canvas.device)
            return True

        bsteps, s = r.block_steps, r.s_in_block
        decision = r.policy.decide(StepView(
            conf=conf, probs=probs, logits=blk_logits, generator=r.gen, steps_left=max(1, bsteps - s),
            t=(bsteps - s) / bsteps, s=(bsteps - s - 1) / bsteps, schedule=self.schedule,
            progress=r.step_i / max(1, r.steps_total), try_fill=try_fill))
        if decision.tokens is not None:
            tokens = decision.tokens
        commit, tokens = chooser.assign(rows, (lo + cols).cpu(), decision.commit, tokens, view)
        if bool(commit.any()):
            canvas[lo + cols[commit.to(cols.device)]] = tokens[commit].to(canvas.device)
        r.s_in_block += 1

    # -------------------------------------------------------------- network (batched)
    def _forward(self, reqs: list[DecodeRequest]) -> None:
        """Set r.logits for every request: one call per group of requests that need the same
        kind of forward (their cache backends say which)."""
        groups: dict[tuple, list[DecodeRequest]] = {}
        for r in reqs:
            groups.setdefault(r.backend.key(r), []).append(r)
        for key, group in groups.items():
            tf = time.perf_counter()
            caches.forward(self, key, group)
            dt = time.perf_counter() - tf
            for r in group:
                r.nfe += 1
                r.t_forward += dt

    def sigma(self, group: list[DecodeRequest]):
        """Noise level for a time-conditioned network: the time each request's policy names
        (first hitting: its sampled hitting time), else the masked fraction of its answer."""
        if not self.cfg.time_conditioning:
            return None
        mask_id = self.cfg.mask_token_id
        times = []
        for r in group:
            t = r.policy.noise_time(r)
            times.append(torch.tensor(t, dtype=torch.float32, device=self.device) if t is not None
                         else (r.canvas[r.P :] == mask_id).float().mean())
        return self.schedule.sigma(torch.stack(times).clamp(min=1e-3))


def check_prompt(prompt: Sequence[int], cfg) -> None:
    if len(prompt) == 0:
        raise DLMError("a prompt is empty; give at least one token")
    if any(not 0 <= int(t) < cfg.vocab_size for t in prompt):
        raise DLMError(f"prompt token ids must be in [0, {cfg.vocab_size}); got {list(prompt)[:8]}...")


def check_length(total: int, prompt: Sequence[int], config: DecodeConfig, cfg) -> None:
    """`total` positions (BOS + prompt + output, block models: to the end of the last block)."""
    if total > cfg.max_position_embeddings:
        raise DLMError(f"prompt ({len(prompt)} tokens) + max_new_tokens {config.max_new_tokens} exceed the "
                       f"model's context of {cfg.max_position_embeddings} positions; shorten the prompt or "
                       "generate fewer tokens")
