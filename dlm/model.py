"""The dlm transformer backbone, as a Hugging Face `PreTrainedModel`.

One network serves every objective (MDLM, RADD, AR, and the block models): a pre-norm
Llama-style decoder stack (RMSNorm, rotary positions, SwiGLU, no biases) whose attention takes
any mask through PyTorch SDPA: bidirectional (no mask), causal (`is_causal=True`), or an
arbitrary boolean mask (True = may attend). Parameter names follow `LlamaModel` on purpose, so
the AR baseline exports to a stock `LlamaForCausalLM` by renaming keys (see `dlm/export.py`).

Optional time conditioning (MDLM's DiT-style adaLN): a sinusoidal embedding of the noise level
sigma modulates each block's norms. It is off by default, as in the MDLM reference, and RADD
never uses it (its network is time-independent by construction).

The same class runs the published families (dlm/formats/): grouped-query attention, explicit
head sizes, q/k/v biases, per-head q/k norms, tied heads, logits one position late (shifted
back here), block-causal default attention, and the DiT's LayerNorm, GELU MLP and output bias.

    from dlm.model import DLMConfig, DLMModel
    model = DLMModel(DLMConfig.from_preset("tiny", vocab_size=4096))
    logits = model(input_ids).logits            # bidirectional
    logits = model(input_ids, is_causal=True).logits

Saving / loading is plain HF: `model.save_pretrained(dir)` writes safetensors and
`AutoModel.from_pretrained(dir)` works once `dlm.model` is imported (it registers the classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from dlm.errors import DLMError
from dlm.layers import (  # noqa: F401  (KVCache and the layers are re-exported)
    Block,
    KVCache,
    LayerNorm,
    RMSNorm,
    TimestepEmbedder,
    _is_block_mask,
    Packing,
    make_norm,
    rotary_cos_sin,
)
from dlm.families import OBJECTIVES  # noqa: F401  (re-exported)
from dlm.presets import PRESETS  # noqa: F401  (named sizes; re-exported)


_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class DLMConfig(PretrainedConfig):
    """Configuration of the dlm backbone. Field names match `LlamaConfig` where they overlap."""

    model_type = "dlm"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: Optional[int] = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        objective: str = "mdlm",
        time_conditioning: bool = False,
        cond_dim: int = 128,
        block_size: Optional[int] = None,
        num_decoder_layers: int = 0,
        attention_backend: str = "auto",
        noise_schedule: str = "loglinear",
        noise_eps: float = 1e-3,
        mask_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        tie_word_embeddings: bool = False,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        attention_bias: bool = False,
        qk_norm: bool = False,
        logit_shift: int = 0,
        family: Optional[str] = None,
        norm_type: str = "rms",
        mlp_type: str = "swiglu",
        mlp_bias: bool = False,
        lm_head_bias: bool = False,
        adaln: Optional[bool] = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # SwiGLU width ~ 8/3 * d (LLaMA), rounded to a multiple of 64 for matmul efficiency.
        self.intermediate_size = intermediate_size or 64 * math.ceil(8 * hidden_size / 3 / 64)
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.objective = objective
        self.time_conditioning = time_conditioning
        self.cond_dim = cond_dim
        self.block_size = block_size
        self.num_decoder_layers = num_decoder_layers
        self.attention_backend = attention_backend  # auto | sdpa | flex (block masks; see dlm/blocks.py)
        self.noise_schedule, self.noise_eps = noise_schedule, noise_eps  # dlm.noise.schedule_for builds it
        self.mask_token_id = mask_token_id
        # Published model families (dlm/formats/): grouped-query attention, an explicit head size,
        # q/k/v biases, per-head q/k RMSNorm, and logits one position late (Dream: the output at
        # i - 1 predicts token i; the model shifts them back, so logits[:, i] is always token i's).
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.attention_bias, self.qk_norm, self.logit_shift = attention_bias, qk_norm, int(logit_shift)
        self.family = family  # the model family (dlm/families.py); None: the objective's own
        # the DiT block of the MDLM / BD3-LM OpenWebText checkpoints: LayerNorm (weight only),
        # a GELU-tanh MLP with biases, an output bias, and adaLN layers that may be fed sigma = 0
        # (their models were trained without time conditioning but keep the modulation)
        self.norm_type, self.mlp_type, self.mlp_bias, self.lm_head_bias = norm_type, mlp_type, mlp_bias, lm_head_bias
        self.adaln = bool(time_conditioning) if adaln is None else bool(adaln)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self) -> None:
        from dlm.families import family

        fam = family(self.family or self.objective)  # unknown: DLMError naming the known ones
        family(self.objective)
        if self.hidden_size % self.num_attention_heads and self.head_dim == self.hidden_size // self.num_attention_heads:
            raise DLMError(  # (an explicit head_dim, as Qwen3's, need not divide hidden_size)
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick sizes where it is"
            )
        if self.head_dim % 2:
            raise DLMError("the head dimension must be even for rotary embeddings; change hidden_size or heads")
        if self.norm_type not in ("rms", "layer") or self.mlp_type not in ("swiglu", "gelu"):
            raise DLMError(f"unknown norm_type {self.norm_type!r} / mlp_type {self.mlp_type!r}; "
                           "dlm has rms / layer and swiglu / gelu")
        if self.time_conditioning and not self.adaln:
            raise DLMError("a time-conditioned model needs its adaLN layers (adaln)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DLMError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                           f"num_key_value_heads {self.num_key_value_heads}")
        if fam.block_causal:
            if not self.block_size or self.block_size < 1:
                raise DLMError(f"{self.objective} needs a block size; pass --block-size (e.g. 4, 8 or 16)")
        if self.time_conditioning and not fam.time_conditioning:
            raise DLMError(f"{self.objective} takes no time input; train it with --no-time-conditioning")
        if fam.encoder_decoder and self.num_decoder_layers < 1:
            raise DLMError(f"{self.objective} needs at least one decoder layer; pass --decoder-layers (e.g. 2)")
        if not fam.encoder_decoder and self.num_decoder_layers:
            raise DLMError(f"decoder layers belong to encoder-decoder models; drop --decoder-layers for "
                           f"{self.objective}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DLMConfig":
        if name not in PRESETS:
            raise DLMError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}")
        d, n_layers, n_heads = PRESETS[name]
        kwargs = dict(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_heads)
        kwargs.update(overrides)
        return cls(**kwargs)


def e2d2_layer_split(total: int, decoder_layers: Optional[int] = None) -> tuple[int, int]:
    """(encoder, decoder) layers of an E2D2 model with `total` layers in all; the decoder gets
    `decoder_layers` or total // 6 (at least 1), as the paper's 10 + 2 at 12 layers."""
    dec = decoder_layers or max(1, total // 6)
    if not 1 <= dec < total:
        raise DLMError(f"--decoder-layers {dec} leaves no encoder layer of {total}; use 1 to {total - 1}")
    return total - dec, dec


@dataclass
class DLMOutput(ModelOutput):
    logits: torch.Tensor = None
    hidden_states: Optional[torch.Tensor] = None


class DLMPreTrainedModel(PreTrainedModel):
    config_class = DLMConfig
    base_model_prefix = "dlm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # Per-module rules keyed on tags set in the constructors: transformers may visit modules
        # in any order, so a parent must not rely on initialising its children.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_dlm_zero_init", False):
                nn.init.zeros_(module.weight)
            elif getattr(module, "_dlm_residual", False):
                # GPT-2 style: residual output projections scaled by depth keep activations O(1).
                depth = self.config.num_hidden_layers + self.config.num_decoder_layers
                nn.init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * depth))
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, LayerNorm)):
            nn.init.ones_(module.weight)


