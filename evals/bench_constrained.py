"""`dlm bench constrained`: JSON Schema constrained decoding vs unconstrained, on real-world-style
schemas (evals/schemas/realworld.json, 32 schemas in the style of JSONSchemaBench).

For every schema and seed the same prompt is decoded twice with the same policy and seed:
unconstrained, and constrained to the schema. Reports the validity rate of both (parse + validate
with `jsonschema`), generated tokens/s, time per generated token and per network call, the share
of time spent in the constraint, and compile times. Ratios come from one run.

    dlm bench constrained runs/reference/mdlm/model
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dlm.errors import DLMError
from dlm.evals import provenance
from dlm.families import family_of

SCHEMAS = Path(__file__).parent / "schemas" / "realworld.json"


def _valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError, RecursionError):
        return False


def main(args) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from dlm.constraints import Constraint, ConstraintCompiler
    from dlm.decoding import DecodeConfig, Decoder
    from dlm.loading import load_model
    from dlm.tokenizer import check_tokenizer_for_model, load_tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = Path(args.schemas or SCHEMAS)
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DLMError(f"cannot read schemas from {path}: {e}") from None
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.tokenizer or args.model)
    check_tokenizer_for_model(tok, model.config)
    dec = Decoder(model)
    compiler = ConstraintCompiler(tok, model.config.vocab_size, model.config.eos_token_id)
    block = family_of(model.config).block_causal
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, unmask=args.unmask, threshold=args.threshold,
                          temperature=args.temperature, block_length=None if block else args.block_length,
                          cache=("exact" if block else "dual") if args.cache == "auto" else args.cache)
    console = Console(stderr=True)
    rows = []
    totals = {"free": [0, 0.0, 0, 0, 0], "constrained": [0, 0.0, 0, 0, 0]}  # tokens, wall, nfe, valid, n
    constraint_s = 0.0
    # warm-up (not timed)
    dec.generate([tok.encode("json:", add_special_tokens=False)], config)
    for it in items:
        schema = it["schema"]
        t0 = time.perf_counter()
        compiled = compiler.compile(Constraint.json_schema(schema))
        compile_s = time.perf_counter() - t0
        prompt = tok.encode(f"{it['name'].replace('_', ' ')} as json:", add_special_tokens=False)
        row = {"name": it["name"], "compile_s": compile_s, "states": compiled.dfa.num_states if compiled.dfa else None}
        for kind, cons in (("free", None), ("constrained", compiled)):
            valid = 0
            for s in range(args.seeds):
                res = dec.generate([prompt], config, seeds=[args.seed + s],
                                   constraints=None if cons is None else [cons])[0]
                text = tok.decode(res.tokens, skip_special_tokens=True)
                ok = _valid(text, schema)
                valid += ok
                t = totals[kind]
                t[0] += len(res.tokens)
                t[1] += res.stats["wall_s"]
                t[2] += res.stats["nfe"]
                t[3] += ok
                t[4] += 1
                if cons is not None:
                    constraint_s += res.stats["constraint_s"]
                    if not ok:
                        console.print(f"[red]INVALID constrained output for {it['name']}: {text!r}")
                row[f"{kind}_example"] = text
            row[f"{kind}_valid"] = valid / args.seeds
        rows.append(row)
        console.print(f"{it['name']}: constrained valid {row['constrained_valid']:.0%}, "
                      f"unconstrained valid {row['free_valid']:.0%}  {row['constrained_example'][:60]!r}")

    def rate(t):
        return {"tokens": t[0], "wall_s": t[1], "nfe": t[2], "valid_rate": t[3] / max(1, t[4]),
                "tokens_per_s": t[0] / t[1] if t[1] else 0.0, "s_per_token": t[1] / max(1, t[0]),
                "s_per_forward": t[1] / max(1, t[2])}

    free, cons = rate(totals["free"]), rate(totals["constrained"])
    summary = {"schemas": len(items), "seeds": args.seeds, "unconstrained": free, "constrained": cons,
               "time_per_token_ratio": cons["s_per_token"] / free["s_per_token"] if free["s_per_token"] else None,
               "time_per_forward_ratio": cons["s_per_forward"] / free["s_per_forward"] if free["s_per_forward"] else None,
               # the same prompts and settings, decoded whole: the constrained outputs are shorter
               "time_per_request_ratio": cons["wall_s"] / free["wall_s"] if free["wall_s"] else None,
               "constraint_share_of_time": constraint_s / cons["wall_s"] if cons["wall_s"] else None,
               "compile_s_total": sum(r["compile_s"] for r in rows)}
    table = Table(title=f"JSON Schema constrained decoding, {len(items)} schemas x {args.seeds} seeds")
    for col in ("", "valid", "tokens/s", "s / token", "s / forward", "NFE"):
        table.add_column(col)
    for name, r in (("unconstrained", free), ("constrained", cons)):
        table.add_row(name, f"{r['valid_rate']:.1%}", f"{r['tokens_per_s']:.1f}", f"{r['s_per_token'] * 1e3:.2f} ms",
                      f"{r['s_per_forward'] * 1e3:.2f} ms", str(r["nfe"]))
    Console().print(table)
    print(f"time per token constrained / unconstrained: {summary['time_per_token_ratio']:.2f}; per forward: "
          f"{summary['time_per_forward_ratio']:.2f}; per request: {summary['time_per_request_ratio']:.2f}; "
          f"constraint share of constrained time: "
          f"{summary['constraint_share_of_time']:.1%}", file=sys.stderr)
    out = {"command": "dlm bench constrained " + " ".join(sys.argv[3:]), **provenance(), "model": args.model,
           "config": {k: getattr(config, k) for k in ("max_new_tokens", "unmask", "threshold", "temperature",
                                                      "block_length", "cache")},
           "summary": summary, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
