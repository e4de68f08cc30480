"""Training configuration: one dataclass, loadable from JSON, overridable from the command line.

`dlm train --config run.json --lr 1e-3` reads run.json (keys = the field names below), then
applies flags. An unknown key is an error that lists the valid ones, never silently ignored.
The DeepSpeed JSON (training/configs/zero{0,1,2,3}.json or --deepspeed-config) holds only what
DeepSpeed owns; its "auto" entries are filled from this config by `deepspeed_config()`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from dlm.errors import DLMError
from dlm.families import OBJECTIVES, family
from dlm.presets import PRESETS

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class TrainConfig:
    # data
    data: str = "default"  # "default" (embedded corpus), a local file/dir/glob, or a hub dataset name
    text_field: str = "text"
    seq_len: int = 128
    pack: str = "wrap"  # "wrap" (concatenate + chunk, MDLM style), "pad" (one document per row) or "sft"
    tokenizer: Optional[str] = None  # dir or hub name; None = train a BPE tokenizer on the data
    vocab_size: int = 4096  # for a tokenizer trained here
    # model
    objective: str = "mdlm"  # mdlm | radd | ar
    size: str = "tiny"  # preset name from dlm.model.PRESETS
    time_conditioning: bool = False
    radd_loss: str = "lambda"  # lambda | k
    block_size: Optional[int] = None  # bd3lm / e2d2 block size B' (must divide seq_len)
    decoder_layers: Optional[int] = None  # e2d2 decoder layers, taken out of the preset's total
    max_positions: Optional[int] = None  # context the model supports (default: max(1024, seq_len))
    attention_backend: str = "auto"  # auto | sdpa | flex (block masks of bd3lm / e2d2)
    noise_window: str = "auto"  # bd3lm / e2d2 clipped schedule: auto (searched on validation), full, or lo,hi
    init_from: Optional[str] = None  # start from the weights of an existing dlm model directory
    # optimisation
    max_steps: int = 1000
    micro_batch: int = 16  # per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.0  # EMA decay of the weights (e.g. 0.9999); 0 = off
    precision: str = "auto"  # auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16
    zero_stage: int = 0
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON that replaces configs/zero{stage}.json
    # bookkeeping
    output_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after_steps: Optional[int] = None  # checkpoint and stop after this many steps of this invocation
    tensorboard: bool = True  # used when tensorboard is installed
    threads: Optional[int] = None  # CPU threads per process (default: dlm.runtime.default_threads)

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise DLMError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; use "
                               f"{', '.join(map(str, allowed))}")
        fam = family(self.objective)
        if fam.block_causal:
            if not self.block_size:
                raise DLMError(f"--objective {self.objective} needs --block-size (e.g. 4, 8 or 16)")
            if self.block_size < 1 or self.seq_len % self.block_size:
                raise DLMError(f"--block-size {self.block_size} does not divide --seq-len {self.seq_len}; "
                               "choose a block size that divides the sequence length")
            parse_noise_window(self.noise_window)
        elif self.block_size:
            raise DLMError(f"--block-size applies to block-causal models (bd3lm, e2d2), not {self.objective}; drop it")
        if self.max_positions is not None and self.max_positions < self.seq_len:
            raise DLMError(f"--max-positions {self.max_positions} is below --seq-len {self.seq_len}; raise it")
        if self.decoder_layers is not None and not fam.encoder_decoder:
            raise DLMError(f"--decoder-layers applies to encoder-decoder models (e2d2), not {self.objective}; drop it")
        if self.threads is not None and self.threads < 1:
            raise DLMError(f"--threads must be at least 1, got {self.threads}")
        for name in ("max_steps", "micro_batch", "grad_accum", "seq_len", "log_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise DLMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 4:
            raise DLMError("--seq-len must be at least 4 (BOS + EOS + two tokens)")
        if not 0.0 <= self.ema < 1.0:
            raise DLMError(f"--ema must be in [0, 1), got {self.ema}")
        if self.ema > 0 and self.zero_stage == 3:
            raise DLMError("--ema needs the full weights on every rank; use --zero-stage 0, 1 or 2 with EMA")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        return cls().updated(_read_json(path, "config file"), source=path)

    def updated(self, values: dict, source: str = "overrides") -> "TrainConfig":
        known = set(self.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise DLMError(
                f"unknown config key(s) {', '.join(unknown)} in {source}; valid keys: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields with a fixed set of values: the CLI checks them when parsing (before torch starts).
CHOICES = {
    "objective": OBJECTIVES,
    "size": tuple(PRESETS),
    "pack": ("wrap", "pad", "sft"),
    "radd_loss": ("lambda", "k"),
    "attention_backend": ("auto", "sdpa", "flex"),
    "precision": ("auto", "fp32", "bf16"),
    "zero_stage": (0, 1, 2, 3),
}


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DLMError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DLMError(f"{what} {path} is not valid JSON ({e})") from None


def parse_noise_window(spec: str) -> Optional[tuple[float, float]]:
    """'auto' -> None (searched), 'full' -> (0, 1), 'lo,hi' -> (lo, hi) with 0 <= lo < hi <= 1."""
    if spec == "auto":
        return None
    if spec == "full":
        return (0.0, 1.0)
    try:
        lo, hi = (float(x) for x in spec.split(","))
    except ValueError:
        lo, hi = -1.0, -1.0
    if not 0.0 <= lo < hi <= 1.0:
        raise DLMError(f"--noise-window {spec!r} is not auto, full or 'lo,hi' with 0 <= lo < hi <= 1")
    return (lo, hi)


def deepspeed_config(cfg: TrainConfig, world_size: int, use_bf16: bool) -> dict:
    """Load the DeepSpeed JSON for this run and fill its "auto" entries from `cfg`."""
    path = cfg.deepspeed_config or os.path.join(CONFIG_DIR, f"zero{cfg.zero_stage}.json")
    ds = _read_json(path, "DeepSpeed config")

    def fill(d: dict, key: str, value) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch)
    fill(ds, "gradient_accumulation_steps", cfg.grad_accum)
    fill(ds, "gradient_clipping", cfg.grad_clip)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    bf16 = ds.setdefault("bf16", {})
    fill(bf16, "enabled", use_bf16)
    if ds.get("fp16", {}).get("enabled"):
        raise DLMError(f"{path} enables fp16; dlm trains in fp32 or bf16 (set bf16.enabled instead)")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    fill(params, "lr", cfg.lr)
    fill(params, "weight_decay", cfg.weight_decay)
    params.setdefault("torch_adam", True)
    ds.setdefault("zero_optimization", {}).setdefault("stage", cfg.zero_stage)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise DLMError(f"DeepSpeed config {path} has 'auto' values dlm cannot fill: {', '.join(leftover)}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# Filled by the CLI so `dlm train --help` documents each field from one place.
HELP = {
    "data": "training corpus: 'default' (embedded, offline; 'default-text' for its English text only), a .txt/.jsonl/.parquet file, a directory, a glob, or a hub dataset 'name[:config]'",
    "text_field": "text column of jsonl/parquet/hub data",
    "seq_len": "tokens per training sequence",
    "pack": "wrap: concatenate documents and cut into chunks (BOS/EOS per chunk); pad: one document per row; "
            "sft: one prompt/completion per row, prompt given (never noised), EOS filler scored (needs a 'prompt' field)",
    "tokenizer": "tokenizer directory or hub name; default: train a byte-level BPE on the data",
    "vocab_size": "vocabulary size of a tokenizer trained here",
    "objective": "mdlm | radd | ar | bd3lm (block diffusion) | e2d2 (encoder-decoder block diffusion)",
    "block_size": "bd3lm / e2d2 block size B' (divides --seq-len; 1 = AR-like, seq_len = MDLM-like)",
    "decoder_layers": "e2d2 decoder layers, taken from the preset's layer count (default: layers // 6, at least 1)",
    "max_positions": "positions the model supports at inference (prompt + generation); default max(1024, seq_len)",
    "attention_backend": "attention kernel for block masks: auto (FlexAttention on CUDA, SDPA on CPU), sdpa, flex",
    "noise_window": "bd3lm / e2d2 clipped noise schedule for training: auto (lowest-variance window on "
                    "validation at each evaluation), full, or lo,hi; the reported NELBO always uses the full range",
    "size": "model size preset (debug, tiny, small, medium, gpt2-small)",
    "time_conditioning": "feed the noise level to the network (MDLM adaLN); off by default as in the MDLM reference",
    "radd_loss": "RADD loss: lambda (lambda-DCE) or k (k-DCE, any-order AR form)",
    "init_from": "initialise weights from an existing dlm model directory",
    "max_steps": "optimizer steps",
    "micro_batch": "sequences per process per micro-step",
    "grad_accum": "micro-steps per optimizer step (global batch = micro_batch x grad_accum x processes)",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of the peak (cosine decay)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clipping (0 = off)",
    "ema": "EMA decay of the weights exported at the end (0 = off)",
    "precision": "auto | fp32 | bf16",
    "zero_stage": "DeepSpeed ZeRO stage (0-3), selects training/configs/zero{N}.json",
    "deepspeed_config": "a DeepSpeed JSON to use instead of the bundled one ('auto' values are filled from flags)",
    "output_dir": "where checkpoints, metrics.jsonl, the tokenizer and the final model go",
    "seed": "seed of the data order, noise and initialisation",
    "log_every": "steps between log lines / metrics records",
    "eval_every": "steps between validation NELBO evaluations",
    "eval_batches": "global batches (micro_batch x grad_accum x ranks rows each) per evaluation",
    "save_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept on disk (oldest deleted first)",
    "stop_after_steps": "checkpoint and exit after this many steps of this invocation (for time-sliced cluster jobs); resume later with --resume",
    "resume": "continue from the latest checkpoint in output_dir (exactly: same data order and noise)",
    "tensorboard": "also log to TensorBoard when it is installed",
    "threads": "CPU threads per process (default: $OMP_NUM_THREADS, else the available cores / local "
               "processes, minus one)",
}
