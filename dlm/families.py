"""Model families: everything that differs between kinds of model, declared in one place.

A family says how a model of that kind is trained, decoded and scored: which objective trains
it, whether it decodes left to right or by diffusion, whether its attention is block-causal
(autoregressive over blocks, diffusion inside: BD3-LM, E2D2), which decoder caches it allows and
which one "auto" means, how its canvas is laid out, and which families share a backbone (so
weights carry over with `--init-from`). Code elsewhere asks the family instead of testing a
model type:

    fam = family_of(model.config)          # or family("bd3lm")
    fam.block_causal, fam.caches, fam.resolve_cache("auto"), fam.canvas_length(P, N, block_size)

Torch-free: the command line lists choices from here without importing torch. The published
families (LLaDA, Dream, Fast-dLLM v2, SDAR) are declared here too; dlm/formats/ reads and
writes their checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dlm.errors import DLMError


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    objective: str  # key of dlm.objectives.OBJECTIVE_CLASSES
    autoregressive: bool = False  # decodes left to right (ARDecoder); exact likelihood
    block_causal: bool = False  # AR over blocks of block_size, diffusion inside (needs block_size)
    encoder_decoder: bool = False  # a clean-block encoder and a light noisy-block decoder (E2D2)
    caches: tuple[str, ...] = ("none",)  # decoder caches it allows
    default_cache: str = "none"  # what --cache auto means
    backbone: str = "dlm"  # families with the same backbone share weights (--init-from across them)
    time_conditioning: bool = False  # the network may take the noise level as input
    # published checkpoints (dlm/formats/): the format module that reads and writes them, the
    # config model_type it recognises, whether logits come one position late, and the decoding a
    # user gets without options
    format: Optional[str] = None
    model_type: Optional[str] = None
    logit_shift: int = 0
    prepend_bos: bool = True  # dlm's canvases start with BOS; published models take prompts as tokenized
    block_size: Optional[int] = None  # a published block-causal model's block
    tokenizer: Optional[str] = None  # the tokenizer to use when the checkpoint ships none (a hub id)
    defaults: tuple = ()  # (option, value) pairs of DecodeConfig

    def resolve_cache(self, cache: str) -> str:
        """"auto" -> the default; any other name checked against the allowed ones."""
        if cache == "auto":
            return self.default_cache
        if cache not in self.caches:
            kinds = ", ".join(f.name for f in FAMILIES.values() if cache in f.caches) or "no model"
            raise DLMError(f"cache {cache!r} is not available for {self.name} models (it is for {kinds}); "
                           f"use one of {', '.join(self.caches)}")
        return cache

    def canvas_length(self, prefix: int, new_tokens: int, block_size: Optional[int]) -> int:
        """Positions of a decoding canvas: BOS + prompt (`prefix`) + new tokens, and for
        block-causal models up to the end of the last block (its tokens past the answer are
        decoded but not reported)."""
        total = prefix + new_tokens
        if self.block_causal:
            total = -(-total // block_size) * block_size
        return total

    def shares_backbone(self, other: "Family") -> bool:
        return self.backbone == other.backbone and self.backbone != "own"

    def encode(self, tokenizer, text: str) -> list[int]:
        """A prompt's ids: dlm's own tokenizers without special tokens (the canvas gets BOS),
        a published model's as its tokenizer makes them by default."""
        return tokenizer.encode(text, add_special_tokens=not self.prepend_bos)

    def prefix(self, prompt, bos_id: Optional[int]) -> list[int]:
        """The canvas before the answer: BOS + prompt for dlm's own models; the prompt as the
        tokenizer (or chat template) gave it for published ones (BOS alone for an empty one)."""
        prompt = [int(t) for t in prompt]
        if self.prepend_bos or not prompt:
            if bos_id is None:
                raise DLMError("an empty prompt needs a BOS token, and this model has none; give a prompt")
            return [int(bos_id), *prompt]
        return prompt


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mdlm", "masked diffusion, continuous-time NELBO (Sahoo et al. 2024)", "mdlm",
               caches=("none", "prefix", "dual"), time_conditioning=True),
        Family("radd", "reparameterized absorbing diffusion, time-free network (Ou et al. 2024)", "radd",
               caches=("none", "prefix", "dual")),
        Family("ar", "the autoregressive baseline on the same backbone", "ar", autoregressive=True),
        Family("bd3lm", "block diffusion (Arriola et al. 2025)", "bd3lm", block_causal=True,
               caches=("none", "exact"), default_cache="exact"),
        Family("e2d2", "encoder-decoder block diffusion (Arriola et al. 2025)", "e2d2", block_causal=True,
               encoder_decoder=True, caches=("none", "exact"), default_cache="exact", backbone="own"),
        # published diffusion LMs, read and written in their own formats (dlm/formats/)
        Family("llada", "LLaDA (Nie et al. 2025): GSAI-ML/LLaDA-8B-Base / -Instruct, LLaDA-1.5", "mdlm",
               caches=("none", "prefix", "dual"), default_cache="dual", backbone="llada", format="llada",
               model_type="llada", prepend_bos=False,
               defaults=(("unmask", "threshold"), ("threshold", 0.9), ("block_length", 32))),
        Family("dream", "Dream 7B (Ye et al. 2025): Dream-org/Dream-v0-Base-7B / -Instruct-7B", "mdlm",
               caches=("none", "prefix", "dual"), default_cache="dual", backbone="dream", format="qwen",
               model_type="Dream", logit_shift=1, prepend_bos=False,
               defaults=(("unmask", "threshold"), ("threshold", 0.9), ("block_length", 32))),
        Family("fast_dllm_v2", "Fast-dLLM v2 (Wu et al. 2025): Efficient-Large-Model/Fast_dLLM_v2_1.5B / _7B",
               "bd3lm", block_causal=True, caches=("none", "exact"), default_cache="exact", backbone="fast_dllm_v2",
               format="qwen", model_type="Fast_dLLM_Qwen", logit_shift=1, prepend_bos=False, block_size=32,
               defaults=(("unmask", "threshold"), ("threshold", 0.9), ("block_length", 8))),
        Family("mdlm_owt", "MDLM on OpenWebText (Sahoo et al. 2024): kuleshov-group/mdlm-owt", "mdlm",
               caches=("none", "prefix", "dual"), backbone="dit", format="dit", model_type="mdlm",
               time_conditioning=True, tokenizer="gpt2"),
        Family("bd3lm_owt", "BD3-LM on OpenWebText (Arriola et al. 2025): kuleshov-group/bd3lm-owt-block_size4 / 8 "
               "/ 16", "bd3lm", block_causal=True, caches=("none", "exact"), default_cache="exact", backbone="dit",
               format="dit", model_type="bd3lm", time_conditioning=True, tokenizer="gpt2"),
        Family("sdar", "SDAR (JetAstra 2025): JetLM/SDAR-1.7B-Chat / -4B-Chat / -8B-Chat", "bd3lm",
               block_causal=True, caches=("none", "exact"), default_cache="exact", backbone="sdar", format="qwen",
               model_type="sdar", prepend_bos=False, block_size=4,
               defaults=(("unmask", "threshold"), ("threshold", 0.9))),
    )
}

OBJECTIVES = tuple(f.name for f in FAMILIES.values() if f.format is None)  # dlm's own (config.objective)
CACHES = ("none", "prefix", "dual", "exact")  # every decoder cache (dlm.decoding.caches)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise DLMError(f"unknown objective (model family) {name!r}; choose one of {', '.join(FAMILIES)}") from None


def family_of(config) -> Family:
    """The family of a model config: its `family` (published models), else its `objective`."""
    return family(getattr(config, "family", None) or getattr(config, "objective", None))


def family_for_model_type(model_type: str) -> Optional[Family]:
    """The published family whose checkpoints carry this config `model_type`, if any."""
    return next((f for f in FAMILIES.values() if f.model_type == model_type), None)
