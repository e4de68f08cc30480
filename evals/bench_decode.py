"""`dlm bench decode`: decoding speed and task accuracy of diffusion decoder configurations against
the vanilla decoder and an autoregressive model of the same size (HF generate with its KV cache;
vLLM when installed), in one run.

    dlm bench decode runs/mdlm/model --ar-model runs/ar/model --lengths 256 --n-prompts 16

Method (gpt-fast): one warm-up pass per configuration, then timed passes; only generated tokens
up to EOS count. Prompts are the checkable tasks of the embedded corpus (test split), so each
configuration also gets an accuracy. Configurations are interleaved round by round, and the ratios
come from the same run. Writes JSON, a rich table and a PNG of tokens/s against accuracy.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from dlm.evals import provenance
from dlm.families import family_of

# name -> DecodeConfig overrides (block_length / steps are filled per generation length)
CONFIGS = {
    "vanilla": dict(unmask="confidence", cache="none"),  # one token per step, no cache
    "threshold": dict(unmask="threshold", threshold=0.9, cache="none"),
    "threshold+prefix": dict(unmask="threshold", threshold=0.9, cache="prefix"),
    "threshold+dual": dict(unmask="threshold", threshold=0.9, cache="dual"),
    "factor+dual": dict(unmask="factor", factor=1.0, cache="dual"),
    "early-commit": dict(unmask="confidence", early_commit=True, early_commit_scope="answer", cache="none"),
    "threshold+dual+early-commit": dict(unmask="threshold", threshold=0.9, cache="dual", early_commit=True),
    "early-commit(3/2/1)": dict(unmask="confidence", early_commit=True, early_commit_scope="answer",
                                early_commit_gaps=(3.0, 2.0, 1.0), cache="none"),
}
BLOCK_CONFIGS = {
    "vanilla": dict(unmask="confidence", cache="none"),
    "exact-cache": dict(unmask="confidence", cache="exact"),
    "threshold+exact": dict(unmask="threshold", threshold=0.9, cache="exact"),
    "threshold+exact+early-commit": dict(unmask="threshold", threshold=0.9, cache="exact", early_commit=True),
    # Prophet's rule on the one-token-per-step decoder: default gaps, and lower gaps (commits sooner)
    "exact+early-commit": dict(unmask="confidence", cache="exact", early_commit=True),
    "exact+early-commit(3/2/1)": dict(unmask="confidence", cache="exact", early_commit=True,
                                      early_commit_gaps=(3.0, 2.0, 1.0)),
}


def _prompts(n: int, seed: int, split: str = "test"):
    from dlm.tasks import generate_examples

    return generate_examples(None, n, seed=seed, split=split)


def _gap_configs(spec: str, is_block: bool) -> dict:
    """--early-commit-gaps "3/2/1,2/1/0.5": one early-commit configuration per gap triple."""
    from dlm.errors import DLMError

    out = {}
    for item in [x.strip() for x in (spec or "").split(",") if x.strip()]:
        try:
            gaps = tuple(float(g) for g in item.split("/"))
        except ValueError:
            gaps = ()
        if len(gaps) != 3 or min(gaps) < 0:
            raise DLMError(f"--early-commit-gaps takes triples like 3/2/1 (early / middle / late); got {item!r}")
        if is_block:
            out[f"exact+early-commit({item})"] = dict(unmask="confidence", cache="exact", early_commit=True,
                                                      early_commit_gaps=gaps)
        else:
            out[f"early-commit({item})"] = dict(unmask="confidence", early_commit=True, early_commit_scope="answer",
                                                early_commit_gaps=gaps, cache="none")
    return out


def _threshold_configs(spec: str, is_block: bool) -> dict:
    """--thresholds "0.7,0.5": one threshold + cache configuration per tau (dual cache for MDLM /
    RADD, exact for block models), to choose tau on the validation split."""
    from dlm.errors import DLMError

    out = {}
    for item in [x.strip() for x in (spec or "").split(",") if x.strip()]:
        try:
            tau = float(item)
        except ValueError:
            tau = -1.0
        if not 0.0 < tau <= 1.0:
            raise DLMError(f"--thresholds takes values in (0, 1] like 0.9,0.7; got {item!r}")
        cache = "exact" if is_block else "dual"
        out[f"threshold({item})+{cache}"] = dict(unmask="threshold", threshold=tau, cache=cache)
    return out


def run_diffusion(model, tok, examples, length: int, overrides: dict, block_length: int, batch_size: int):
    from dlm.decoding import DecodeConfig, Decoder

    dec = Decoder(model)
    cfg = dict(overrides)
    if not family_of(model.config).block_causal:
        cfg.setdefault("block_length", min(block_length, length))
    preds, gen_tokens, nfe, request_nfe = [], 0, 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = [dec.family.encode(tok, e.prompt) for e in chunk]
        res = dec.generate(ids, DecodeConfig(max_new_tokens=length, **cfg))
        for r in res:
            preds.append(tok.decode(r.tokens, skip_special_tokens=True))
            gen_tokens += len(r.tokens)
        nfe += max(r.stats["nfe"] for r in res)  # the batch's network calls
        request_nfe += sum(r.stats["nfe"] for r in res)  # calls each request took part in
    wall = time.perf_counter() - t0
    return preds, gen_tokens, nfe, wall, request_nfe / max(1, len(examples))


def run_hf_generate(llama, tok, examples, length: int, batch_size: int):
    """The AR baseline through stock transformers generate (KV cache), greedy, stopping at EOS."""
    preds, gen_tokens, nfe = [], 0, 0
    eos, bos, pad = tok.eos_token_id, tok.bos_token_id, tok.pad_token_id
    t0 = time.perf_counter()
    for ex in examples:  # batch 1: no padding effects on AR speed or output
        ids = torch.tensor([[bos, *tok.encode(ex.prompt, add_special_tokens=False)]], device=llama.device)
        out = llama.generate(ids, max_new_tokens=length, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        new = out[0, ids.shape[1]:].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        preds.append(tok.decode(new, skip_special_tokens=True))
        gen_tokens += len(new)
        nfe += len(new) + 1
    return preds, gen_tokens, nfe, time.perf_counter() - t0, None


def run_vllm(vllm_python: str, ar_model: str, tok, examples, length: int, repeats: int):
    """The AR baseline through vLLM, run by the python of a separate vLLM environment."""
    import shutil
    import statistics
    import subprocess
    import tempfile

    from dlm.errors import DLMError
    from dlm.export import export_llama

    tmp = tempfile.mkdtemp(prefix="dlm-vllm-")
    try:
        export_llama(ar_model, os.path.join(tmp, "llama"))
        eos, bos = tok.eos_token_id, tok.bos_token_id
        job = {"model": os.path.join(tmp, "llama"), "max_tokens": length, "eos": eos, "rounds": max(1, repeats),
               "prompts": [[bos, *tok.encode(e.prompt, add_special_tokens=False)] for e in examples]}
        with open(os.path.join(tmp, "in.json"), "w") as f:
            json.dump(job, f)
        script = os.path.join(os.path.dirname(__file__), "vllm_generate.py")
        r = subprocess.run([vllm_python, script, os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")],
                           capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
        if r.returncode != 0:
            errors = [line for line in r.stderr.splitlines() if "Error" in line] or r.stderr.splitlines()[-1:]
            raise DLMError(f"the vLLM run failed (exit {r.returncode}): {' | '.join(errors[-2:])}")
        with open(os.path.join(tmp, "out.json")) as f:
            out = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    preds, gen = [], 0
    for t in out["tokens"]:
        t = t[: t.index(eos)] if eos in t else t
        preds.append(tok.decode(t, skip_special_tokens=True))
        gen += len(t)
    return preds, gen, gen + len(examples), statistics.median(out["wall_s"]), None


def main(args) -> dict:
    from dlm.errors import DLMError
    from dlm.loading import load_tokenizer_for
    from dlm.loading import load_model
    from dlm.tasks import score_predictions

    if getattr(args, "random_init", None):
        from dlm.evals.bench_shapes import main as shapes_main

        return shapes_main(args)
    if not args.model:
        raise DLMError("give a model directory, or --random-init SHAPE for a published model's shape")
    torch.manual_seed(0)
    from dlm.parallel import is_main, place

    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = place(load_model(args.model), device)  # --tensor-parallel: this rank's part
    if getattr(args, "compile", False):
        from dlm.runtime import compile_model

        model = compile_model(model)
    tp = getattr(model, "tensor_parallel", 1)
    if tp > 1 and (args.ar_model or getattr(args, "vllm_python", None)):
        raise DLMError("--tensor-parallel splits the diffusion model only; run the AR baselines (--ar-model, "
                       "--vllm-python) without it")
    tok = load_tokenizer_for(args.model, model.config)
    examples = _prompts(args.n_prompts, args.seed, getattr(args, "split", "test"))
    is_block = family_of(model.config).block_causal
    extra = {**_gap_configs(getattr(args, "early_commit_gaps", None), is_block),
             **_threshold_configs(getattr(args, "thresholds", None), is_block)}
    table = {**(BLOCK_CONFIGS if is_block else CONFIGS), **extra}
    names = [c.strip() for c in args.configs.split(",")] if args.configs else list(table)
    names += [n for n in extra if n not in names]
    unknown = [c for c in names if c not in table]
    if unknown:
        raise DLMError(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    llama = None
    if args.ar_model:
        from dlm.export import to_llama

        llama = to_llama(load_model(args.ar_model, expect_objective="ar")).to(device).eval()
    report = {"command": "dlm bench decode " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else []), **provenance(),
              "model": args.model, "objective": model.config.objective, "ar_model": args.ar_model,
              "n_prompts": len(examples), "split": getattr(args, "split", "test"), "device": str(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
              "tensor_parallel": tp,
              "results": []}
    for length in [int(x) for x in args.lengths.split(",")]:
        runs = {n: [] for n in names}
        if llama is not None:
            runs["AR (HF generate)"] = []
        outputs = {}
        for rnd in range(args.repeats + 1):  # round 0 is the warm-up
            sub = examples[: max(1, args.batch_size)] if rnd == 0 else examples
            for name in runs:
                if name == "AR (HF generate)":
                    out = run_hf_generate(llama, tok, sub, length, args.batch_size)
                else:
                    out = run_diffusion(model, tok, sub, length, table[name], args.block_length, args.batch_size)
                if rnd > 0:
                    runs[name].append(out)
                    outputs[name] = out
        if getattr(args, "vllm_python", None) and args.ar_model:
            out = run_vllm(args.vllm_python, args.ar_model, tok, examples, length, args.repeats)
            runs["AR (vLLM, all prompts batched)"] = [out]
            outputs["AR (vLLM, all prompts batched)"] = out
        for name, rs in runs.items():
            preds, gen_tokens, nfe, _, nfe_per_request = outputs[name]
            wall = statistics.median(r[3] for r in rs)
            acc = score_predictions(examples, preds)
            report["results"].append({
                "config": name, "length": length, "tokens_per_s": gen_tokens / wall, "wall_s": wall,
                "generated_tokens": gen_tokens, "nfe": nfe, "tokens_per_forward": gen_tokens / max(1, nfe),
                "accuracy": acc["accuracy"], "per_task": acc["per_task"],
                "nfe_per_request": nfe_per_request,
                "settings": table.get(name, {"engine": "vllm" if "vLLM" in name else "transformers generate"}),
            })
        base = next((r for r in report["results"] if r["config"] == "vanilla" and r["length"] == length), None)
        for r in report["results"]:
            if r["length"] == length:
                # None without a vanilla row (--configs left it out) or when vanilla generated
                # nothing (every answer began with EOS): no rate to compare
                r["speedup_vs_vanilla"] = (r["tokens_per_s"] / base["tokens_per_s"]
                                           if base is not None and base["tokens_per_s"] else None)
    if not is_main():
        return report
    _print(report)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    _plot(report, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}", file=sys.stderr)
    return report


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _print(report):
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"decoding: {report['model']} ({report['objective']}), {report['n_prompts']} prompts")
    for c in ("length", "configuration", "tokens/s", "x vanilla", "NFE", "tokens/forward", "accuracy"):
        t.add_column(c)
    for r in report["results"]:
        t.add_row(str(r["length"]), r["config"], f"{r['tokens_per_s']:.1f}", _ratio(r["speedup_vs_vanilla"]),
                  str(r["nfe"]), f"{r['tokens_per_forward']:.2f}", f"{r['accuracy']:.3f}")
    Console(stderr=True).print(t)


def _plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for length in sorted({r["length"] for r in report["results"]}):
        rs = [r for r in report["results"] if r["length"] == length]
        ax.scatter([r["tokens_per_s"] for r in rs], [r["accuracy"] for r in rs], label=f"length {length}")
        for r in rs:
            ax.annotate(r["config"], (r["tokens_per_s"], r["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens / s")
    ax.set_ylabel("task accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
