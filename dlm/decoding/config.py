"""Decoding options, defined once: `DecodeConfig`. The command-line flags of `dlm generate` /
`dlm serve`, the server's per-request fields and lm-eval's model arguments are all generated from
its fields (`cli_flags`, `server_fields`, `lm_eval_args`), and `validate` is the one check.

    cfg = DecodeConfig(max_new_tokens=64, unmask="threshold", threshold=0.9, cache="dual")
    cfg.validate(family("mdlm"), block_size=None)

Torch-free, so `dlm --help` and a bad flag never wait for torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from dlm.decoding.policies import POLICIES
from dlm.errors import DLMError
from dlm.families import CACHES


class OptionError(DLMError):
    """A bad decoding option; `.option` names it (the server's `param`)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def option(default, help: str, *, choices=None, cli: bool = True, server: bool = True, lm_eval: bool = True,
           flag: Optional[str] = None, invert: bool = False, minimum: Optional[float] = None):
    """A DecodeConfig field and where it is exposed: a CLI flag (`flag` overrides the name;
    `invert`: a store-true flag that sets the field False), a server request field, an lm-eval
    model argument."""
    return field(default=default, metadata=dict(help=help, choices=choices, cli=cli, server=server, lm_eval=lm_eval,
                                                flag=flag, invert=invert, minimum=minimum))


def _gaps(value) -> tuple:
    """Early-commit gaps from "7.5/5/2.5", a list or a tuple."""
    if isinstance(value, str):
        try:
            value = [float(x) for x in value.split("/")]
        except ValueError:
            value = ()
    gaps = tuple(float(x) for x in value)
    if len(gaps) != 3 or min(gaps) < 0:
        raise DLMError(f"early_commit_gaps takes three gaps (early / middle / late in decoding) like 7.5/5/2.5; "
                       f"got {value!r}")
    return gaps


