"""Tiny random checkpoints in the published families' own formats (the real config.json field
names, tensor names and shapes, a sharded safetensors index), and independent references for
them built from transformers' own classes (LlamaModel, Qwen2Model, Qwen3Model).

Every tensor is random, norms and biases included (perturbed away from their initial values), so
a wrong name, a swapped gate / up projection or a missing bias shows in the logits. The names and
their meaning here are written from the families' public reference implementations, not from
dlm's own format tables (dlm/formats/), so the tests compare two independent readings.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

MASK_LLADA, MASK_QWEN = 95, 94  # the tiny models' mask ids (the real ones: 126336, 151666, ...)


def _rand(shape, g, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def _norm(n, g):
    return 1.0 + 0.3 * torch.randn(n, generator=g)


def write_shards(d: str, tensors: dict, shards: int = 2) -> None:
    """Tensors into `shards` safetensors files plus model.safetensors.index.json (as the hub's)."""
    os.makedirs(d, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    wmap, total = {}, 0
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, os.path.join(d, fname), metadata={"format": "pt"})
        for n in part:
            wmap[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)


# ------------------------------------------------------------------ LLaDA
def llada_config(vocab=96, d=32, heads=4, kv=2, layers=2, mlp=48, tied=False, qkv_bias=False) -> dict:
    """The field set of GSAI-ML/LLaDA-8B-Instruct's config.json, at a tiny size."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d,
        "embedding_dropout": 0.0, "embedding_size": vocab, "eos_token_id": 1, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": qkv_bias, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": MASK_LLADA, "max_sequence_length": 256,
        "mlp_hidden_size": mlp, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": heads, "n_kv_heads": kv, "n_layers": layers, "pad_token_id": 1, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": vocab, "weight_tying": tied,
    }


def write_llada(d: str, seed: int = 0, **kw) -> dict:
    c = llada_config(**kw)
    g = torch.Generator().manual_seed(seed)
    D, H, KV, F = c["d_model"], c["n_heads"], c["n_kv_heads"], c["mlp_hidden_size"]
    hd = D // H
    P = "model.transformer."
    t = {P + "wte.weight": _rand((c["vocab_size"], D), g, 1.0), P + "ln_f.weight": _norm(D, g)}
    if not c["weight_tying"]:
        t[P + "ff_out.weight"] = _rand((c["vocab_size"], D), g)
    for i in range(c["n_layers"]):
        b = f"{P}blocks.{i}."
        t.update({b + "attn_norm.weight": _norm(D, g), b + "ff_norm.weight": _norm(D, g),
                  b + "q_proj.weight": _rand((H * hd, D), g), b + "k_proj.weight": _rand((KV * hd, D), g),
                  b + "v_proj.weight": _rand((KV * hd, D), g), b + "attn_out.weight": _rand((D, H * hd), g),
                  b + "ff_proj.weight": _rand((F, D), g), b + "up_proj.weight": _rand((F, D), g),
                  b + "ff_out.weight": _rand((D, F), g)})
        if c["include_qkv_bias"]:
            t.update({b + "q_proj.bias": _rand((H * hd,), g), b + "k_proj.bias": _rand((KV * hd,), g),
                      b + "v_proj.bias": _rand((KV * hd,), g)})
    write_shards(d, t)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)
    return c


def llada_reference(d: str):
    """transformers' LlamaModel with LLaDA's weights: LLaDA's block is Llama's (ff_proj is the
    SiLU gate, up_proj the linear branch, ff_out the down projection; attn_norm / ff_norm the
    pre-norms), run bidirectionally through an explicit all-true 4D mask; the head is
    model.transformer.ff_out (or wte when tied). No logit shift."""
    from transformers import LlamaConfig, LlamaModel

    c, t = _read(d)
    lc = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["d_model"], intermediate_size=c["mlp_hidden_size"],
                     num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                     num_key_value_heads=c["n_kv_heads"], rms_norm_eps=c["rms_norm_eps"],
                     rope_theta=c["rope_theta"], max_position_embeddings=c["max_sequence_length"],
                     attention_bias=c["include_qkv_bias"], attn_implementation="eager")
    m = LlamaModel(lc).eval()
    P = "model.transformer."
    sd = {"embed_tokens.weight": t[P + "wte.weight"], "norm.weight": t[P + "ln_f.weight"]}
    ren = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm", "q_proj": "self_attn.q_proj",
           "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
           "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    for name, v in t.items():
        if ".blocks." in name:
            i, rest = name.split(".blocks.")[1].split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            if mod == "o_proj" and kind == "bias":
                continue
            sd[f"layers.{i}.{ren[mod]}.{kind}"] = v
    if c["include_qkv_bias"]:  # Llama's attention_bias also puts a bias on o_proj: LLaDA has none
        for i in range(c["n_layers"]):
            sd[f"layers.{i}.self_attn.o_proj.bias"] = torch.zeros(c["d_model"])
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    head = t[P + "wte.weight"] if c["weight_tying"] else t[P + "ff_out.weight"]

    def logits(ids):
        B, L = ids.shape
        full = torch.zeros(B, 1, L, L)  # additive mask: every query sees every key
        h = m(ids, attention_mask=full).last_hidden_state
        return h @ head.T

    return logits


# ------------------------------------------------------------------ Qwen layouts
def qwen_config(family: str, vocab=96, d=32, heads=4, kv=2, layers=2, inter=48, tied=False, block=4) -> dict:
    """The field set of Dream-v0-Instruct-7B, Fast_dLLM_v2_7B or SDAR-4B-Chat's config.json."""
    common = {"hidden_act": "silu", "hidden_size": d, "intermediate_size": inter, "initializer_range": 0.02,
              "max_position_embeddings": 256, "max_window_layers": layers, "num_attention_heads": heads,
              "num_hidden_layers": layers, "num_key_value_heads": kv, "rms_norm_eps": 1e-06, "rope_scaling": None,
              "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": tied,
              "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": vocab}
    if family == "dream":
        return {**common, "architectures": ["DreamModel"], "attention_dropout": 0.0,
                "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "mask_token_id": MASK_QWEN,
                "model_type": "Dream", "transformers_version": "4.46.2", "use_mrope": False}
    if family == "fast_dllm_v2":  # no mask id in the config: the code's default (151665) is the family's
        return {**common, "architectures": ["Fast_dLLM_QwenForCausalLM"],
                "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                             "AutoModel": "modeling.Fast_dLLM_QwenModel",
                             "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
                "model_type": "Fast_dLLM_Qwen", "bd_size": block, "conplemenrary_mask": True, "bos_token_id": 0,
                "eos_token_id": 1, "pad_token_id": 1, "layer_types": ["full_attention"] * layers,
                "transformers_version": "4.53.1"}
    if family == "sdar":
        return {**common, "architectures": ["SDARForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                "attn_implementation": "flex_attention", "block_size": block, "mask_token_id": MASK_QWEN,
                "bos_token_id": 0, "eos_token_id": 1, "head_dim": 2 * d // heads,  # head_dim * heads != hidden (Qwen3)
                "model_type": "sdar", "debug": False, "ep_size": 1, "fuse_cross_entropy": True,
                "micro_forward": False, "skip_checkpoint": False, "use_deepep": False,
                "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                             "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}}
    raise ValueError(family)


def write_qwen(d: str, family: str, seed: int = 0, mask_id: int = None, **kw) -> dict:
    c = qwen_config(family, **kw)
    g = torch.Generator().manual_seed(seed)
    D, H, KV, F = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = c.get("head_dim") or D // H
    bias = family != "sdar"
    t = {"model.embed_tokens.weight": _rand((c["vocab_size"], D), g, 1.0), "model.norm.weight": _norm(D, g)}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = _rand((c["vocab_size"], D), g)
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        t.update({b + "input_layernorm.weight": _norm(D, g), b + "post_attention_layernorm.weight": _norm(D, g),
                  b + "self_attn.q_proj.weight": _rand((H * hd, D), g),
                  b + "self_attn.k_proj.weight": _rand((KV * hd, D), g),
                  b + "self_attn.v_proj.weight": _rand((KV * hd, D), g),
                  b + "self_attn.o_proj.weight": _rand((D, H * hd), g),
                  b + "mlp.gate_proj.weight": _rand((F, D), g), b + "mlp.up_proj.weight": _rand((F, D), g),
                  b + "mlp.down_proj.weight": _rand((D, F), g)})
        if bias:
            t.update({b + "self_attn.q_proj.bias": _rand((H * hd,), g), b + "self_attn.k_proj.bias": _rand((KV * hd,), g),
                      b + "self_attn.v_proj.bias": _rand((KV * hd,), g)})
        if family == "sdar":
            t.update({b + "self_attn.q_norm.weight": _norm(hd, g), b + "self_attn.k_norm.weight": _norm(hd, g)})
    write_shards(d, t)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return c


def qwen_reference(d: str, family: str):
    """transformers' Qwen2Model (Dream, Fast-dLLM v2) or Qwen3Model (SDAR) with the checkpoint's
    weights, the family's attention pattern as an explicit 4D mask (bidirectional; block-causal
    with blocks at absolute positions), and its logit shift (Dream, Fast-dLLM v2: the output at
    i - 1 is token i's, position 0 keeps its own)."""
    c, t = _read(d)
    common = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                  num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                  num_key_value_heads=c["num_key_value_heads"], rms_norm_eps=c["rms_norm_eps"],
                  rope_theta=c["rope_theta"], max_position_embeddings=c["max_position_embeddings"],
                  attn_implementation="eager", tie_word_embeddings=c["tie_word_embeddings"])
    if family == "sdar":
        from transformers import Qwen3Config, Qwen3Model

        m = Qwen3Model(Qwen3Config(head_dim=c["head_dim"], attention_bias=False, **common)).eval()
    else:
        from transformers import Qwen2Config, Qwen2Model

        m = Qwen2Model(Qwen2Config(**common)).eval()
    sd = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    head = t["model.embed_tokens.weight"] if c["tie_word_embeddings"] else t["lm_head.weight"]
    block = c.get("bd_size") or (c.get("block_size") if family == "sdar" else None)
    shift = family in ("dream", "fast_dllm_v2")

    def logits(ids):
        B, L = ids.shape
        if block:
            blk = torch.arange(L) // block
            allowed = blk[None, :] <= blk[:, None]
        else:
            allowed = torch.ones(L, L, dtype=torch.bool)
        mask = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))[None, None].expand(B, 1, L, L)
        out = m(ids, attention_mask=mask).last_hidden_state @ head.T
        return torch.cat([out[:, :1], out[:, :-1]], dim=1) if shift else out

    return logits


