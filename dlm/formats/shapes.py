"""The published models' real shapes: their config.json (the fields that fix the shape and the
special ids), for random-weight checkpoints and models at true size (`dlm bench decode
--random-init llada-8b`, `dlm bench load`) where the weights cannot be downloaded.

Sizes from the checkpoints' own config.json files (LLaDA-8B-Instruct, Dream-v0-Instruct-7B,
Fast_dLLM_v2_7B, SDAR-4B / 8B-Chat, and the MDLM / BD3-LM OpenWebText models); the 1.5B / 1.7B
variants take their Qwen base models' geometry.
"""

from __future__ import annotations

import copy
from typing import Optional

from dlm.errors import DLMError

_QWEN_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768}

SHAPES: dict[str, dict] = {
    "llada-8b": {"model_type": "llada", "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32,
                 "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0,
                 "rms_norm_eps": 1e-5, "max_sequence_length": 4096, "include_qkv_bias": False, "include_bias": False,
                 "weight_tying": False, "block_type": "llama", "activation_type": "silu", "mask_token_id": 126336,
                 "eos_token_id": 126081, "pad_token_id": 126081, "bos_token_id": 126080},
    "dream-7b": {"model_type": "Dream", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064, "tie_word_embeddings": False,
                 "mask_token_id": 151666, "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643,
                 **_QWEN_COMMON, "max_position_embeddings": 131072},
    "fast-dllm-v2-7b": {"model_type": "Fast_dLLM_Qwen", "hidden_size": 3584, "intermediate_size": 18944,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
                        "vocab_size": 152064, "tie_word_embeddings": False, "bd_size": 32, "bos_token_id": 151643,
                        "eos_token_id": 151645, "pad_token_id": 151645, **_QWEN_COMMON},
    "fast-dllm-v2-1.5b": {"model_type": "Fast_dLLM_Qwen", "hidden_size": 1536, "intermediate_size": 8960,
                          "num_attention_heads": 12, "num_key_value_heads": 2, "num_hidden_layers": 28,
                          "vocab_size": 151936, "tie_word_embeddings": True, "bd_size": 32, "bos_token_id": 151643,
                          "eos_token_id": 151645, "pad_token_id": 151645, **_QWEN_COMMON},
    "sdar-1.7b": {"model_type": "sdar", "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28, "vocab_size": 151936,
                  "tie_word_embeddings": False, "attention_bias": False, "block_size": 4, "mask_token_id": 151669,
                  "bos_token_id": 151643, "eos_token_id": 151643, **_QWEN_COMMON},
    "sdar-4b": {"model_type": "sdar", "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 36, "vocab_size": 151936,
                "tie_word_embeddings": False, "attention_bias": False, "block_size": 4, "mask_token_id": 151669,
                "bos_token_id": 151643, "eos_token_id": 151643, **_QWEN_COMMON},
    "sdar-8b": {"model_type": "sdar", "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 36, "vocab_size": 151936,
                "tie_word_embeddings": False, "attention_bias": False, "block_size": 4, "mask_token_id": 151669,
                "bos_token_id": 151643, "eos_token_id": 151643, **_QWEN_COMMON},
    "mdlm-owt": {"model_type": "mdlm", "vocab_size": 50258, "model_length": 1024, "hidden_dim": 768, "cond_dim": 128,
                 "n_blocks": 12, "n_heads": 12, "time_conditioning": False},
    "bd3lm-owt-4": {"model_type": "bd3lm", "vocab_size": 50258, "model_length": 1024, "hidden_dim": 768,
                    "cond_dim": 128, "n_blocks": 12, "n_heads": 12, "time_conditioning": False, "block_size": 4},
}

# fields that hold the number of layers, by format
_LAYERS = ("n_layers", "num_hidden_layers", "n_blocks")


def shape_config(name: str, layers: Optional[int] = None) -> dict:
    """The config.json (as a dict) of a named real shape; `layers` overrides the depth (a slice of
    the real model: every layer at true width, fewer of them)."""
    if name not in SHAPES:
        raise DLMError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    raw = copy.deepcopy(SHAPES[name])
    if layers is not None:
        if layers < 1:
            raise DLMError(f"--layers must be at least 1, got {layers}")
        for k in _LAYERS:
            if k in raw:
                raw[k] = layers
    return raw


def random_model(name: str, layers: Optional[int] = None, dtype=None, device=None, seed: int = 0):
    """A model of a named real shape with random weights, built in `dtype` on `device` directly
    (no float32 copy on the way). Random weights are never confident: speed only."""
    import torch

    from dlm.formats import detect, format_of
    from dlm.model import DLMConfig, DLMModel

    raw = shape_config(name, layers)
    fam = detect(raw, where=name)
    cfg = DLMConfig(**format_of(fam).config(fam, raw, where=name))
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"):
            model = DLMModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.source_config = raw
    return model.eval()

