"""Published checkpoint formats: how a family's config.json and tensor names map onto dlm's
backbone, both ways.

A format is declared, not coded into the model: `config(fam, raw)` turns the checkpoint's
config.json into DLMConfig arguments, `names(cfg)` lists every tensor of the checkpoint with the
dlm parameter it fills, and `write_config(fam, cfg, raw)` gives the config.json to save a
(fine-tuned) model back in the family's own format. The model family (dlm/families.py) names
its format; the loader (dlm/loading.py) reads the tensors shard by shard into a model built
without memory (meta device), in their stored dtype.

    llada.py   LLaDA (model_type "llada"): OLMo-style names (model.transformer.blocks.{i}.ff_proj, ...)
    qwen.py    Dream, Fast-dLLM v2 (Qwen2 layout), SDAR (Qwen3 layout: per-head q/k norm)
"""

from __future__ import annotations

import importlib
from typing import Optional

from dlm.errors import DLMError
from dlm.families import FAMILIES, Family, family, family_for_model_type


def format_of(fam: Family):
    """The format module of a published family."""
    if fam.format is None:
        raise DLMError(f"{fam.name} models are dlm's own; they need no format conversion")
    return importlib.import_module(f"dlm.formats.{fam.format}")


def detect(raw: dict, where: str = "the checkpoint") -> Family:
    """The family of a checkpoint from its config.json (a dict): dlm's own (`model_type` "dlm")
    or a published family recognised by its `model_type`."""
    mt = raw.get("model_type")
    if mt == "dlm":
        return family(raw.get("family") or raw.get("objective", "mdlm"))
    fam = family_for_model_type(mt) if mt else None
    if fam is None:
        known = ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values() if f.model_type)
        auto = raw.get("auto_map")
        hint = (" It ships its own modeling code (auto_map), which dlm does not run: dlm implements each "
                "family natively." if auto else "")
        raise DLMError(f"{where} is a {mt!r} model, which dlm cannot load; it loads dlm checkpoints and "
                       f"the published families {known}.{hint}")
    return fam


def require(raw: dict, keys: tuple, fam: Family, where: str) -> None:
    """Every field a format needs is in the config."""
    missing = [k for k in keys if raw.get(k) is None]
    if missing:
        raise DLMError(f"{where} is a {fam.name} config without {', '.join(missing)}; it is incomplete or "
                       "not a published checkpoint of that family")


def default_ids(fam: Family) -> dict:
    """The special ids a family's checkpoints use when their config.json omits them."""
    return dict(getattr(format_of(fam), "DEFAULT_IDS", {}).get(fam.name, {}))


__all__ = ["detect", "format_of", "require", "default_ids", "Optional"]
