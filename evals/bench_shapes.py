"""`dlm bench decode --random-init SHAPE`: decoding speed of a published model's real shape with
random weights (no download), per cache mode, at fixed tokens per step.

Random weights are never confident, so confidence-threshold rules would commit one token per
step and early commit would never fire: every configuration here commits exactly
`--tokens-per-step` tokens per step (one network call each), which makes the cache modes
comparable forward for forward. Tokens/s, forwards/s, time per step and peak memory per
configuration and length; accuracy means nothing and is not reported.

    dlm bench decode --random-init mdlm-owt --lengths 256,1024
    dlm bench decode --random-init llada-8b --dtype bfloat16 --device cuda --lengths 256,1024
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import torch

from dlm.evals import provenance


def configs(fam, length: int, k: int, block_length: int) -> dict[str, dict]:
    steps = max(1, length // k)
    base = dict(max_new_tokens=length, unmask="confidence", steps=steps, stop_at_eos=False, temperature=0.0)
    if fam.block_causal:
        return {f"{c} cache": dict(base, cache=c) for c in fam.caches}
    bl = min(block_length, length)
    return {("vanilla (no cache)" if c == "none" else f"{c} cache"): dict(base, cache=c, block_length=bl)
            for c in fam.caches}


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    from dlm.decoding import DecodeConfig, Decoder
    from dlm.families import family_of
    from dlm.formats.shapes import random_model
    from dlm.loading import _dtype

    console = Console(stderr=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype) or torch.float32
    t = time.perf_counter()
    model = random_model(args.random_init, args.layers, dtype=dtype, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    fam = family_of(model.config)
    console.print(f"{args.random_init}: {n_params / 1e6:.0f}M parameters ({fam.name}, random weights, {dtype}) on "
                  f"{device}, built in {time.perf_counter() - t:.1f} s")
    g = torch.Generator().manual_seed(args.seed)
    V = model.config.vocab_size
    prompts = [torch.randint(0, min(V, 1000), (args.prompt_len,), generator=g).tolist() for _ in range(args.batch_size)]
    dec = Decoder(model)
    report = {"command": "dlm bench decode " + " ".join(sys.argv[3:]), **provenance(), "shape": args.random_init,
              "layers": args.layers, "parameters": n_params, "family": fam.name, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "prompt_len": args.prompt_len,
              "tokens_per_step": args.tokens_per_step,
              "note": "random weights: every configuration commits a fixed number of tokens per step (confidence "
                      "rules would never fire); speed only, no accuracy", "results": []}
    for length in [int(x) for x in args.lengths.split(",")]:
        for name, opts in configs(fam, length, args.tokens_per_step, args.block_length).items():
            cfg = DecodeConfig(**opts)
            warm = DecodeConfig(**{**opts, "max_new_tokens": min(length, 32), "steps": None,
                                   "block_length": None if fam.block_causal else min(32, opts.get("block_length") or 32)})
            dec.generate(prompts, warm)  # warm-up (kernels, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            walls, nfe = [], 0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = dec.generate(prompts, cfg)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                walls.append(time.perf_counter() - t0)
                nfe = max(r.stats["nfe"] for r in res)
            wall = statistics.median(walls)
            tokens = sum(len(r.tokens) for r in res)
            row = {"length": length, "config": name, "cache": opts["cache"], "wall_s": wall,
                   "tokens_per_s": tokens / wall, "forwards": nfe, "forwards_per_s": nfe / wall,
                   "ms_per_step": 1000 * wall / nfe, "peak_memory_bytes": _peak_memory(device)}
            report["results"].append(row)
            console.print(f"  length {length:5d}  {name:20s} {row['tokens_per_s']:9.1f} tok/s  "
                          f"{row['forwards_per_s']:7.2f} forwards/s  {row['ms_per_step']:8.1f} ms/step")
        base = next((r for r in report["results"] if r["length"] == length and r["cache"] == "none"), None)
        for r in report["results"]:
            if r["length"] == length and base:
                r["speedup_vs_no_cache"] = r["tokens_per_s"] / base["tokens_per_s"]
    table = Table(title=f"{args.random_init} (random weights, {args.tokens_per_step} tokens per step)")
    for c in ("length", "configuration", "tokens/s", "x no cache", "forwards/s", "ms/step", "peak memory GiB"):
        table.add_column(c)
    for r in report["results"]:
        table.add_row(str(r["length"]), r["config"], f"{r['tokens_per_s']:.1f}",
                      f"{r.get('speedup_vs_no_cache', float('nan')):.2f}", f"{r['forwards_per_s']:.2f}",
                      f"{r['ms_per_step']:.1f}", f"{r['peak_memory_bytes'] / 2**30:.2f}")
    console.print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    console.print(f"wrote {args.out}")
    return report
