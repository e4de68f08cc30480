"""The `dlm` command line: one entry point, one subcommand per job.

    dlm quickstart                 tokenizer + tiny MDLM and AR on the embedded corpus, ppl, samples
    dlm corpus write DIR           write the embedded default corpus (no network)
    dlm tokenizer train ...        train a byte-level BPE tokenizer
    dlm train ...                  pretrain a model (DeepSpeed; python, torchrun or deepspeed launcher)
    dlm ppl MODEL ...              NELBO perplexity bound (diffusion) / exact perplexity (AR)
    dlm sample MODEL ...           draw samples with the reference samplers
    dlm generate MODEL ...         decode with the fast decoder (policies, caches, constraints)
    dlm serve MODEL                OpenAI-compatible HTTP server
    dlm eval ...                   lm-eval with the dlm model and offline tasks
    dlm export MODEL OUT           AR baseline -> LlamaForCausalLM
    dlm bench train|decode|serve|constrained|schemas ...   benchmarks

    parser.py     the subcommands and their flags (torch-free: --help and bad flags are fast)
    commands.py   what each subcommand runs

Errors caused by input (missing files, bad flags, bad checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from dlm.cli.commands import cmd_eval
from dlm.cli.parser import EVAL_HELP, THREADED, build_parser, subparsers


def _quiet_libraries() -> None:
    # DeepSpeed's CPU-accelerator warning and HF's info logs drown the useful output.
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets draws a bar for every map / filter / save (seven per training run); dlm logs its own
    # summary line. HF_DATASETS_DISABLE_PROGRESS_BARS=0 brings them back.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    from dlm.errors import DLMError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # lm-eval's own arguments, passed through untouched
        if argv[1:2] in (["-h"], ["--help"]) or len(argv) == 1:
            print(EVAL_HELP)
            return 0
        try:
            return cmd_eval(argv[1:])
        except DLMError as e:
            print(f"dlm: error: {e}", file=sys.stderr)
            return e.exit_code
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage, not the top-level one
        target = parser
        for name, sub in subparsers(parser):
            if name.split() == [a for a in argv if not a.startswith("-")][: len(name.split())]:
                target = sub
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    if getattr(args, "threads", None) is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.command in THREADED:
        from dlm.runtime import set_threads

        set_threads(getattr(args, "threads", None))
    try:
        if (getattr(args, "tensor_parallel", None) or 1) > 1 and args.command != "serve":  # serve: its engine
            from dlm.cli.commands import run_tensor_parallel

            run_tensor_parallel(args)
        else:
            args.func(args)
    except DLMError as e:
        if not getattr(e, "quiet", False):  # quiet: another rank already printed the cause
            print(f"dlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dlm: interrupted", file=sys.stderr)
        return 130
    return 0
