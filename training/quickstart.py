"""`dlm quickstart`: the whole pipeline on the embedded corpus, offline, in minutes on a CPU.

    dlm quickstart --output-dir runs/quickstart --max-steps 300

embedded corpus -> BPE tokenizer -> tiny MDLM and a same-size AR baseline (same data, same
steps) -> validation perplexity (NELBO bound vs exact) -> a few samples from each.
"""

from __future__ import annotations

import json
import os
import sys


def quickstart(args) -> dict:
    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    from dlm.data import build_lm_dataset
    from dlm.families import family_of
    from dlm.loading import load_model
    from dlm.likelihood import perplexity
    from dlm.sample import sample, strip_after_eos
    from dlm.tokenizer import load_tokenizer

    out = args.output_dir
    common = dict(
        data="default", size=args.size, seq_len=128, max_steps=args.max_steps, micro_batch=16, lr=1e-3,
        warmup_steps=min(100, args.max_steps // 10), eval_every=max(50, args.max_steps // 4),
        save_every=args.max_steps, log_every=max(10, args.max_steps // 20), seed=args.seed, vocab_size=2048,
        threads=getattr(args, "threads", None),
    )
    results = {}
    tok_dir = None
    for objective in ("mdlm", "ar"):
        run_dir = os.path.join(out, objective)
        print(f"\n== training {objective} ({args.size}, {args.max_steps} steps) -> {run_dir}", file=sys.stderr)
        cfg = TrainConfig(objective=objective, output_dir=run_dir, tokenizer=tok_dir, **common)
        if os.path.isfile(os.path.join(run_dir, "model", "config.json")):
            print("   already trained; reusing it (delete the folder to retrain)", file=sys.stderr)
        else:  # continue an interrupted quickstart from its checkpoint, else start
            resume = os.path.isdir(os.path.join(run_dir, "checkpoints"))
            train(TrainConfig(**{**cfg.to_dict(), "resume": resume}))
        tok_dir = os.path.join(out, "mdlm", "tokenizer")  # the AR baseline shares the tokenizer

        model = load_model(os.path.join(run_dir, "model")).eval()
        tok = load_tokenizer(os.path.join(run_dir, "model"))
        val = build_lm_dataset("default", tok, 128, split="validation").with_format("torch")
        res = perplexity(model, val, batch_size=16, mc_samples=4, max_batches=8)
        prompt = tok.encode("add: 12+30=", add_special_tokens=False)
        greedy = family_of(model.config).autoregressive  # AR: greedy; diffusion: the model's own distribution
        s = sample(model, prompt, n=3, length=24, steps=24, temperature=0.0 if greedy else 1.0, seed=0)
        texts = [tok.decode(strip_after_eos(r[1 + len(prompt):], model.config.eos_token_id)) for r in s.tokens.tolist()]
        results[objective] = {"val_ppl": res["ppl"], "bound": res["bound"], "tokens": res["tokens"],
                              "ppl_low": res["ppl_low"], "ppl_high": res["ppl_high"], "samples": texts, "nfe": s.nfe}

    print("\n== results (validation split of the embedded corpus)", file=sys.stderr)
    for name, r in results.items():
        kind = "NELBO bound" if r["bound"] else "exact"
        ci = f", 95% MC interval {r['ppl_low']:.1f}-{r['ppl_high']:.1f}" if r["bound"] and r["ppl_low"] else ""
        print(f"  {name:5s} perplexity {r['val_ppl']:8.2f} ({kind}{ci}, {r['tokens']} tokens)", file=sys.stderr)
        for t in r["samples"]:
            print(f"        add: 12+30= -> {t!r}", file=sys.stderr)
    with open(os.path.join(out, "quickstart.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {os.path.join(out, 'quickstart.json')}", file=sys.stderr)
    return results
