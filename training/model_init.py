"""The model a run trains: built from a size preset, or initialised from an existing model
(fine-tuning; or continuing under another objective when the families share a backbone: BD3-LM
from MDLM as in the BD3-LM paper, MDLM / RADD from an AR model as DiffuLLaMA and Dream do)."""

from __future__ import annotations

import torch

from dlm.errors import DLMError
from dlm.families import family, family_of
from dlm.training.config import TrainConfig


def build_model(cfg: TrainConfig, tok, log=print):
    from dlm.loading import load_model
    from dlm.model import PRESETS, DLMConfig, DLMModel, e2d2_layer_split
    from dlm.tokenizer import check_tokenizer_for_model, model_vocab_size, special_token_ids

    ids = special_token_ids(tok)
    fam = family(cfg.objective)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = load_model(cfg.init_from)
        if bool(model.config.time_conditioning) != bool(cfg.time_conditioning):
            have = "with" if model.config.time_conditioning else "without"
            raise DLMError(f"--init-from {cfg.init_from} was trained {have} time conditioning; pass "
                           f"--{'' if model.config.time_conditioning else 'no-'}time-conditioning to match it")
        if model.config.objective != cfg.objective:
            convert_objective(model, cfg)
            log(f"initialising a {cfg.objective} model from the weights of {cfg.init_from}")
        check_tokenizer_for_model(tok, model.config, where=f"--init-from {cfg.init_from}",
                                  roles=family_of(model.config).format is None)
    else:
        extra = {}
        if fam.block_causal:
            extra["block_size"] = cfg.block_size
            extra["attention_backend"] = cfg.attention_backend
        if fam.encoder_decoder and cfg.size in PRESETS:
            # Same total depth as the other models: the decoder's layers come out of the preset's.
            enc, dec = e2d2_layer_split(PRESETS[cfg.size][1], cfg.decoder_layers)
            extra.update(num_hidden_layers=enc, num_decoder_layers=dec)
        mcfg = DLMConfig.from_preset(
            cfg.size, **extra, vocab_size=model_vocab_size(tok), objective=cfg.objective,
            time_conditioning=cfg.time_conditioning, max_position_embeddings=cfg.max_positions or max(1024, cfg.seq_len),
            mask_token_id=ids["mask"], bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        )
        model = DLMModel(mcfg)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise DLMError(f"--seq-len {cfg.seq_len} exceeds the model's maximum of "
                       f"{model.config.max_position_embeddings}; lower --seq-len")
    return model


def convert_objective(model, cfg: TrainConfig) -> None:
    """--init-from with another objective: continue from the weights under cfg.objective, when
    the two families share a backbone (the same parameters; only masks and losses differ)."""
    mc = model.config
    src, dst = family(mc.objective), family(cfg.objective)
    if not src.shares_backbone(dst):
        shared = ", ".join(f.name for f in _families() if f.shares_backbone(src) or f.shares_backbone(dst))
        raise DLMError(f"--init-from {cfg.init_from} is a {src.name!r} model and --objective is {dst.name!r}: "
                       f"their weights do not carry over (only {shared or 'same-backbone families'} share a "
                       "backbone); pass the matching objective")
    mc.objective = dst.name
    mc.block_size = cfg.block_size if dst.block_causal else None
    if dst.block_causal:
        mc.attention_backend = cfg.attention_backend
    mc.validate()


def _families():
    from dlm.families import FAMILIES

    return FAMILIES.values()
