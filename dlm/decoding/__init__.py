"""The decoder: one loop for every diffusion model, with pluggable policies and caches.

    config.py     DecodeConfig: every decoding option, defined once (CLI, server, lm-eval)
    state.py      a request's state, its result, one typed state per cache backend
    policies.py   unmask policies (which masked positions to commit), early commit
    caches.py     cache backends (none, prefix, dual, exact) and the batched forward passes
    sampling.py   logits -> tokens: temperature, top-k, top-p, float64 Gumbel-max; TokenChooser
    stopping.py   EOS, stop sequences, a decided prefix
    engine.py     Decoder: advance -> forward -> policy -> chooser -> commit, batched
    ar.py         ARDecoder: the AR baseline behind the same interface

    from dlm.decoding import DecodeConfig, Decoder
    Decoder(model).generate([prompt_ids], DecodeConfig(max_new_tokens=64, unmask="threshold"))

Names are imported lazily: the command line reads DecodeConfig's options without loading torch.
"""

from __future__ import annotations

_NAMES = {
    "DecodeConfig": "config", "Decoder": "engine", "ARDecoder": "ar", "DecodeResult": "state",
    "DecodeRequest": "state", "TokenChooser": "sampling", "filter_logits": "sampling",
    "POLICIES": "policies", "UnmaskPolicy": "policies",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"dlm.decoding.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'dlm.decoding' has no attribute {name!r}")
