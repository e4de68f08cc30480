"""The perplexity table at small scale: AR, MDLM, RADD, BD3-LM (B' = 4, 8, 16) and E2D2 trained
alike and scored on the same validation tokens.

    python -m dlm.evals.ppl_table                      # default size: under an hour on a 2-core CPU
    python -m dlm.evals.ppl_table --size gpt2-small --seq-len 1024 --steps 20000 --micro-batch 32  # GPU

Every model gets the same backbone width and depth (E2D2 splits the same total layers into
encoder + decoder), the same tokenizer, sequence length, batch, learning-rate schedule and number
of steps, hence the same training tokens. Nothing is tuned per model. Validation perplexity is
exact for AR and the NELBO bound (full time range, `--mc-samples` noise draws) for the rest.
Writes OUT/ppl_table.{json,md,png}; finished models are reused when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from dlm.evals import provenance

MODELS = {  # name -> TrainConfig overrides
    "AR": dict(objective="ar"),
    "BD3-LM B'=4": dict(objective="bd3lm", block_size=4),
    "BD3-LM B'=8": dict(objective="bd3lm", block_size=8),
    "BD3-LM B'=16": dict(objective="bd3lm", block_size=16),
    "E2D2 B'=4": dict(objective="e2d2", block_size=4),
    "MDLM": dict(objective="mdlm"),
    "RADD": dict(objective="radd"),
}


def slug(name: str) -> str:
    return name.lower().replace("'", "").replace("=", "").replace(" ", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlm.evals.ppl_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="default-text", help="corpus spec as for `dlm train --data`")
    p.add_argument("--size", default="tiny", help="model size preset (debug, tiny, small, medium, gpt2-small)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--mc-samples", type=int, default=8, help="noise draws per sequence for the NELBO bound")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--runs", default="runs/ppl_table", help="where the models are trained")
    p.add_argument("--out", default="evals/results", help="where the table, JSON and plot go")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    from dlm.data import build_lm_dataset
    from dlm.errors import DLMError
    from dlm.loading import load_model
    from dlm.likelihood import perplexity
    from dlm.tokenizer import load_tokenizer

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise DLMError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    common = dict(data=args.data, size=args.size, seq_len=args.seq_len, micro_batch=args.micro_batch,
                  max_steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                  eval_every=max(1, args.steps // 4), save_every=args.steps, log_every=max(1, args.steps // 20),
                  vocab_size=args.vocab_size, seed=args.seed, tensorboard=False)
    tok_dir = None
    rows = []
    val = None
    for name in names:
        run = os.path.join(args.runs, slug(name))
        model_dir = os.path.join(run, "model")
        t0 = time.time()
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            print(f"\n== {name}: training -> {run}", file=sys.stderr)
            train(TrainConfig(output_dir=run, tokenizer=tok_dir, resume=True, **common, **MODELS[name]))
        else:
            print(f"\n== {name}: reusing {model_dir}", file=sys.stderr)
        train_s = time.time() - t0
        tok_dir = tok_dir or model_dir  # every later model shares the first one's tokenizer
        recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
        windows = [r["noise_window"] for r in recs if "noise_window" in r]
        model = load_model(model_dir).eval()
        if val is None:
            tok = load_tokenizer(model_dir)
            val = build_lm_dataset(args.data, tok, args.seq_len, split="validation").with_format("torch")
        res = perplexity(model, val, batch_size=args.micro_batch, mc_samples=args.mc_samples, seed=args.seed,
                         progress=sys.stderr.isatty())
        rows.append({"model": name, **MODELS[name], "ppl": res["ppl"], "nll": res["nll"], "bound": res["bound"],
                     "nll_se": res["nll_se"], "ppl_low": res["ppl_low"], "ppl_high": res["ppl_high"],
                     "val_tokens": res["tokens"], "train_tokens_per_s": statistics.median(tps) if tps else None,
                     "train_tokens": args.steps * args.micro_batch * args.seq_len,
                     "params": sum(p.numel() for p in model.parameters()),
                     "noise_window": windows[-1] if windows else None,
                     "train_wall_s": train_s})
        print(f"   {name}: perplexity {res['ppl']:.2f} ({'bound' if res['bound'] else 'exact'})", file=sys.stderr)
    report = {"command": " ".join(["python -m dlm.evals.ppl_table", *(argv if argv is not None else sys.argv[1:])]), **provenance(),
              "settings": vars(args), "rows": rows}
    write_outputs(report, args.out)
    return report


def too_close(rows: list[dict]) -> list[tuple[str, str]]:
    """Pairs of models whose perplexities differ by less than their Monte Carlo error (the
    difference of per-token NLLs under 1.96 times its standard error): not told apart."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if a.get("nll_se") is None or b.get("nll_se") is None:
                continue
            se = (a["nll_se"] ** 2 + b["nll_se"] ** 2) ** 0.5
            if abs(a["nll"] - b["nll"]) < 1.96 * se:
                out.append((a["model"], b["model"]))
    return out


def write_outputs(report: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rows = report["rows"]
    report["not_told_apart"] = too_close(rows)
    with open(os.path.join(out_dir, "ppl_table.json"), "w") as f:
        json.dump(report, f, indent=1)
    ar = next((r["ppl"] for r in rows if r["model"] == "AR"), None)
    lines = [f"Command: `{report['command']}`", "",
             "| model | val. perplexity | 95% MC interval | kind | / AR | train tokens/s | params | noise window |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ppl'] / ar:.2f}" if ar else "-"
        tps = f"{r['train_tokens_per_s']:,.0f}" if r["train_tokens_per_s"] else "-"
        win = "-" if not r["noise_window"] else f"[{r['noise_window'][0]}, {r['noise_window'][1]}]"
        ci = "exact" if not r["bound"] else "-" if r.get("ppl_low") is None else \
            f"{r['ppl_low']:.2f} to {r['ppl_high']:.2f}"
        lines.append(f"| {r['model']} | {r['ppl']:.2f} | {ci} | {'NELBO bound' if r['bound'] else 'exact'} | "
                     f"{rel} | {tps} | {r['params'] / 1e6:.2f}M | {win} |")
    lines += ["", "The NELBO bounds are Monte Carlo estimates (heavy-tailed: a token masked at small t "
              "weighs 1/t); the interval is 1.96 standard errors over the noise draws."]
    if report["not_told_apart"]:
        lines.append("Differ by less than their Monte Carlo error (not told apart by this table): " +
                     "; ".join(f"{a} vs {b}" for a, b in report["not_told_apart"]) + ".")
    with open(os.path.join(out_dir, "ppl_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'dlm[plot]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["model"] for r in rows]
    colors = ["tab:gray" if not r["bound"] else "tab:blue" for r in rows]
    ax.bar(names, [r["ppl"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(i, r["ppl"], f"{r['ppl']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("val. perplexity\n(AR exact, others NELBO bound)", fontsize=9)
    s = report["settings"]
    ax.set_title(f"{s['size']} models, {s['steps']} steps x {s['micro_batch']} x {s['seq_len']} tokens on {s['data']}",
                 fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ppl_table.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from dlm.cli import _quiet_libraries
    from dlm.errors import DLMError

    _quiet_libraries()
    try:
        main()
    except DLMError as e:
        print(f"dlm: error: {e}", file=sys.stderr)
        sys.exit(2)
