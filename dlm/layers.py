"""The layers of the dlm backbone: norms, rotary positions, the K/V cache, attention (any mask,
grouped-query, optional q/k norms, packed rows), the MLPs, the transformer block with optional
adaLN modulation, and the noise-level embedding. dlm/model.py assembles them into DLMModel."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused kernel, the same arithmetic
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 for bf16 stability, as LLaMA does (the weight applied after the
        # cast back, as Llama's reference does).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (the DiT of MDLM / BD3-LM)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return self.weight * F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)


def make_norm(config, dim: int) -> nn.Module:
    return LayerNorm(dim) if config.norm_type == "layer" else RMSNorm(dim, config.rms_norm_eps)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for `position_ids` (B, L) -> (B, 1, L, head_dim), Llama's half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, L, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Per-layer key/value store used by samplers and the decoder.

    `update(layer, k, v)` returns the keys/values to attend over. In append mode (the default)
    new entries are concatenated after the stored ones and kept; with `commit=False` they are
    used for this call only (a diffusion step that must not persist its noisy block).
    """

    def __init__(self, num_layers: int):
        self.k: list[Optional[torch.Tensor]] = [None] * num_layers
        self.v: list[Optional[torch.Tensor]] = [None] * num_layers
        self.commit = True
        self.used: Optional[int] = None  # preallocated: see `preallocated`

    @classmethod
    def preallocated(cls, k: list, v: list, used: int) -> "KVCache":
        """A cache for one call whose per-layer tensors already have room after their first `used`
        entries: `update` writes the new keys / values there (no concatenation copy) and returns
        the first used + L entries; the tensors then hold them."""
        cache = cls(len(k))
        cache.k, cache.v, cache.used = list(k), list(v), used
        return cache

    @property
    def length(self) -> int:
        if self.used is not None:
            return self.used
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.used is not None:
            end = self.used + k.shape[2]
            if end > self.k[layer].shape[2]:
                raise ValueError(f"preallocated cache has room for {self.k[layer].shape[2] - self.used} new entries, got {k.shape[2]}")
            self.k[layer][:, :, self.used : end] = k
            self.v[layer][:, :, self.used : end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if self.k[layer] is not None:
            k_all = torch.cat([self.k[layer], k], dim=2)
            v_all = torch.cat([self.v[layer], v], dim=2)
        else:
            k_all, v_all = k, v
        if self.commit:
            self.k[layer], self.v[layer] = k_all, v_all
        return k_all, v_all

    def crop(self, length: int) -> None:
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i] = self.k[i][:, :, :length]
                self.v[i] = self.v[i][:, :, :length]


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.layer_idx = layer_idx
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.o_proj._dlm_residual = True
        # per-head RMSNorm of queries and keys before the rotation (Qwen3 / SDAR)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None

    def _kv(self, x, cos, sin):
        B, L, _ = x.shape
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, attn_mask=None, is_causal=False, cache: Optional[KVCache] = None, memory=None,
                pack=None, keep=None):
        """memory: optional (states, cos, sin) of other tokens (E2D2's encoder output, already
        normalised) whose keys/values go *before* this sequence's own; queries come from x only.
        pack: optional `Packing`: x holds only the valid tokens of a padded (B, L) batch, as one
        row (see `DLMModel.forward(query_valid=...)`); attention runs on the padded layout.
        keep: optional row-major indices into x's tokens: the output projection only there,
        returned flattened (N, D) (the last layer, when only some positions get logits).
        Keys and values keep their own (fewer) heads in caches; attention shares them out."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rotary(q, cos, sin)
        k, v = self._kv(x, cos, sin)
        if pack is not None:
            q, k, v = pack.unpack(q), pack.unpack(k), pack.unpack(v)
            B, L = pack.B, pack.L
        if memory is not None:
            mk, mv = self._kv(*memory)
            k, v = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.n_kv != self.n_heads
        if _is_block_mask(attn_mask):
            y = _flex_attention()(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
        elif gqa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, L, -1)
        if pack is not None:
            y = pack.repack(y)
        if keep is not None:
            y = y.reshape(-1, y.shape[-1]).index_select(0, keep)
        return self.o_proj(y)


class Packing:
    """The valid tokens of a padded (B, L) batch, packed into one row of T tokens: the per-token
    layers (projections, MLP, norms, rotary) run on the T tokens only, attention on the padded
    layout. A batch whose rows need different lengths (the decoder's batched block steps) then
    costs its real tokens, not B times its longest row.

    `Packing(valid)` from a boolean (B, L) mask finds the tokens on the device (a host sync);
    `Packing.left_padded(B, L, starts, device)` builds them from host numbers (no sync)."""

    def __init__(self, valid: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None,
                 shape: Optional[tuple[int, int]] = None):
        if valid is not None:
            self.B, self.L = valid.shape
            self.index = valid.reshape(-1).nonzero().squeeze(1)
        else:
            self.B, self.L = shape
            self.index = index

    @classmethod
    def left_padded(cls, B: int, L: int, starts: list[int], device) -> "Packing":
        """Row i's valid tokens are its columns [starts[i], L)."""
        from dlm.runtime import to_device

        idx = [i * L + j for i, s in enumerate(starts) for j in range(s, L)]
        return cls(index=to_device(idx, device), shape=(B, L))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (1, T, ...)."""
        return t.reshape(self.B * self.L, *t.shape[2:]).index_select(0, self.index)[None]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(1, heads, T, d) -> (B, heads, L, d), zeros at the padding."""
        _, h, _, d = t.shape
        out = t.new_zeros(self.B * self.L, h, d).index_copy_(0, self.index, t[0].transpose(0, 1))
        return out.view(self.B, self.L, h, d).transpose(1, 2)

    def repack(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (1, T, D)."""
        return y.reshape(self.B * self.L, -1).index_select(0, self.index)[None]


def _is_block_mask(mask) -> bool:
    return mask is not None and type(mask).__name__ == "BlockMask"


_FLEX = {}


def _flex_attention():
    """flex_attention, compiled once on CUDA (fused kernels); eager elsewhere (reference path).
    Automatic dynamic shapes: training's fixed shape compiles once; the decoder's steps, whose
    cache lengths grow, recompile once into a shape-generic kernel rather than once per length."""
    if "fn" not in _FLEX:
        import warnings

        from torch.nn.attention.flex_attention import flex_attention

        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if torch.cuda.is_available():
            from dlm.runtime import raise_recompile_limit

            raise_recompile_limit(64)  # decode steps: a few mask variants x dynamic lengths
        _FLEX["fn"] = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention
    return _FLEX["fn"]


class MLP(nn.Module):
    """SwiGLU (Llama: down(silu(gate(x)) * up(x))), or GELU-tanh (the DiT: down(gelu(up(x))))."""

    def __init__(self, config):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gelu = config.mlp_type == "gelu"
        self.gate_proj = None if self.gelu else nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.down_proj._dlm_residual = True

    def forward(self, x):
        if self.gelu:
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = MLP(config)
        # adaLN (DiT / MDLM): shift, scale, gate for each sub-layer, zero-initialised so a
        # time-conditioned model starts identical to an unconditioned one.
        self.adaLN = nn.Linear(config.cond_dim, 6 * config.hidden_size) if config.adaln else None
        if self.adaLN is not None:
            self.adaLN._dlm_zero_init = True

    def forward(self, x, cos, sin, attn_mask=None, is_causal=False, cond=None, cache=None, memory=None, pack=None,
                keep=None):
        """keep: optional row-major indices into x's tokens: every token's keys and values (the
        cache gets them all), the rest of the layer only at those, returned flattened (N, D)
        (the last layer when only some positions get logits; not with adaLN)."""
        if memory is not None:  # (states, cos, sin): normalised like this layer's own input
            memory = (self.input_layernorm(memory[0]), memory[1], memory[2])
        if self.adaLN is None:
            a = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, cache, memory, pack, keep)
            if keep is not None:
                x = x.reshape(-1, x.shape[-1]).index_select(0, keep)
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x))
        if keep is not None:
            raise ValueError("keep needs a layer without adaLN")
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(cond)[:, None].chunk(6, dim=-1)
        h = self.input_layernorm(x) * (1 + sc1) + sh1
        x = x + (1 + g1) * self.self_attn(h, cos, sin, attn_mask, is_causal, cache, None, pack)
        h = self.post_attention_layernorm(x) * (1 + sc2) + sh2
        return x + (1 + g2) * self.mlp(h)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the noise level sigma, then an MLP (DiT)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device).float() / half)
        args = sigma.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.silu(self.mlp(emb.to(self.mlp[0].weight.dtype)))
