"""The Qwen-layout checkpoint formats: Dream, Fast-dLLM v2 (Qwen2 / Qwen2.5) and SDAR (Qwen3).

config.json uses transformers' Qwen2 / Qwen3 field names (hidden_size, intermediate_size,
num_attention_heads, num_key_value_heads, num_hidden_layers, head_dim (Qwen3), rope_theta,
rms_norm_eps, tie_word_embeddings, vocab_size, max_position_embeddings, bos / eos / pad ids)
with the family's model_type ("Dream", "Fast_dLLM_Qwen", "sdar"). Qwen2 layouts have biases on
q / k / v (not o); SDAR (Qwen3) has none (attention_bias) and a per-head RMSNorm of q and k
before the rotation. Dream and Fast-dLLM v2 keep the AR head of the model they were adapted
from: the output at position i - 1 predicts token i (the family's logit_shift).

Tensors: model.embed_tokens, model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj
(+ q_norm / k_norm), post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head
(absent when tied). The mask id: the config's mask_token_id (Dream 151666, SDAR 151669);
Fast-dLLM v2's config has none, its code and tokenizer use 151665.
"""

from __future__ import annotations

from dlm.formats import require

QWEN2_BIAS = {"dream", "fast_dllm_v2"}  # q/k/v biases always (Qwen2 has no attention_bias field)
DEFAULT_IDS = {"fast_dllm_v2": {"mask_token_id": 151665}}

LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
         "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight", "mlp.down_proj.weight")


def config(fam, raw: dict, where: str = "the checkpoint") -> dict:
    require(raw, ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"),
            fam, where)
    mask = raw.get("mask_token_id")
    if mask is None:  # the tokenizer's mask token (read by the loader), else the family's default
        mask = raw.get("_dlm_mask_token_id_from_tokenizer", DEFAULT_IDS.get(fam.name, {}).get("mask_token_id"))
    require({"mask_token_id": mask}, ("mask_token_id",), fam, where)
    heads = raw["num_attention_heads"]
    out = dict(
        family=fam.name, objective=fam.objective, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, intermediate_size=raw["intermediate_size"],
        max_position_embeddings=raw.get("max_position_embeddings", 32768), rope_theta=raw.get("rope_theta", 1e6),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        attention_bias=fam.name in QWEN2_BIAS or bool(raw.get("attention_bias")), qk_norm=fam.name == "sdar",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings")), logit_shift=fam.logit_shift,
        mask_token_id=mask, bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id", raw.get("eos_token_id")), attention_backend="sdpa",
    )
    if fam.block_causal:
        out["block_size"] = raw.get("bd_size") or raw.get("block_size") or fam.block_size
    return out


def names(cfg) -> dict[str, str]:
    out = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    extra = []
    if cfg.attention_bias:
        extra += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if cfg.qk_norm:
        extra += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(cfg.num_hidden_layers):
        for t in (*LAYER, *extra):
            out[f"model.layers.{i}.{t}"] = f"layers.{i}.{t}"
    return out


def write_config(fam, cfg, raw: dict) -> dict:
    out = dict(raw)
    out.update(model_type=fam.model_type, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
               num_hidden_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size,
               max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
               rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
               bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if raw.get("mask_token_id") is not None or fam.name not in DEFAULT_IDS:
        out["mask_token_id"] = cfg.mask_token_id
    if fam.name == "sdar":
        out.update(head_dim=cfg.head_dim, attention_bias=cfg.attention_bias, block_size=cfg.block_size)
    if fam.name == "fast_dllm_v2":
        out["bd_size"] = cfg.block_size
    return out
