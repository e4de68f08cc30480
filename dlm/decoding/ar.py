"""The AR baseline behind the decoder's interface (`new_request` / `step` / `cancel`), so the
serving scheduler runs it too: one token per request per step with its own KV cache; greedy or
sampled (temperature, top-k, top-p, Gumbel-max in float64 from the request's seed); EOS and stop
sequences. The diffusion options (blocks, unmask policy, caches, early commit) do not apply.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from dlm.decoding.config import DecodeConfig
from dlm.decoding.engine import check_length, check_prompt
from dlm.decoding.sampling import TokenChooser
from dlm.decoding.state import DecodeResult
from dlm.decoding.stopping import cut_output, find
from dlm.errors import DLMError
from dlm.families import family_of

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
        self.family = family_of(self.cfg)
        if not self.family.autoregressive:
            raise DLMError("ARDecoder decodes AR models; use Decoder for diffusion models")
        self.device = next(model.parameters()).device
        self.isolate_failures = True  # a request whose forward fails fails alone (see Decoder)

    def new_request(self, prompt: Sequence[int], config: DecodeConfig, seed: Optional[int] = None,
                    constraint=None, rid=None) -> ARRequest:
        cfg = self.cfg
        config.validate(self.family, None)
        if constraint is not None:
            raise DLMError("structured outputs (regex, JSON schema, choice, grammar) need a diffusion model; "
                           "this server runs the AR baseline")
        check_prompt(prompt, cfg)
        check_length(len(prompt) + 1 + config.max_new_tokens, prompt, config, cfg)
        return ARRequest(rid, prompt, config, config.seed if seed is None else seed, self)

    @torch.no_grad()
    def step(self, reqs: Sequence[ARRequest]) -> list[ARRequest]:
        work = [r for r in reqs if not r.finished]
        for r in work:
            try:
                self._step_one(r)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                if not self.isolate_failures:  # (as Decoder: ranks in lockstep raise instead)
                    raise
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
        if done or any(find(r.tokens, list(s)) >= 0 for s in c.stop):
            self._finish(r)

    def cancel(self, req: ARRequest) -> None:
        if not req.finished:
            req.cancelled = True
            self._finish(req)

    def _finish(self, r: ARRequest, error: Optional[BaseException] = None) -> None:
        out, reason = cut_output(r.tokens, r.config, self.cfg.eos_token_id)
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