@dataclass
class DecodeConfig:
    max_new_tokens: int = option(64, "new tokens: the answer's length", server=False, lm_eval=False, minimum=1)
    block_length: Optional[int] = option(
        None, "semi-autoregressive block length (divides the answer's length); default: the whole answer, or a "
              "block model's own block size", minimum=1)
    steps: Optional[int] = option(None, "denoising steps over the answer for fixed-k policies (default: one token "
                                        "per step)", minimum=1)
    unmask: str = option("confidence", "which masked positions to commit at a step", choices=POLICIES)  # the live registry
    threshold: float = option(0.9, "confidence threshold tau of --unmask threshold")
    factor: float = option(1.0, "f of the factor rule (--unmask factor)")
    early_commit: bool = option(False, "Prophet early commit: fill the rest at once when the top-2 logit gap is wide")
    early_commit_scope: str = option("block", "what early commit fills: the current block, or the whole answer "
                                              "(needs the logits of the whole answer: cache none or prefix)",
                                     choices=("block", "answer"))
    early_commit_gaps: tuple = option((7.5, 5.0, 2.5), "the gaps early commit needs early / middle / late in "
                                                       "decoding, as 7.5/5/2.5")
    temperature: float = option(0.0, "0 = greedy; sampling is Gumbel-max in float64", server=False, lm_eval=False)
    top_k: Optional[int] = option(None, "sample from the k most likely tokens", minimum=1)
    top_p: Optional[float] = option(None, "sample from the smallest set of tokens with this much mass",
                                    server=False)
    seed: int = option(0, "seed of the first prompt (the i-th gets seed + i)", server=False, lm_eval=False)
    stop: Sequence[Sequence[int]] = field(default=(), metadata=dict(cli=False, server=False, lm_eval=False))
    stop_at_eos: bool = option(True, "keep generating after EOS", flag="--ignore-eos", invert=True,
                               server=False, lm_eval=False)
    cache: str = option("auto", "K/V cache: prefix / dual (approximate, bidirectional models), exact (block "
                                "models); auto = the model's default", choices=("auto", *CACHES))

    def validate(self, fam, block_size: Optional[int] = None) -> None:
        """The one check of a configuration for a model of family `fam` (DLMError naming the
        option). `cache` may still be "auto" here; decoders resolve it with fam.resolve_cache."""
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.unmask not in POLICIES:
            raise OptionError("unmask", f"unknown unmask policy {self.unmask!r}; choose one of {', '.join(POLICIES)}")
        if not 0.0 < self.threshold <= 1.0:
            raise OptionError("threshold", f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor <= 0:
            raise OptionError("factor", f"factor must be positive, got {self.factor}")
        if fam.block_causal:  # sub-blocks of the model's own blocks, decoded left to right (Fast-dLLM v2)
            b = self.block_length
            if b is not None and (b < 1 or not block_size or block_size % b):
                raise OptionError("block_length", f"block_length {b}: this block model decodes in its own blocks of "
                                  f"{block_size} tokens; block_length may only split them (a divisor of {block_size}) "
                                  "or be left out")
        elif self.block_length is not None:
            if self.block_length < 1 or self.max_new_tokens % self.block_length:
                raise OptionError("block_length", f"block length {self.block_length} does not divide max_new_tokens "
                               f"{self.max_new_tokens}; choose a block length that divides it")
        if self.steps is not None and self.steps < 1:
            raise OptionError("steps", f"steps must be at least 1, got {self.steps}")
        if self.temperature < 0:
            raise OptionError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise OptionError("top_k", f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise OptionError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.early_commit_scope not in ("block", "answer"):
            raise OptionError("early_commit_scope", f"early_commit_scope must be 'block' or 'answer', got {self.early_commit_scope!r}")
        try:
            _gaps(self.early_commit_gaps)
        except DLMError as e:
            raise OptionError("early_commit_gaps", str(e)) from None
        if any(len(s) == 0 for s in self.stop):
            raise OptionError("stop", "stop sequences must not be empty")
        try:
            cache = fam.resolve_cache(self.cache)
        except DLMError as e:
            raise OptionError("cache", str(e)) from None
        if self.early_commit and self.early_commit_scope == "answer" and cache in ("dual", "exact"):
            raise OptionError("early_commit_scope", f"early commit with scope 'answer' fills every mask of the answer at once and needs the "
                           f"logits of the whole answer, but the {cache} cache computes the current block only; use "
                           "early_commit_scope block, or cache none / prefix")

    # ---------------------------------------------------------- where the options are exposed
    @classmethod
    def options(cls, where: str) -> list[dataclasses.Field]:
        """The fields exposed as `where` ("cli", "server" or "lm_eval")."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get(where)]

    @classmethod
    def for_family(cls, fam, model_block: Optional[int] = None, **given) -> "DecodeConfig":
        """The family's default decoding (dlm/families.py; e.g. threshold + dual cache for LLaDA),
        overridden by the options `given`; `model_block`: a block-causal model's block size."""
        return cls(**family_values(fam, given, model_block))

    @classmethod
    def coerce(cls, name: str, value):
        """A value from text (CLI, lm-eval's key=value arguments) or JSON, as the field's type."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        if value is None:
            return None
        if name == "early_commit_gaps":
            return _gaps(value)
        kind = _kind(f)
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise DLMError(f"{name} takes {kind.__name__} values, got {value!r}") from None


def _kind(f: dataclasses.Field):
    """The scalar type of a field (Optional[int] -> int)."""
    ann = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in ann:
            return kind
    return str


def cli_flags(parser, group_title: str = "decoding", exclude: Sequence[str] = ()) -> None:
    """Add every CLI-exposed option of DecodeConfig (but `exclude`) to `parser`, help from the
    field. A flag not given stays unset, so `from_flags` can tell the model family's default
    decoding (dlm/families.py) from the user's choice."""
    import argparse

    g = parser.add_argument_group(group_title)
    for f in DecodeConfig.options("cli"):
        if f.name in exclude:
            continue
        m = f.metadata
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        if _kind(f) is bool:
            g.add_argument(flag, dest=f.name, action="store_false" if m["invert"] else "store_true",
                           default=argparse.SUPPRESS, help=m["help"])
            continue
        shown = "/".join(f"{x:g}" for x in f.default) if f.name == "early_commit_gaps" else f.default
        text = f"{m['help']} (default: {shown}, or the model family's)"
        if f.name == "early_commit_gaps":
            g.add_argument(flag, dest=f.name, type=_gaps, default=argparse.SUPPRESS, metavar="E/M/L", help=text)
        else:
            g.add_argument(flag, dest=f.name, type=_kind(f), default=argparse.SUPPRESS, choices=m["choices"],
                           help=text)


def family_values(fam, given: dict, model_block: Optional[int] = None) -> dict:
    """The options `given`, completed with the family's defaults. A default block length that
    does not divide what it splits (max_new_tokens; a block-causal model's blocks) becomes the
    largest one below it that does."""
    values = {**dict(fam.defaults), **given}
    b = values.get("block_length")
    if "block_length" not in given and b:
        n = model_block if fam.block_causal else values.get("max_new_tokens", DecodeConfig.max_new_tokens)
        if n and n % b:
            values["block_length"] = max(d for d in range(1, min(b, n) + 1) if n % d == 0)
    return values


def from_flags(args, family=None, model_block: Optional[int] = None, **overrides) -> DecodeConfig:
    """A DecodeConfig from parsed flags (those cli_flags added): the flags given, then the model
    family's defaults (if `family`), then DecodeConfig's; `overrides` win over all."""
    given = {f.name: getattr(args, f.name) for f in DecodeConfig.options("cli") if hasattr(args, f.name)}
    given.update(overrides)
    return DecodeConfig(**(family_values(family, given, model_block) if family is not None else given))


def server_fields() -> dict:
    """Pydantic field definitions of the server-exposed options: all optional (None = the
    server's default), with their bounds; the values are checked by DecodeConfig.validate."""
    from pydantic import Field

    out = {}
    for f in DecodeConfig.options("server"):
        m = f.metadata
        kind = list[float] if f.name == "early_commit_gaps" else _kind(f)
        extra = {"ge": m["minimum"]} if m["minimum"] is not None else {}
        if f.name == "early_commit_gaps":
            extra = {"min_length": 3, "max_length": 3}
        out[f.name] = (Optional[kind], Field(None, description=m["help"], **extra))
    return out


def lm_eval_args() -> dict:
    """lm-eval model arguments for the decoder: name -> type."""
    return {f.name: _kind(f) for f in DecodeConfig.options("lm_eval")}


__all__ = ["DecodeConfig", "OptionError", "cli_flags", "from_flags", "server_fields", "lm_eval_args", "option"]
