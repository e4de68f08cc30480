"""`dlm bench load`: peak memory of loading a published checkpoint at real width.

Writes a random checkpoint of a named real shape (dlm/formats/shapes.py) in the family's own
format (sharded safetensors with an index, in --dtype), then loads it with `dlm.load_model` in a
fresh process and reports the process's peak resident memory against the checkpoint's size:

    dlm bench load --shape llada-8b --layers 8          # 8 of LLaDA-8B's 32 layers, 4.2 GB in bf16

The loader builds the model on the meta device and reads each tensor straight into its own
memory, so the peak is the model plus one tensor plus the process itself (torch, transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from dlm.evals import provenance

PROBE = r"""
import json, resource, sys, time
import torch, transformers  # the process's own footprint, measured before the load
import dlm.loading, dlm.model
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024
base = rss()
t = time.perf_counter()
model = dlm.loading.load_model(sys.argv[1])
wall = time.perf_counter() - t
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base_rss": base, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "model_bytes": nbytes, "load_s": wall, "dtype": str(next(model.parameters()).dtype)}))
"""


def write_random_checkpoint(shape: str, out: str, layers=None, dtype: str = "bfloat16", shard_gb: float = 2.0,
                            seed: int = 0) -> int:
    """A random checkpoint of a real shape in its family's format; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from dlm.formats import detect, format_of
    from dlm.formats.shapes import shape_config
    from dlm.loading import _dtype
    from dlm.model import DLMConfig, DLMModel

    raw = shape_config(shape, layers)
    fam = detect(raw, where=shape)
    fmt = format_of(fam)
    cfg = DLMConfig(**fmt.config(fam, raw, where=shape))
    with torch.device("meta"):
        meta = dict(DLMModel(cfg).named_parameters())
    dt = _dtype(dtype) or torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    limit, shard, size, total, wmap, n = int(shard_gb * 2**30), {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
            wmap.update({k: fname for k in shard})
            shard, size = {}, 0

    for theirs, ours in fmt.names(cfg).items():
        parts = ours if isinstance(ours, tuple) else (ours,)
        shp = (sum(meta[p].shape[0] for p in parts), *meta[parts[0]].shape[1:])
        t = (torch.randn(*shp, generator=g) * 0.02).to(dt)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > limit:
            flush()
        shard[theirs] = t
        size += nbytes
        total += nbytes
    flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**raw, "torch_dtype": str(dt).replace("torch.", "")}, f, indent=1)
    return total


def write_stand_in_tokenizer(out_dir: str, config) -> None:
    """A word-level tokenizer with one token per embedding row ("w0", "w1", ...; words it does not
    know map to "<unk>"), the model config's BOS / EOS / PAD / MASK ids named as such. Speed runs
    only: the text means nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {}
    for role, text in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"), ("pad", "<|pad|>"), ("mask", "<|mask|>")):
        i = getattr(config, f"{role}_token_id", None)
        if i is not None and i not in names:
            names[i] = text
    unk = next(i for i in range(config.vocab_size) if i not in names)
    names[unk] = "<unk>"
    vocab = {names.get(i, f"w{i}"): i for i in range(config.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    roles = {f"{r}_token": names[getattr(config, f"{r}_token_id")] for r in ("bos", "eos", "pad")
             if getattr(config, f"{r}_token_id", None) is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **roles,
                                  additional_special_tokens=[names[config.mask_token_id]])
    tok.save_pretrained(out_dir)


def main(args) -> dict:
    from rich.console import Console

    console = Console(stderr=True)
    ckpt = args.dir or os.path.join(os.path.dirname(args.out) or ".", f"load-{args.shape}")
    t = time.perf_counter()
    size = write_random_checkpoint(args.shape, ckpt, args.layers, args.dtype, args.shard_gb)
    console.print(f"wrote a random {args.shape} checkpoint ({size / 2**30:.2f} GiB, {args.dtype}) to {ckpt} "
                  f"in {time.perf_counter() - t:.0f} s; loading it in a fresh process")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, ckpt], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"loading failed: {r.stderr[-2000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    report = {"command": "dlm bench load " + " ".join(sys.argv[3:]), **provenance(), "shape": args.shape,
              "layers": args.layers, "dtype": args.dtype, "checkpoint_bytes": size, **m,
              "peak_over_checkpoint": m["peak_rss"] / size,
              "peak_minus_base_over_checkpoint": (m["peak_rss"] - m["base_rss"]) / size}
    console.print(f"checkpoint {size / 2**30:.2f} GiB | process before loading {m['base_rss'] / 2**30:.2f} GiB | "
                  f"peak {m['peak_rss'] / 2**30:.2f} GiB = {report['peak_over_checkpoint']:.2f}x the checkpoint "
                  f"({report['peak_minus_base_over_checkpoint']:.2f}x without the process's own) | load "
                  f"{m['load_s']:.1f} s, weights kept in {m['dtype']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    return report
