"""`dlm bench decode --random-init SHAPE`: decoding speed of a published model's real shape with
random weights (no download), per cache mode, at fixed tokens per step.

Random weights are never confident, so confidence-threshold rules would commit one token per
step and early commit would never fire: every configuration here commits exactly
`--tokens-per-step` tokens per step (one network call each), which makes the cache modes
comparable forward for forward. Tokens/s, forwards/s, time per step and peak memory per
configuration and length; accuracy means nothing and is not reported. Each step reads every
weight once, so weight bytes / step time is the memory bandwidth a step achieves, reported
beside the device's own copy bandwidth measured in the same run. `--ar-baseline` adds the
same-shape AR model (a transformers Llama with the model's width, depth, heads and vocabulary)
through HF `generate` with its static cache.

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

from dlm.errors import DLMError
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


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """The device's memory bandwidth as a large tensor copy achieves it (bytes read + written per
    second; the best of `repeats`)."""
    n = nbytes // 4
    if device.type != "cuda":
        n = min(n, 1 << 26)  # 256 MiB on a CPU
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n * 4 / best


def ar_baseline(model, prompts, lengths, device, dtype, repeats: int) -> list[dict]:
    """The same-shape AR model (random weights) through HF generate with a static cache: greedy,
    exactly `length` new tokens per prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                      max_position_embeddings=max(lengths) + len(prompts[0]) + 8, tie_word_embeddings=False,
                      eos_token_id=None, pad_token_id=0)
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            ar = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    ids = torch.tensor(prompts, device=device)
    rows = []
    for length in lengths:
        # eager (disable_compile): generate would compile the model for its static cache, once per
        # cache length, which does not fit the GPU check's time budget
        kw = dict(max_new_tokens=length, min_new_tokens=length, do_sample=False, cache_implementation="static",
                  pad_token_id=0, disable_compile=True)
        with torch.no_grad():
            ar.generate(ids, **{**kw, "max_new_tokens": min(length, 16), "min_new_tokens": min(length, 16)})
            walls = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                out = ar.generate(ids, **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        new = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        rows.append({"length": length, "config": "AR, HF generate (static cache)", "cache": "ar-static",
                     "wall_s": wall, "tokens_per_s": new / wall, "forwards": length, "forwards_per_s": length / wall,
                     "ms_per_step": 1000 * wall / length, "peak_memory_bytes": _peak_memory(device)})
    del ar
    return rows


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
    from dlm.parallel import is_main, place, rank

    t = time.perf_counter()
    # under --tensor-parallel the model is built on the host and each rank's device gets its
    # shard only (slower to initialise, but never the whole model on one device)
    model = random_model(args.random_init, args.layers, dtype=dtype, device="cpu" if rank() is not None else device)
    n_params = sum(p.numel() for p in model.parameters())
    model = place(model, device)  # --tensor-parallel: this rank's part
    if getattr(args, "compile", False):
        from dlm.runtime import compile_model

        model = compile_model(model)
    tp = getattr(model, "tensor_parallel", 1)
    fam = family_of(model.config)
    console.print(f"{args.random_init}: {n_params / 1e6:.0f}M parameters ({fam.name}, random weights, {dtype}) on "
                  f"{device}, built in {time.perf_counter() - t:.1f} s")
    g = torch.Generator().manual_seed(args.seed)
    V = model.config.vocab_size
    prompts = [torch.randint(0, min(V, 1000), (args.prompt_len,), generator=g).tolist() for _ in range(args.batch_size)]
    dec = Decoder(model)
    # the weights one rank reads per step (its shard under --tensor-parallel)
    weight_bytes = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    console.print(f"device copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 2**30:.2f} GiB")
    report = {"command": "dlm bench decode " + " ".join(sys.argv[3:]), **provenance(), "shape": args.random_init,
              "layers": args.layers, "parameters": n_params, "family": fam.name, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
              "threads": torch.get_num_threads(), "tensor_parallel": tp,
              "compiled": bool(getattr(args, "compile", False)), "batch_size": args.batch_size, "prompt_len": args.prompt_len,
              "tokens_per_step": args.tokens_per_step, "weight_bytes": weight_bytes,
              "device_copy_bytes_per_s": bandwidth,
              "note": "random weights: every configuration commits a fixed number of tokens per step (confidence "
                      "rules would never fire); speed only, no accuracy", "results": []}
    for length in [int(x) for x in args.lengths.split(",")]:
        table = configs(fam, length, args.tokens_per_step, args.block_length)
        wanted = [c.strip() for c in args.configs.split(",")] if getattr(args, "configs", None) else list(table)
        unknown = [c for c in wanted if c not in table]
        if unknown:
            raise DLMError(f"--configs: no configuration {unknown} for this shape; choose from {list(table)}")
        for name in wanted:
            opts = table[name]
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
            row["weight_bytes_per_s"] = weight_bytes * nfe / wall  # every weight read once per step
            row["bandwidth_fraction"] = row["weight_bytes_per_s"] / bandwidth
            report["results"].append(row)
            console.print(f"  length {length:5d}  {name:20s} {row['tokens_per_s']:9.1f} tok/s  "
                          f"{row['forwards_per_s']:7.2f} forwards/s  {row['ms_per_step']:8.1f} ms/step")
        base = next((r for r in report["results"] if r["length"] == length and r["cache"] == "none"), None)
        if base:  # the measure: a cached step against a no-cache step, equal tokens per step
            for r in report["results"]:
                if r["length"] == length:
                    r["step_cost_vs_no_cache"] = r["ms_per_step"] / base["ms_per_step"]
        for r in report["results"]:
            if r["length"] == length and base:
                r["speedup_vs_no_cache"] = r["tokens_per_s"] / base["tokens_per_s"]
    if getattr(args, "ar_baseline", False) and tp == 1:  # (not sharded: once, without --tensor-parallel)
        console.print("the same-shape AR model through HF generate (static cache) ...")
        for r in ar_baseline(model, prompts, [int(x) for x in args.lengths.split(",")], device, dtype, args.repeats):
            r["weight_bytes_per_s"] = weight_bytes * r["forwards"] / r["wall_s"]
            r["bandwidth_fraction"] = r["weight_bytes_per_s"] / bandwidth
            report["results"].append(r)
    table = Table(title=f"{args.random_init} (random weights, {args.tokens_per_step} tokens per step; device copy "
                        f"{bandwidth / 1e9:.0f} GB/s)")
    for c in ("length", "configuration", "tokens/s", "x no cache", "forwards/s", "ms/step", "weights GB/s",
              "of copy bw", "peak memory GiB"):
        table.add_column(c)
    for r in report["results"]:
        table.add_row(str(r["length"]), r["config"], f"{r['tokens_per_s']:.1f}",
                      f"{r.get('speedup_vs_no_cache', float('nan')):.2f}", f"{r['forwards_per_s']:.2f}",
                      f"{r['ms_per_step']:.1f}", f"{r['weight_bytes_per_s'] / 1e9:.1f}",
                      f"{r['bandwidth_fraction']:.0%}", f"{r['peak_memory_bytes'] / 2**30:.2f}")
    console.print(table)
    if is_main():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        console.print(f"wrote {args.out}")
    return report
