"""LLaDA's checkpoint format (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5).

config.json (model_type "llada", OLMo field names): d_model, n_heads, n_kv_heads, n_layers,
mlp_hidden_size (else mlp_ratio * d_model), rope_theta, rms_norm_eps, include_bias /
include_qkv_bias, weight_tying, vocab_size / embedding_size, max_sequence_length, mask_token_id
(126336 in the real model), eos_token_id / pad_token_id (126081). The real model uses
`activation_type: "silu"` with a separate gate: ff_out(silu(ff_proj(x)) * up_proj(x)), i.e.
ff_proj is the gate; RMSNorm in float32; half-split rotary; bidirectional attention; logits of
position i are token i's (no shift).

Tensors (prefix `model.transformer.`): wte, blocks.{i}.{attn_norm, q_proj, k_proj, v_proj,
attn_out, ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out (the LM head, absent when tied).
"""

from __future__ import annotations

from dlm.errors import DLMError
from dlm.formats import require

P = "model.transformer."

LAYER = {  # LLaDA block tensor -> dlm layer parameter
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}
BIASES = {"q_proj.bias": "self_attn.q_proj.bias", "k_proj.bias": "self_attn.k_proj.bias",
          "v_proj.bias": "self_attn.v_proj.bias"}


def config(fam, raw: dict, where: str = "the checkpoint") -> dict:
    require(raw, ("d_model", "n_heads", "n_layers", "vocab_size", "mask_token_id"), fam, where)
    if raw.get("block_type", "llama") != "llama" or raw.get("activation_type", "silu") != "silu":
        raise DLMError(f"{where}: LLaDA with block_type {raw.get('block_type')!r} / activation_type "
                       f"{raw.get('activation_type')!r} is not supported (the published models use llama / silu)")
    if raw.get("include_bias"):
        raise DLMError(f"{where}: LLaDA with include_bias (biases on every projection) is not supported; "
                       "the published models have none")
    if raw.get("alibi") or raw.get("rope") is False:
        raise DLMError(f"{where}: LLaDA without rotary positions (alibi) is not supported")
    d = raw["d_model"]
    hidden = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d
    vocab = raw.get("embedding_size") or raw["vocab_size"]
    return dict(
        family=fam.name, objective=fam.objective, vocab_size=vocab, hidden_size=d,
        num_hidden_layers=raw["n_layers"], num_attention_heads=raw["n_heads"],
        num_key_value_heads=raw.get("n_kv_heads") or raw["n_heads"], intermediate_size=hidden,
        max_position_embeddings=raw.get("max_sequence_length", 4096), rope_theta=raw.get("rope_theta", 10000.0),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5), attention_bias=bool(raw.get("include_qkv_bias")),
        tie_word_embeddings=bool(raw.get("weight_tying")), mask_token_id=raw["mask_token_id"],
        bos_token_id=raw.get("bos_token_id"),  # (the loader fills it from generation_config.json)
        eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id", raw.get("eos_token_id")),
        attention_backend="sdpa",
    )


def names(cfg) -> dict[str, str]:
    """Checkpoint tensor name -> dlm parameter name, for every tensor of the checkpoint."""
    out = {P + "wte.weight": "embed_tokens.weight", P + "ln_f.weight": "norm.weight"}
    if not cfg.tie_word_embeddings:
        out[P + "ff_out.weight"] = "lm_head.weight"
    for i in range(cfg.num_hidden_layers):
        for theirs, ours in {**LAYER, **(BIASES if cfg.attention_bias else {})}.items():
            out[f"{P}blocks.{i}.{theirs}"] = f"layers.{i}.{ours}"
    return out


def write_config(fam, cfg, raw: dict) -> dict:
    """config.json of `cfg` in LLaDA's format (fields of `raw`, the original, kept)."""
    out = dict(raw)
    out.update(model_type="llada", d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
               n_kv_heads=cfg.num_key_value_heads, n_layers=cfg.num_hidden_layers,
               mlp_hidden_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, embedding_size=cfg.vocab_size,
               max_sequence_length=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
               rms_norm_eps=cfg.rms_norm_eps, include_qkv_bias=cfg.attention_bias,
               weight_tying=cfg.tie_word_embeddings, mask_token_id=cfg.mask_token_id,
               eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    out.setdefault("block_type", "llama")
    out.setdefault("activation_type", "silu")
    out.setdefault("layer_norm_type", "rms")
    return out
