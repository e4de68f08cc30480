"""Model families: everything that differs between kinds of model, declared in one place.

A family says how a model of that kind is trained, decoded and scored: which objective trains
it, whether it decodes left to right or by diffusion, whether its attention is block-causal
(autoregressive over blocks, diffusion inside: BD3-LM, E2D2), which decoder caches it allows and
which one "auto" means, how its canvas is laid out, and which families share a backbone (so
weights carry over with `--init-from`). Code elsewhere asks the family instead of testing a
model type:

    fam = family_of(model.config)          # or family("bd3lm")
    fam.block_causal, fam.caches, fam.resolve_cache("auto"), fam.canvas_length(P, N, block_size)

Torch-free: the command line lists choices from here without importing torch. Published model
families (LLaDA, Dream, SDAR, ...) are declared here too when their formats are supported.
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
    )
}

OBJECTIVES = tuple(FAMILIES)  # the model types of dlm's own checkpoints (config.objective)
CACHES = ("none", "prefix", "dual", "exact")  # every decoder cache (dlm.decoding.caches)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise DLMError(f"unknown objective (model family) {name!r}; choose one of {', '.join(FAMILIES)}") from None


def family_of(config) -> Family:
    """The family of a model config (dlm's own checkpoints: its `objective`)."""
    return family(getattr(config, "objective", None))
