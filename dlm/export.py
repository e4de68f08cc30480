"""Export the AR baseline as a stock `LlamaForCausalLM`, for off-the-shelf engines.

    dlm export runs/ar/model runs/ar/llama      # then: HF generate, or `vllm serve runs/ar/llama`

The dlm backbone uses Llama's architecture and parameter names (RMSNorm, half-split rotary,
SwiGLU, no biases), so the export is a key rename: `x` -> `model.x`, `lm_head` unchanged. Only
AR models export: a diffusion model's weights would load but mean something else.
"""

from __future__ import annotations

import os
import shutil

import torch

from dlm.errors import DLMError
from dlm.families import family_of
from dlm.loading import load_model


def to_llama(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if not family_of(c).autoregressive:
        raise DLMError(
            f"only autoregressive models export to LlamaForCausalLM; this one is {c.objective!r}"
        )
    if c.time_conditioning:
        raise DLMError("a time-conditioned model has adaLN layers that Llama lacks; it cannot be exported")
    lcfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    llama = LlamaForCausalLM(lcfg)
    sd = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in model.state_dict().items()}
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return llama.to(torch.float32).eval()


def export_llama(model_dir: str, out_dir: str) -> str:
    """Write `out_dir` as a Llama checkpoint (safetensors) plus the model's tokenizer."""
    from transformers import AutoTokenizer

    model = load_model(model_dir)
    llama = to_llama(model)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    llama.save_pretrained(tmp, safe_serialization=True)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
