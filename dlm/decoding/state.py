"""What a decoder keeps per request: the canvas and its blocks, counters, the request's own
policy, chooser and generator, and one typed state per cache backend; and the result.

A request's canvas is BOS + prompt + N masks (no padding). Bidirectional models decode it in
semi-autoregressive blocks of `block_length` (the whole answer by default); block-causal models
always use their own block size, aligned to absolute positions, and decode to the end of the
last block (the tokens past the answer are not reported).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class DecodeResult:
    tokens: list[int]  # generated tokens, cut before EOS / a stop sequence
    finish_reason: str  # "stop" (EOS or a stop sequence), "length", "cancelled" or "error"
    stats: dict = field(default_factory=dict)
    error: Optional[BaseException] = None  # finish_reason "error": what failed (this request only)


# ------------------------------------------------------------------ cache states (caches.py)
@dataclass
class NoCacheState:
    """cache none: nothing kept between steps."""


@dataclass
class ApproxCacheState:
    """prefix / dual (Fast-dLLM): the K/V of the whole canvas from the block's refresh, and the
    kept part of it (everything but the fed columns) gathered once per block."""

    kv: Any = None  # dlm.model.KVCache of the whole canvas
    view: Optional[tuple] = None  # (keys, values) per layer without the fed columns
    view_key: Optional[tuple] = None  # (block start, fed width) the view was gathered for


@dataclass
class BlockExactState:
    """exact, block-causal (BD3-LM): the clean prefix [0, clean_len) lives in a K/V slab slot."""

    slot: Optional[int] = None
    clean_len: int = 0
    # a family whose logits come one position late: the logits of the current block's first
    # position, from the last clean position before it (fixed once that block is clean)
    carry: Optional[torch.Tensor] = None


@dataclass
class EncoderExactState:
    """exact, encoder-decoder (E2D2): the encoder's K/V and output states of the clean prefix."""

    kv: Any = None
    memory: Optional[torch.Tensor] = None
    clean_len: int = 0


# ------------------------------------------------------------------ the request
class DecodeRequest:
    """One request's decoding state. The decoder steps many of these together; they may start
    at different times, have different prompt lengths, policies and block positions, and leave
    as soon as they finish."""

    def __init__(self, rid, prompt, config, seed: int, chooser, policy, backend, decoder):
        cfg = decoder.cfg
        self.rid, self.config, self.chooser, self.policy, self.backend = rid, config, chooser, policy, backend
        self.prompt = [int(t) for t in prompt]
        N = config.max_new_tokens
        prefix = decoder.family.prefix(self.prompt, cfg.bos_token_id)  # BOS + prompt (dlm's own models)
        P = len(prefix)
        total = decoder.family.canvas_length(P, N, cfg.block_size)
        if decoder.family.block_causal:  # the model's blocks, or sub-blocks of them (block_length)
            bs = config.block_length or cfg.block_size
            self.blocks = [(max(P, b * bs), (b + 1) * bs) for b in range(P // bs, total // bs)]
        else:
            bs = config.block_length or N
            self.blocks = [(P + i * bs, P + (i + 1) * bs) for i in range(math.ceil(N / bs))]
        self.P, self.N, self.total, self.gen_len = P, N, total, total - P
        # the canvas on the model's device, and its copy on the host as of the last step's end
        # (the decoder's one sync per step: its checks, streaming and `changed` read the copy)
        self.host = list(prefix) + [cfg.mask_token_id] * (total - P)
        self.canvas = torch.tensor(self.host, dtype=torch.long, device=decoder.device)
        self.gen = torch.Generator().manual_seed(int(seed) % 2**64)  # any int: torch takes [0, 2^64)
        self.steps_total = config.steps or self.gen_len  # fixed-k policies: spread over blocks
        self.bi, self.s_in_block, self.step_i = 0, 0, 0
        self.cache = backend.new_state()
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

    def masked_columns(self, start: int, n: int, mask_id: int) -> list[int]:
        """The offsets k in [0, n) whose canvas column start + k is masked, read from the host
        copy (no device read): where a step's logits are needed."""
        host = self.host
        return [k for k in range(min(n, self.total - start)) if host[start + k] == mask_id]

    def answer(self) -> list[int]:
        """The answer region (MASK where still undecided), as of the last step."""
        return self.host[self.P : self.P + self.N]
