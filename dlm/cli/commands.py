"""What each `dlm` subcommand runs (the parser is dlm/cli/parser.py). Heavy imports (torch,
transformers, deepspeed) happen inside the functions, so `dlm --help` and a bad flag stay fast."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional


def cmd_train(args) -> None:
    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    cfg = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    cfg = cfg.updated(overrides, source="command-line flags")
    out = train(cfg)
    if out and int(os.environ.get("RANK", "0")) == 0:
        print(out)  # the exported model directory, once (rank 0) under a launcher
    from dlm.training.distributed import shutdown

    shutdown()  # the process exits next: tear the process group down cleanly first


# ------------------------------------------------------------------ tokenizer / corpus
def cmd_tokenizer_train(args) -> None:
    from dlm.data import load_text_dataset
    from dlm.tokenizer import train_tokenizer

    ds = load_text_dataset(args.data, args.split, args.text_field)
    tok = train_tokenizer(ds["text"], args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    print(f"trained a {len(tok)}-token byte-level BPE tokenizer on {len(ds)} documents -> {args.out}")


def cmd_corpus_write(args) -> None:
    from dlm.corpus import corpus_stats, write_default_corpus

    paths = write_default_corpus(args.out, seed=args.seed, n_task_examples=args.task_examples)
    stats = corpus_stats(args.out)
    print(json.dumps({"paths": {k: str(v) for k, v in paths.items()}, "stats": stats}, indent=1))


# ------------------------------------------------------------------ ppl / sample / export
def _device(name: Optional[str]):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_and_tokenizer(args):
    """The model in eval mode on --device, and its tokenizer (or --tokenizer, checked to match)."""
    from dlm.families import family_of
    from dlm.loading import load_tokenizer_for
    from dlm.loading import load_model
    from dlm.tokenizer import check_tokenizer_for_model

    from dlm.parallel import place

    from dlm.runtime import compile_model

    model = place(load_model(args.model), _device(args.device))  # --tensor-parallel: this rank's part
    if getattr(args, "compile", False):
        model = compile_model(model)
    # the tokenizer beside the model or --tokenizer (a published family's taken as it is)
    tok = load_tokenizer_for(args.model, model.config, tokenizer=args.tokenizer)
    check_tokenizer_for_model(tok, model.config, roles=family_of(model.config).format is None)
    return model, tok


def run_tensor_parallel(args) -> None:
    """Run the command on --tensor-parallel ranks (dlm.parallel.launch): each loads the model and
    keeps its shard, all decode in lockstep, rank 0 prints."""
    from dlm.parallel import launch

    if args.command == "generate" and not args.prompt:  # the ranks have no stdin: read it here
        args.prompt = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    launch(args.tensor_parallel, _rank_command, args)


def _rank_command(args) -> None:
    from dlm.parallel import init_rank

    device, _ = init_rank(args.tensor_parallel, args.device)
    args.device = str(device)
    args.func(args)


def cmd_ppl(args) -> None:
    import torch

    from dlm.data import build_lm_dataset
    from dlm.likelihood import perplexity

    model, tok = _model_and_tokenizer(args)
    seq_len = args.seq_len or _trained_seq_len(args.model) or 128
    if seq_len > model.config.max_position_embeddings:
        from dlm.errors import DLMError

        raise DLMError(f"--seq-len {seq_len} exceeds the model's maximum of "
                       f"{model.config.max_position_embeddings} positions; lower --seq-len")
    ds = build_lm_dataset(args.data, tok, seq_len, split=args.split, mode=args.pack, text_field=args.text_field)
    ds = ds.with_format("torch")
    torch.manual_seed(args.seed)
    res = perplexity(model, ds, batch_size=args.batch_size, mc_samples=args.mc_samples, seed=args.seed,
                     max_batches=args.max_batches, progress=sys.stderr.isatty())
    res.update(model=args.model, objective=model.config.objective, data=args.data, split=args.split, seq_len=seq_len)
    kind = "NELBO bound" if res["bound"] else "exact"
    err = ""
    if res["bound"] and res["nll_se"] is not None:
        err = f", 95% Monte Carlo interval {res['ppl_low']:.3f} to {res['ppl_high']:.3f}"
    elif res["bound"]:
        err = ", no error estimate with one draw: use --mc-samples 2 or more"
    print(f"{model.config.objective}: perplexity {res['ppl']:.3f} ({kind}, {res['tokens']} tokens, "
          f"{res['mc_samples']} MC sample(s){err})", file=sys.stderr)
    print(json.dumps(res))


def _trained_seq_len(model_dir: str) -> Optional[int]:
    # A model exported by `dlm train` sits in OUTPUT_DIR/model beside OUTPUT_DIR/train_config.json.
    path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "train_config.json")
    try:
        with open(path) as f:
            return int(json.load(f)["seq_len"])
    except (OSError, KeyError, ValueError):
        return None


def cmd_sample(args) -> None:
    from dlm.errors import DLMError
    from dlm.sample import sample, strip_after_eos

    if args.length < 1:
        raise DLMError(f"--length must be at least 1, got {args.length}")
    model, tok = _model_and_tokenizer(args)
    prompt = tok.encode(args.prompt, add_special_tokens=False) if args.prompt else []
    if 1 + len(prompt) + args.length > model.config.max_position_embeddings:
        raise DLMError(f"prompt ({len(prompt)} tokens) + --length {args.length} exceeds the model's "
                       f"{model.config.max_position_embeddings} positions; shorten one")
    out = sample(model, prompt, n=args.n, length=args.length, steps=args.steps,
                 temperature=args.temperature, seed=args.seed)
    for row in out.tokens.tolist():
        gen = strip_after_eos(row[1 + len(prompt):], model.config.eos_token_id)
        print(json.dumps({"prompt": args.prompt, "completion": tok.decode(gen)}))
    print(f"{args.n} sample(s), {out.nfe} network calls", file=sys.stderr)


def _text_or_file(value):
    """A flag value given inline or as @PATH."""
    from dlm.errors import DLMError

    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except OSError as e:
        raise DLMError(f"cannot read {value[1:]}: {e.strerror}") from None


def cmd_generate(args) -> None:
    from dlm.constraints import ConstraintCompiler, make_constraint
    from dlm.decoding import Decoder
    from dlm.decoding.config import from_flags
    from dlm.errors import DLMError
    from dlm.families import family_of

    model, tok = _model_and_tokenizer(args)
    fam = family_of(model.config)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise DLMError("no prompt: pass --prompt TEXT (repeatable) or prompts on stdin, one per line")
    ids = [fam.encode(tok, p) for p in prompts]
    cfg = from_flags(args, fam, model.config.block_size,
                     stop=[tok.encode(s, add_special_tokens=False) for s in args.stop or []])
    cfg = replace(cfg, cache=fam.resolve_cache(cfg.cache))
    constraint = make_constraint(regex=args.regex, json_schema=_text_or_file(args.json_schema),
                                 json_object=args.json_object, choice=args.choice, grammar=_text_or_file(args.grammar))
    compiled = None
    if constraint is not None:
        compiled = ConstraintCompiler(tok, model.config.vocab_size, model.config.eos_token_id).compile(constraint)
    dec = Decoder(model)
    on_step, live = None, None
    mask = model.config.mask_token_id
    if args.show and sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        live = Live(console=Console(stderr=True), refresh_per_second=20, transient=False)
        live.start()

        def on_step(rows, answers):
            text = Text()
            for r, a in zip(rows, answers):
                text.append(f"[{r}] {prompts[r]}", style="bold")
                for t in a:
                    text.append("_" if t == mask else tok.decode([t]), style="dim" if t == mask else "green")
                text.append("\n")
            live.update(text)
    elif args.show:  # no terminal to redraw: one plain line per prompt and step (MASK as _)
        step = [0]

        def on_step(rows, answers):
            step[0] += 1
            for r, a in zip(rows, answers):
                shown = "".join("_" if t == mask else tok.decode([t]) for t in a)
                print(f"step {step[0]} [{r}] {shown}", file=sys.stderr, flush=True)
    try:
        results = dec.generate(ids, cfg, on_step=on_step, constraints=[compiled] * len(ids) if compiled else None,
                               raise_errors=False)
    finally:
        if live is not None:
            live.stop()
    failed = []
    for p, r in zip(prompts, results):
        if r.error is not None:  # this prompt alone failed (e.g. no output of the length fits the constraint)
            failed.append(r.error)
            print(json.dumps({"prompt": p, "error": str(r.error), "finish_reason": "error"}))
            continue
        print(json.dumps({"prompt": p, "completion": tok.decode(r.tokens), "finish_reason": r.finish_reason,
                          **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.stats.items()}}))
    if failed:
        if not isinstance(failed[0], DLMError):
            raise failed[0]
        raise DLMError(f"{len(failed)} of {len(prompts)} prompt(s) failed: {failed[0]}")


def cmd_serve(args) -> None:
    from dlm.constraints import CompileLimits
    from dlm.decoding.config import from_flags
    from dlm.errors import DLMError
    from dlm.families import family_of

    try:
        import uvicorn

        from dlm.serving.app import ServerSettings, create_app
    except ImportError as e:
        raise DLMError(f"dlm serve needs the serve extra ({e.name} is missing): pip install 'dlm[serve]'") from None
    from dlm.loading import load_config
    from dlm.loading import load_model

    model = None
    if args.engine == "thread":  # loaded once, handed to the app
        model = load_model(args.model).to(_device(args.device)).eval()
        if args.compile:
            from dlm.runtime import compile_model

            model = compile_model(model)
    config = model.config if model is not None else load_config(args.model)  # the engine process loads the weights
    fam = family_of(config)
    # the request defaults (the flags given, else the family's); the temperature of requests
    # that send none is --temperature
    defaults = from_flags(args, fam, config.block_size, temperature=0.0)
    defaults = replace(defaults, cache=fam.resolve_cache(defaults.cache))
    limits = CompileLimits(timeout_s=args.constraint_compile_timeout, max_dfa_mb=args.constraint_max_dfa_mb,
                           cache_mb=args.constraint_cache_mb)
    settings = ServerSettings(model_dir=args.model, served_model_name=args.served_model_name, tokenizer=args.tokenizer,
                              device=args.device, api_key=args.api_key, max_batch=args.max_batch,
                              max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                              max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                              trust_remote_code=args.trust_remote_code, defaults=defaults,
                              default_temperature=args.temperature, default_max_tokens=args.max_tokens,
                              compile_limits=limits, engine=args.engine, tensor_parallel=args.tensor_parallel,
                              data_parallel=args.data_parallel, compile=args.compile)
    app = create_app(settings, model=model)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"dlm serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_eval(argv: list[str]) -> int:
    """`dlm eval [run|ls|validate] ARGS`: lm-eval's own command line with the dlm model registered
    (lm-eval has no plugin hook for models, so `lm_eval --model dlm` cannot find it), --model
    defaulting to dlm and --include_path to dlm's offline tasks. Every lm-eval flag passes through."""
    try:
        import lm_eval.__main__ as lm_main
    except ImportError:
        from dlm.errors import DLMError

        raise DLMError("lm-eval is not installed; pip install 'dlm[eval]'") from None
    import dlm.evals.lm_eval_model  # noqa: F401  (registers the "dlm" model)
    from dlm.evals import TASKS_DIR

    args = list(argv)
    command = "run"
    if args and args[0] in ("run", "ls", "list", "validate"):
        command, args = args[0], args[1:]
    if command == "run" and not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "dlm", *args]
    if "-h" not in args and "--help" not in args and \
            not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", TASKS_DIR]
    sys.argv = ["lm-eval", command, *args]
    result = lm_main.cli_evaluate()
    return result if isinstance(result, int) else 0


def cmd_export(args) -> None:
    from dlm.export import export_llama

    print(export_llama(args.model, args.out))


class _module_main:
    """A subcommand that is `main(args)` of a module, imported only when it runs (an object, so
    that it pickles into the ranks of --tensor-parallel)."""

    def __init__(self, module: str):
        self.module = module

    def __call__(self, args) -> None:
        import importlib

        importlib.import_module(self.module).main(args)


cmd_bench_train = _module_main("dlm.training.bench")
cmd_bench_decode = _module_main("dlm.evals.bench_decode")
cmd_bench_serve = _module_main("dlm.evals.bench_serve")
cmd_bench_constrained = _module_main("dlm.evals.bench_constrained")
cmd_bench_schemas = _module_main("dlm.evals.bench_schemas")
cmd_bench_load = _module_main("dlm.evals.bench_load")


def cmd_quickstart(args) -> None:
    from dlm.training.quickstart import quickstart

    quickstart(args)


# ------------------------------------------------------------------ parser