class DLMModel(DLMPreTrainedModel):
    """Token ids in, logits out. Masks and positions are the caller's choice (the objective's)."""

    # lm_head shares the embedding matrix when config.tie_word_embeddings (transformers 5 maps
    # the tied name to its source; 4.x lists it)
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: DLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        # E2D2: a light decoder over the noisy block (layer indices continue after the encoder's,
        # so one KVCache can hold both).
        n_enc = config.num_hidden_layers
        self.decoder_layers = (
            nn.ModuleList(Block(config, n_enc + i) for i in range(config.num_decoder_layers))
            if config.num_decoder_layers else None
        )
        self.norm = make_norm(config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:  # one matrix for both ends (Qwen's small models)
            self.lm_head.weight = self.embed_tokens.weight
        if config.adaln:
            self.time_embed = TimestepEmbedder(config.cond_dim)
            self.final_adaLN = nn.Linear(config.cond_dim, 2 * config.hidden_size)
            self.final_adaLN._dlm_zero_init = True
        else:
            self.time_embed = None
            self.final_adaLN = None
        from dlm.families import family_of

        fam = family_of(config)
        self._block_causal_default = fam.block_causal and fam.format is not None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        sigma: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        return_hidden: bool = False,
        output_positions: Optional[torch.Tensor] = None,
        query_valid: Optional[torch.Tensor] = None,
        logit_shift: Optional[bool] = None,
    ) -> DLMOutput:
        """
        input_ids: (B, L). attention_mask: optional (B, Lk) padding mask, 1 = real token; it is
        folded into `attn_mask`. position_ids: (B, L) or (L,), default offset by the cache length.
        attn_mask: optional boolean (Lq, Lk) or (B, 1, Lq, Lk), True = may attend. Without one
        (and without a cache) attention is bidirectional, or block-causal for the published
        block-causal families (SDAR, Fast-dLLM v2).
        is_causal: causal attention (ignored when an explicit mask is given: put causality in it).
        sigma: (B,) noise level, required iff config.time_conditioning.
        output_positions: optional boolean (B, L), or a 1-D LongTensor of row-major positions
        into the flattened (B * L) tokens (into the packed tokens with a `Packing`); logits are
        computed only there and returned flattened as (N, V). Losses use it to skip the LM head
        where nothing is scored; the decoder passes indices (a boolean mask costs a host sync).
        query_valid: optional boolean (B, L), or a `dlm.layers.Packing`: the tokens that matter;
        the others (padding) are left out of every per-token layer (their keys are not attended
        to: the mask must say so; with a cache, their entries hold zeros). Results at valid
        tokens are unchanged.
        Logits at position i are token i's for every family (a late family's are shifted back);
        logit_shift=False gives each position's own output instead (the decoder's cached steps,
        which choose the positions themselves).
        """
        late = self.config.logit_shift if logit_shift is None else bool(logit_shift)
        B, L = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            # Checked here only (explicit positions are the caller's business: no device sync).
            if past + L > self.config.max_position_embeddings:
                raise DLMError(
                    f"sequence of {past + L} tokens exceeds the model's maximum of "
                    f"{self.config.max_position_embeddings} positions; use shorter sequences"
                )
            position_ids = torch.arange(past, past + L, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, -1)
        if attn_mask is None and not is_causal and cache is None and self._block_causal_default:
            # a published block-causal family (SDAR, Fast-dLLM v2): its own attention pattern by
            # default, blocks aligned at absolute positions
            blk = position_ids // self.config.block_size
            attn_mask = (blk[:, None, None, :] <= blk[:, None, :, None])
        if _is_block_mask(attn_mask):
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("a FlexAttention BlockMask cannot be combined with padding; use a dense mask")
            attention_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_ok = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
            if attn_mask is None and is_causal:
                Lk = key_ok.shape[-1]
                attn_mask = torch.ones(L, Lk, dtype=torch.bool, device=input_ids.device).tril(Lk - L)
            attn_mask = key_ok if attn_mask is None else (attn_mask & key_ok)
            # A query whose keys are all masked (a pad row under a causal mask) would give NaN;
            # let it see itself. Its output is never scored.
            if L == attn_mask.shape[-1]:
                attn_mask = attn_mask | torch.eye(L, dtype=torch.bool, device=input_ids.device)
        if attn_mask is not None:
            is_causal = False
        if cache is not None and past > 0 and is_causal and L > 1:
            # SDPA's is_causal aligns to the top-left; with a cache the queries sit at the end.
            attn_mask = torch.ones(L, past + L, dtype=torch.bool, device=input_ids.device).tril(past)
            is_causal = False
        elif cache is not None and past > 0 and is_causal:
            is_causal = False  # one query at the end attends to everything before it

        pack = None
        if isinstance(query_valid, Packing) or (query_valid is not None and not bool(query_valid.all())):
            if self.config.time_conditioning:
                raise ValueError("query_valid needs a model without time input")
            if attn_mask is None or output_positions is None:
                raise ValueError("query_valid needs an explicit attn_mask that hides the left-out tokens "
                                 "and output_positions")
            if late:
                raise ValueError("query_valid needs logit_shift=False (a shift would cross packed rows)")
            pack = query_valid if isinstance(query_valid, Packing) else Packing(query_valid)
            input_ids, position_ids = pack.pack(input_ids), pack.pack(position_ids)
            if output_positions.dtype == torch.bool:
                output_positions = pack.pack(output_positions)
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        cond = None
        if self.config.time_conditioning:
            if sigma is None:
                raise ValueError("this model is time-conditioned: pass sigma")
            cond = self.time_embed(sigma.reshape(-1).expand(B) if sigma.numel() == 1 else sigma)
        elif self.time_embed is not None:  # adaLN fed sigma = 0: one modulation for every row
            cond = self.time_embed(torch.zeros(1, device=input_ids.device))
        # positions given as indices, no adaLN: the last layer past attention runs at them only
        # (every position's keys and values are still computed: caches keep them)
        keep = None
        if output_positions is not None and output_positions.dtype != torch.bool and cond is None:
            keep = self._output_rows(output_positions, x.shape[1], late)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, is_causal, cond, cache, pack=pack, keep=keep if i == last else None)
        x = self.norm(x)
        if self.final_adaLN is not None:
            shift, scale = self.final_adaLN(cond)[:, None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        if keep is None:
            x = self._at_outputs(x, output_positions, late)
        logits = self.lm_head(x)
        return DLMOutput(logits=logits, hidden_states=x if return_hidden else None)

    @staticmethod
    def _at_outputs(x: torch.Tensor, output_positions: Optional[torch.Tensor], shift: bool) -> torch.Tensor:
        """The hidden states whose logits are token i's: x at i, or at i - 1 for a model whose
        logits come one position late (logit_shift; the first position keeps its own, as the
        reference implementations do). With output_positions, flattened (N, D)."""
        if output_positions is None:
            return torch.cat([x[:, :1], x[:, :-1]], dim=1) if shift else x
        if output_positions.dtype == torch.bool:
            if not shift:
                return x[output_positions]
            b, i = output_positions.nonzero(as_tuple=True)
            return x[b, (i - 1).clamp(min=0)]
        return x.reshape(-1, x.shape[-1]).index_select(0, DLMModel._output_rows(output_positions, x.shape[1], shift))

    @staticmethod
    def _output_rows(idx: torch.Tensor, L: int, shift: bool) -> torch.Tensor:
        """Row-major output positions into (B * L) -> the rows whose hidden states give them."""
        return torch.where(idx % L == 0, idx, idx - 1) if shift else idx


    def encode(self, input_ids, attn_mask=None, position_ids=None, cache: Optional[KVCache] = None):
        """E2D2 encoder: hidden states (before the final norm) of the encoder layers."""
        B, L = input_ids.shape
        if position_ids is None:
            past = cache.length if cache is not None else 0
            position_ids = torch.arange(past, past + L, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, -1)
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, False, None, cache)
        return x

    def decode(self, noisy_ids, memory_states, memory_positions, attn_mask=None, position_ids=None,
               output_positions: Optional[torch.Tensor] = None) -> DLMOutput:
        """E2D2 decoder: queries from `noisy_ids`; keys/values = [memory ; own states] per layer.

        attn_mask: boolean (Lq, M + Lq) or (B, 1, Lq, M + Lq) over [memory ; own] keys."""
        if self.decoder_layers is None:
            raise DLMError("this model has no decoder layers (it is not an encoder-decoder model)")
        B, L = noisy_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=noisy_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, -1)
        if memory_positions.dim() == 1:
            memory_positions = memory_positions[None].expand(B, -1)
        x = self.embed_tokens(noisy_ids)
        hd, theta = self.config.head_dim, self.config.rope_theta
        cos, sin = rotary_cos_sin(position_ids, hd, theta, x.dtype)
        mcos, msin = rotary_cos_sin(memory_positions, hd, theta, x.dtype)
        for layer in self.decoder_layers:
            x = layer(x, cos, sin, attn_mask, False, None, None, (memory_states, mcos, msin))
        x = self.norm(x)
        if output_positions is not None:  # a boolean mask or row-major indices, as in forward
            x = self._at_outputs(x, output_positions, False)
        return DLMOutput(logits=self.lm_head(x))


AutoConfig.register("dlm", DLMConfig)
AutoModel.register(DLMConfig, DLMModel)