def _read(d: str):
    from safetensors.torch import load_file

    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    t = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            t.update(load_file(os.path.join(d, name)))
    return c, t


WRITERS = {"llada": write_llada, "dream": lambda d, **kw: write_qwen(d, "dream", **kw),
           "fast_dllm_v2": lambda d, **kw: write_qwen(d, "fast_dllm_v2", **kw),
           "sdar": lambda d, **kw: write_qwen(d, "sdar", **kw)}


def reference(d: str, family: str):
    return llada_reference(d) if family == "llada" else qwen_reference(d, family)


# ------------------------------------------------------------------ a tiny tokenizer beside them
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,:;!?-+=()[]{}\"'/_\n"
LLADA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(d: str, family: str, vocab: int = 96) -> None:
    """A character-level tokenizer in the checkpoint's folder: id 0 BOS, 1 EOS (also PAD), the
    characters, the family's chat tokens, and its mask token at the config's mask id. Encoding
    adds no special tokens (as the published tokenizers' defaults do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    llada = family == "llada"
    specials = (["<|startoftext|>", "<|endoftext|>"] if llada else ["<|beginoftext|>", "<|endoftext|>"])
    chat = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] if llada else ["<|im_start|>", "<|im_end|>"]
    names = {"llada": "<|mdm_mask|>", "dream": "<|mask|>", "sdar": "<|MASK|>", "fast_dllm_v2": "|<MASK>|"}
    mask_id = MASK_LLADA if llada else (93 if family == "fast_dllm_v2" else MASK_QWEN)
    table = {t: i for i, t in enumerate(specials + list(CHARS) + chat)}
    table["<unk>"] = len(table)
    assert len(table) < mask_id < vocab
    table[names[family]] = mask_id
    tk = Tokenizer(models.BPE(vocab=table, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[1],
                                  pad_token=specials[1], unk_token="<unk>",
                                  additional_special_tokens=chat + [names[family]],
                                  chat_template=LLADA_TEMPLATE if llada else QWEN_TEMPLATE)
    tok.save_pretrained(d)


# ------------------------------------------------------------------ the DiT (MDLM / BD3-LM on OpenWebText)
def dit_config(kind: str, vocab=96, d=32, heads=4, layers=2, cond=16, block=4, length=64) -> dict:
    """The fields of kuleshov-group/mdlm-owt's and bd3lm-owt-block_size{4,8,16}'s config.json
    (MDLMConfig / BD3LMConfig), at a tiny size. Mask id = vocab - 1, GPT-2's <|endoftext|> =
    vocab - 2 (50257 / 50256 in the real models)."""
    c = {"vocab_size": vocab, "model_length": length, "hidden_dim": d, "cond_dim": cond, "n_blocks": layers,
         "n_heads": heads, "dropout": 0.1, "time_conditioning": False, "return_dict": False}
    if kind == "mdlm":
        return {**c, "model_type": "mdlm", "architectures": ["MDLM"],
                "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                             "AutoModelForMaskedLM": "modeling_mdlm.MDLM"}}
    return {**c, "model_type": "bd3lm", "architectures": ["BD3LM"], "block_size": block, "cross_attn": True,
            "adaln": True, "attn_backend": "sdpa", "causal": False, "var_min": True, "sampling_eps_min": 1e-3,
            "sampling_eps_max": 0.999,
            "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig",
                         "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"}}


def write_dit(d: str, kind: str, seed: int = 0, **kw) -> dict:
    """A tiny DiT checkpoint with the reference's tensor names (backbone.vocab_embed.embedding,
    backbone.blocks.{i}.attn_qkv, adaLN_modulation, mlp.0 / mlp.2, output_layer.*), every tensor
    random (adaLN too: in the reference they start at zero)."""
    c = dit_config(kind, **kw)
    g = torch.Generator().manual_seed(seed)
    D, V, C = c["hidden_dim"], c["vocab_size"], c["cond_dim"]
    b = "backbone."
    t = {b + "vocab_embed.embedding": _rand((V, D), g, 1.0),
         b + "sigma_map.mlp.0.weight": _rand((C, 256), g), b + "sigma_map.mlp.0.bias": _rand((C,), g),
         b + "sigma_map.mlp.2.weight": _rand((C, C), g), b + "sigma_map.mlp.2.bias": _rand((C,), g),
         b + "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, D // c["n_heads"], 2).float() / (D // c["n_heads"]))),
         b + "output_layer.norm_final.weight": _norm(D, g),
         b + "output_layer.linear.weight": _rand((V, D), g), b + "output_layer.linear.bias": _rand((V,), g),
         b + "output_layer.adaLN_modulation.weight": _rand((2 * D, C), g),
         b + "output_layer.adaLN_modulation.bias": _rand((2 * D,), g)}
    for i in range(c["n_blocks"]):
        p = f"{b}blocks.{i}."
        t.update({p + "norm1.weight": _norm(D, g), p + "norm2.weight": _norm(D, g),
                  p + "attn_qkv.weight": _rand((3 * D, D), g), p + "attn_out.weight": _rand((D, D), g),
                  p + "mlp.0.weight": _rand((4 * D, D), g), p + "mlp.0.bias": _rand((4 * D,), g),
                  p + "mlp.2.weight": _rand((D, 4 * D), g), p + "mlp.2.bias": _rand((D,), g),
                  p + "adaLN_modulation.weight": _rand((6 * D, C), g), p + "adaLN_modulation.bias": _rand((6 * D,), g)})
    if kind == "bd3lm":
        t["sampling_eps_min"] = torch.tensor(1e-3)
        t["sampling_eps_max"] = torch.tensor(0.999)
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return c
