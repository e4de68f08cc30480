"""`dlm bench schemas`: coverage, validity and latency of JSON Schema constrained decoding on
real-world schemas (a seeded sample of JSONSchemaBench, evals/jsonschemabench/sample.jsonl.gz).

For every schema: compile it (time, engine, what is enforced only approximately), then decode
one constrained request with the serving defaults (threshold + cache) and a wall-clock limit,
and validate the output independently (`jsonschema` with format checking, against the original
schema). Reported by folder: compiled, outputs valid, requests that failed alone (no output of
max_new_tokens fits; the final check caught an approximately enforced keyword), compile p50 /
p95 / max, request p50 / max.

    dlm bench schemas runs/quickstart/mdlm/model --max-new-tokens 256 \\
        --out evals/results/jsonschemabench.json
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from dlm.errors import DLMError
from dlm.evals import provenance
from dlm.families import family_of

SAMPLE = Path(__file__).parent / "jsonschemabench" / "sample.jsonl.gz"


def load_sample(path) -> list[dict]:
    try:
        with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DLMError(f"cannot read the schema sample {path}: {e}") from None


def validate(text: str, schema: dict) -> bool:
    """Independent check: parse, then jsonschema with format checking (no network)."""
    import jsonschema
    from referencing import Registry

    try:
        value = json.loads(text)
        cls = jsonschema.validators.validator_for(schema)

        def no_retrieval(uri):
            raise LookupError(uri)

        cls(schema, format_checker=cls.FORMAT_CHECKER, registry=Registry(retrieve=no_retrieval)).validate(value)
        return True
    except Exception:
        return False


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(args) -> None:
    import torch
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from dlm.constraints import (
        CompileLimits,
        Constraint,
        ConstraintCompiler,
        ConstraintUnsatisfiable,
        ConstraintViolation,
    )
    from dlm.decoding import DecodeConfig, Decoder
    from dlm.loading import load_model
    from dlm.tokenizer import check_tokenizer_for_model, load_tokenizer

    items = load_sample(args.sample or SAMPLE)
    if args.limit:
        items = items[: args.limit]
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.tokenizer or args.model)
    check_tokenizer_for_model(tok, model.config)
    block = family_of(model.config).block_causal
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, unmask="threshold", threshold=args.threshold,
                          block_length=None if block else args.block_length, cache="exact" if block else "dual",
                          temperature=0.0)
    compiler = ConstraintCompiler(tok, model.config.vocab_size, model.config.eos_token_id,
                                  limits=CompileLimits(timeout_s=args.compile_timeout))
    compiler.warm()
    dec = Decoder(model)
    torch.set_grad_enabled(False)
    rows = []
    console = Console(stderr=True)
    for it in track(items, description="schemas", console=console, disable=not sys.stderr.isatty()):
        row = {"folder": it["folder"], "file": it["file"]}
        t0 = time.perf_counter()
        try:
            compiled = compiler.compile(Constraint.json_schema(it["schema"]))
            row.update(compiled=True, route=compiled.route, approximate=compiled.approximate)
        except DLMError as e:
            row.update(compiled=False, outcome="refused", error=str(e)[:300])
            compiled = None
        row["compile_s"] = time.perf_counter() - t0
        if compiled is not None:
            title = str(it["schema"].get("title") or it["file"].rsplit(".", 1)[0]) if isinstance(it["schema"], dict) else ""
            prompt = tok.encode(f"{title} as json:", add_special_tokens=False)
            t0 = time.perf_counter()
            try:
                req = dec.new_request(prompt, config, args.seed, compiled)
                deadline = time.perf_counter() + args.request_timeout
                while not req.finished:
                    dec.step([req])
                    if time.perf_counter() > deadline and not req.finished:
                        dec.cancel(req)
                res = req.result
                text = tok.decode(res.tokens, skip_special_tokens=True)
                if res.finish_reason == "cancelled":
                    row["outcome"] = "timeout"
                elif isinstance(res.error, ConstraintViolation):
                    row.update(outcome="check_failed", error=str(res.error)[:300])
                elif res.error is not None:
                    kind = "unsatisfiable" if isinstance(res.error, ConstraintUnsatisfiable) else "error"
                    row.update(outcome=kind, error=str(res.error)[:300])
                else:
                    row.update(outcome="valid" if validate(text, it["schema"]) else "INVALID", text=text[:400],
                               tokens=len(res.tokens), nfe=res.stats["nfe"])
            except ConstraintUnsatisfiable as e:  # no output of max_new_tokens fits: refused before decoding
                row.update(outcome="unsatisfiable", error=str(e)[:300])
            except DLMError as e:
                row.update(outcome="error", error=str(e)[:300])
            row["request_s"] = time.perf_counter() - t0
        rows.append(row)
        if row.get("outcome") == "INVALID":
            console.print(f"[red]INVALID output for {it['folder']}/{it['file']}: {row['text'][:200]!r}")

    folders = sorted({r["folder"] for r in rows})
    summary = {}
    for name in folders + ["all"]:
        rs = [r for r in rows if name in ("all", r["folder"])]
        outs = [r for r in rs if r.get("outcome") in ("valid", "INVALID")]
        comp = [r["compile_s"] for r in rs]
        req = [r["request_s"] for r in rs if "request_s" in r]
        summary[name] = {
            "schemas": len(rs), "compiled": sum(r["compiled"] for r in rs),
            "outputs": len(outs), "valid_outputs": sum(r["outcome"] == "valid" for r in outs),
            "unsatisfiable": sum(r.get("outcome") == "unsatisfiable" for r in rs),
            "check_failed": sum(r.get("outcome") == "check_failed" for r in rs),
            "timeouts": sum(r.get("outcome") == "timeout" for r in rs),
            "errors": sum(r.get("outcome") == "error" for r in rs),
            "compile_p50_s": statistics.median(comp) if comp else 0.0, "compile_p95_s": _pct(comp, 0.95),
            "compile_max_s": max(comp, default=0.0),
            "request_p50_s": statistics.median(req) if req else 0.0, "request_max_s": max(req, default=0.0),
        }
    routes = defaultdict(int)
    for r in rows:
        routes[(r.get("route") or "refused").split(" (")[0]] += 1
    table = Table(title=f"JSONSchemaBench sample: {len(rows)} schemas, max_new_tokens {args.max_new_tokens}")
    for col in ("folder", "n", "compiled", "valid / outputs", "unsat", "check failed", "timeouts",
                "compile p50 / p95 / max", "request p50 / max"):
        table.add_column(col)
    for name, s in summary.items():
        table.add_row(name, str(s["schemas"]), f"{s['compiled']} ({s['compiled'] / max(1, s['schemas']):.0%})",
                      f"{s['valid_outputs']} / {s['outputs']}", str(s["unsatisfiable"]), str(s["check_failed"]),
                      str(s["timeouts"]),
                      f"{s['compile_p50_s']:.3f} / {s['compile_p95_s']:.3f} / {s['compile_max_s']:.2f} s",
                      f"{s['request_p50_s']:.1f} / {s['request_max_s']:.1f} s")
    Console().print(table)
    out = {"command": "dlm bench schemas " + " ".join(sys.argv[3:]), **provenance(), "model": args.model,
           "sample": str(args.sample or SAMPLE), "config": {"max_new_tokens": args.max_new_tokens,
                                                           "unmask": "threshold", "threshold": args.threshold,
                                                           "block_length": config.block_length, "cache": config.cache,
                                                           "compile_timeout_s": args.compile_timeout,
                                                           "request_timeout_s": args.request_timeout},
           "routes": dict(routes), "summary": summary, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
