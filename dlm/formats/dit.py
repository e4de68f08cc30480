"""The DiT checkpoints of MDLM and BD3-LM on OpenWebText (kuleshov-group/mdlm-owt,
kuleshov-group/bd3lm-owt-block_size4 / 8 / 16).

config.json (model_type "mdlm" / "bd3lm"): vocab_size (50258: GPT-2 + the mask, id 50257),
hidden_dim, cond_dim, n_blocks, n_heads, model_length, time_conditioning (false in the released
models: their adaLN layers are fed sigma = 0), block_size (BD3-LM). The block: LayerNorm with a
weight and no bias (float32), fused q|k|v without bias, half-split rotary (theta 10000), a
GELU-tanh MLP (4x) with biases, adaLN modulation of both sub-layers (shift, scale, gate each) and
of the output layer (shift, scale), an output bias. No logit shift.

Tensors (prefix `backbone.`): vocab_embed.embedding, sigma_map.mlp.{0,2}, blocks.{i}.{norm1,
attn_qkv, attn_out, norm2, mlp.0, mlp.2, adaLN_modulation}, output_layer.{norm_final, linear,
adaLN_modulation}; rotary_emb.inv_freq and BD3-LM's sampling_eps_min / max are not weights.

dlm's block gates its sub-layers with (1 + gate) (zero-initialised gates start as the identity);
the DiT multiplies by the gate itself: the gate chunks of each adaLN bias are shifted by one when
read and back when written.
"""

from __future__ import annotations

from dlm.formats import require

P = "backbone."
IGNORED = ("backbone.rotary_emb.inv_freq", "sampling_eps_min", "sampling_eps_max")


def config(fam, raw: dict, where: str = "the checkpoint") -> dict:
    require(raw, ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim"), fam, where)
    V = raw["vocab_size"]
    out = dict(
        family=fam.name, objective=fam.objective, vocab_size=V, hidden_size=raw["hidden_dim"],
        num_hidden_layers=raw["n_blocks"], num_attention_heads=raw["n_heads"], intermediate_size=4 * raw["hidden_dim"],
        max_position_embeddings=max(raw.get("model_length", 1024), 1024), rope_theta=10000.0,
        cond_dim=raw["cond_dim"], time_conditioning=bool(raw.get("time_conditioning")), adaln=True,
        norm_type="layer", mlp_type="gelu", mlp_bias=True, lm_head_bias=True,
        mask_token_id=raw.get("mask_token_id", V - 1), bos_token_id=raw.get("bos_token_id", V - 2),
        eos_token_id=raw.get("eos_token_id", V - 2), pad_token_id=raw.get("pad_token_id", V - 2),
        attention_backend="sdpa",
    )
    if fam.block_causal:
        require(raw, ("block_size",), fam, where)
        out["block_size"] = raw["block_size"]
    return out


def names(cfg) -> dict:
    """Checkpoint tensor -> dlm parameter, or a tuple of them for a fused tensor split in equal
    parts along its first dimension (q|k|v)."""
    out = {P + "vocab_embed.embedding": "embed_tokens.weight",
           P + "output_layer.norm_final.weight": "norm.weight",
           P + "output_layer.linear.weight": "lm_head.weight", P + "output_layer.linear.bias": "lm_head.bias",
           P + "output_layer.adaLN_modulation.weight": "final_adaLN.weight",
           P + "output_layer.adaLN_modulation.bias": "final_adaLN.bias"}
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        out[P + "sigma_map.mlp." + k] = "time_embed.mlp." + k
    for i in range(cfg.num_hidden_layers):
        b, o = f"{P}blocks.{i}.", f"layers.{i}."
        out.update({
            b + "norm1.weight": o + "input_layernorm.weight", b + "norm2.weight": o + "post_attention_layernorm.weight",
            b + "attn_qkv.weight": (o + "self_attn.q_proj.weight", o + "self_attn.k_proj.weight",
                                    o + "self_attn.v_proj.weight"),
            b + "attn_out.weight": o + "self_attn.o_proj.weight",
            b + "mlp.0.weight": o + "mlp.up_proj.weight", b + "mlp.0.bias": o + "mlp.up_proj.bias",
            b + "mlp.2.weight": o + "mlp.down_proj.weight", b + "mlp.2.bias": o + "mlp.down_proj.bias",
            b + "adaLN_modulation.weight": o + "adaLN.weight", b + "adaLN_modulation.bias": o + "adaLN.bias",
        })
    return out


def _gates(t, cfg, sign: float):
    D = cfg.hidden_size
    t = t.clone()
    for g in (2, 5):  # (shift, scale, gate) x (attention, MLP)
        t[g * D : (g + 1) * D] += sign
    return t


def to_dlm(name: str, t, cfg):
    """A checkpoint tensor as dlm holds it."""
    return _gates(t, cfg, -1.0) if name.endswith("adaLN_modulation.bias") and ".blocks." in name else t


def from_dlm(name: str, t, cfg):
    return _gates(t, cfg, 1.0) if name.endswith("adaLN_modulation.bias") and ".blocks." in name else t


def write_config(fam, cfg, raw: dict) -> dict:
    out = dict(raw)
    out.update(model_type=fam.model_type, vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_size,
               cond_dim=cfg.cond_dim, n_blocks=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
               time_conditioning=cfg.time_conditioning)
    if fam.block_causal:
        out["block_size"] = cfg.block_size
    return out
