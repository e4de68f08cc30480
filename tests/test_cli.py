"""The `dlm` command line: help, and every bad input the foundation issue names gets one line on
stderr naming the problem and the fix, exit code 2, and leaves good checkpoints alone."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from dlm.training import checkpoint
from dlm.training.config import TrainConfig
from dlm.training.trainer import train
from helpers import child_env

from dlm.cli import main

TINY = ["--size", "debug", "--seq-len", "32", "--micro-batch", "4", "--vocab-size", "300", "--max-steps", "2",
        "--eval-every", "2", "--eval-batches", "1", "--log-every", "1", "--no-tensorboard"]


@pytest.fixture(scope="module")
def run_dir(small_corpus, tmp_path_factory):
    """A finished 4-step MDLM run with a checkpoint and an exported model."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=small_corpus, output_dir=str(out), size="debug", seq_len=32, micro_batch=4,
                      max_steps=4, vocab_size=300, eval_every=4, eval_batches=1, save_every=4, tensorboard=False))
    return out


def fails_cleanly(capsys, argv, *needles):
    """Run `dlm argv` in-process; expect exit code 2 and a single 'dlm: error:' line naming `needles`."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("dlm: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def test_flags_come_from_the_configs_with_their_defaults():
    """Decoding flags are generated from DecodeConfig and training flags from TrainConfig: parsing
    no options gives each config's own defaults, every field has its flag, the --unmask choices
    are the policy registry, and a flag's value reaches the config."""
    import dataclasses

    from dlm.cli.parser import build_parser, subparsers
    from dlm.decoding.config import DecodeConfig, from_flags
    from dlm.decoding.policies import POLICIES

    parser = build_parser()
    args = parser.parse_args(["generate", "M", "--prompt", "x"])
    assert from_flags(args) == DecodeConfig()
    args = parser.parse_args(["generate", "M", "--prompt", "x", "--unmask", "threshold", "--threshold", "0.7",
                              "--early-commit-gaps", "1/2/3", "--cache", "dual"])
    got = from_flags(args)
    assert (got.unmask, got.threshold, got.early_commit_gaps, got.cache) == ("threshold", 0.7, (1.0, 2.0, 3.0), "dual")
    subs = dict(subparsers(parser))
    unmask = next(a for a in subs["generate"]._actions if a.dest == "unmask")
    assert set(unmask.choices) == set(POLICIES)
    cli = {f.name for f in DecodeConfig.options("cli")}
    assert cli <= {a.dest for a in subs["generate"]._actions}
    # the server sets per-request values itself; its flags are the defaults for the rest
    assert {a.dest for a in subs["serve"]._actions} >= cli - {"max_new_tokens", "seed", "stop_at_eos"}

    # training: one flag per TrainConfig field, its default the field's; unset flags stay unset (a
    # --config file fills them)
    actions = {a.dest: a for a in subs["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f"(default: {f.default})" in actions[f.name].help, f.name
    args = parser.parse_args(["train", "--max-steps", "7", "--objective", "bd3lm"])
    assert (args.max_steps, args.objective) == (7, "bd3lm") and not hasattr(args, "lr")


def test_every_option_with_a_value_says_its_default_in_the_help():
    import argparse

    from dlm.cli.parser import build_parser, subparsers

    checked = 0
    for name, sub in subparsers(build_parser()):
        fmt = sub._get_formatter()
        for a in sub._actions:
            if not a.option_strings or a.nargs == 0 or a.help == argparse.SUPPRESS or a.default is None:
                continue
            assert "default" in fmt._get_help_string(a), (name, a.dest, a.help)
            checked += 1
    assert checked > 100
    r = subprocess.run([sys.executable, "-m", "dlm.cli", "train", "--help"], capture_output=True, text=True,
                       env=child_env())
    assert r.returncode == 0 and r.stdout.startswith("usage: dlm train")


def test_exit_code_through_the_real_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dlm.cli", "train", "--data", str(tmp_path / "nope.jsonl"),
                        "--output-dir", str(tmp_path / "o"), *TINY], capture_output=True, text=True, env=child_env())
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("dlm: error:")
    assert "Traceback" not in r.stderr


def test_missing_dataset(capsys, tmp_path):
    fails_cleanly(capsys, ["train", "--data", tmp_path / "missing.jsonl", "--output-dir", tmp_path / "o", *TINY],
                  "missing.jsonl")


def test_empty_dataset(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails_cleanly(capsys, ["train", "--data", empty, "--output-dir", tmp_path / "o", *TINY], "empty")
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_non_utf8_file(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    fails_cleanly(capsys, ["train", "--data", bad, "--output-dir", tmp_path / "o", *TINY], "utf-8")


def test_unknown_config_key(capsys, tmp_path, small_corpus):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lr": 1e-3, "learning_rate": 1e-3}))
    line = fails_cleanly(capsys, ["train", "--config", cfg, "--data", small_corpus, "--output-dir", tmp_path / "o"],
                         "learning_rate")
    assert "lr" in line  # the fix: the valid keys are listed


def test_config_file_not_json(capsys, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{lr: 1")
    fails_cleanly(capsys, ["train", "--config", cfg, "--output-dir", tmp_path / "o"], "cfg.json")


def test_bad_choices_and_flags_are_refused_while_parsing(capsys):
    """A bad --objective / --size / --pack, or an unknown flag, is refused by the subcommand's own
    parser (its usage, exit 2) before torch or DeepSpeed start."""
    import subprocess
    import sys

    for argv, flag in ((["train", "--objective", "gpt"], "--objective"), (["train", "--size", "huge"], "--size"),
                       (["train", "--pack", "xyz"], "--pack"), (["quickstart", "--size", "huge"], "--size")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: argument {flag}: invalid choice" in err
        assert f"usage: dlm {argv[0]}" in err
    with pytest.raises(SystemExit):
        main(["ppl", "some/model", "--bogus", "1"])
    err = capsys.readouterr().err
    assert "usage: dlm ppl" in err and "unrecognized arguments: --bogus 1" in err
    code = ("import sys\nfrom dlm.cli import main\ntry:\n    main(['train', '--objective', 'gpt'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr


def test_seq_len_above_model_maximum(capsys, tmp_path, run_dir, small_corpus):
    model = run_dir / "model"
    fails_cleanly(capsys, ["ppl", model, "--data", small_corpus, "--seq-len", 4096], "4096", "--seq-len")
    fails_cleanly(capsys, ["train", "--init-from", model, "--data", small_corpus, "--output-dir", tmp_path / "o",
                           "--tokenizer", model, *TINY[:2], "--seq-len", "4096"], "4096", "--seq-len")
    fails_cleanly(capsys, ["sample", model, "--length", 5000], "5000")


def test_tokenizer_without_the_models_special_tokens(capsys, tmp_path, run_dir, small_corpus):
    """A plain BPE tokenizer (no BOS/EOS/PAD/MASK) gets them appended by dlm, at ids the model does
    not use: scoring with it must be refused, not silently wrong."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["the cat sat on the mat"] * 20,
                           trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    plain = tmp_path / "plain-tok"
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(plain)
    fails_cleanly(capsys, ["ppl", run_dir / "model", "--data", small_corpus, "--tokenizer", plain], "tokenizer")
    fails_cleanly(capsys, ["sample", run_dir / "model", "--tokenizer", plain], "tokenizer")


def test_tokenizer_path_that_is_not_a_tokenizer(capsys, tmp_path, small_corpus):
    (tmp_path / "junk").mkdir()
    fails_cleanly(capsys, ["train", "--data", small_corpus, "--tokenizer", tmp_path / "junk",
                           "--output-dir", tmp_path / "o", *TINY], "tokenizer")


def test_checkpoint_from_another_model_type(capsys, tmp_path, small_corpus, run_dir):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    fails_cleanly(capsys, ["ppl", bert, "--data", small_corpus], "bert")
    fails_cleanly(capsys, ["train", "--init-from", bert, "--data", small_corpus, "--output-dir", tmp_path / "o",
                           *TINY], "bert")
    # A dlm model whose objective has other parameters (E2D2's decoder) is refused too, and so is
    # a time-conditioning mismatch.
    fails_cleanly(capsys, ["train", "--init-from", run_dir / "model", "--tokenizer", run_dir / "model",
                           "--objective", "e2d2", "--block-size", "4", "--decoder-layers", "1", "--data", small_corpus,
                           "--output-dir", tmp_path / "o2", *TINY], "objective")
    fails_cleanly(capsys, ["train", "--init-from", run_dir / "model", "--tokenizer", run_dir / "model",
                           "--objective", "mdlm", "--time-conditioning", "--data", small_corpus,
                           "--output-dir", tmp_path / "o3", *TINY], "time conditioning")


def test_init_from_another_objective_with_the_same_backbone(tmp_path, small_corpus, run_dir):
    """An MDLM run continues as a BD3-LM (the BD3-LM paper's recipe; AR -> MDLM alike): the
    weights carry over and the saved model is a BD3-LM with its block size."""
    from dlm.loading import load_model

    out = tmp_path / "bd3"
    train(TrainConfig(data=small_corpus, output_dir=str(out), init_from=str(run_dir / "model"),
                      tokenizer=str(run_dir / "model"), objective="bd3lm", block_size=4, size="debug", seq_len=32,
                      micro_batch=4, max_steps=1, lr=1e-12, warmup_steps=0, vocab_size=300, eval_every=1,
                      eval_batches=1, tensorboard=False))
    src, dst = load_model(str(run_dir / "model")), load_model(str(out / "model"))
    assert dst.config.objective == "bd3lm" and dst.config.block_size == 4
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_missing_and_corrupt_model_dirs(capsys, tmp_path, small_corpus, run_dir):
    fails_cleanly(capsys, ["ppl", tmp_path / "nowhere", "--data", small_corpus], "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        src = run_dir / "model" / name
        (broken / name).write_bytes(src.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    fails_cleanly(capsys, ["ppl", broken, "--data", small_corpus], "broken")


def test_corrupt_checkpoint_on_resume(capsys, tmp_path, small_corpus):
    out = tmp_path / "run"
    args = ["train", "--data", small_corpus, "--output-dir", out, *TINY, "--save-every", "2"]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    tag = checkpoint.latest_tag(str(out / "checkpoints"))
    states = [os.path.join(dp, f) for dp, _, fs in os.walk(out / "checkpoints" / tag) for f in fs if f.endswith(".pt")]
    assert states
    for f in states:
        with open(f, "r+b") as fh:
            fh.truncate(64)
    before = sorted(os.listdir(out / "checkpoints"))
    fails_cleanly(capsys, [*args, "--max-steps", "4", "--resume"], "corrupt", "--resume")
    assert sorted(os.listdir(out / "checkpoints")) == before
    assert checkpoint.latest_tag(str(out / "checkpoints")) == tag


def test_resume_refuses_changed_run_settings(capsys, tmp_path, small_corpus):
    out = tmp_path / "run"
    args = ["train", "--data", small_corpus, "--output-dir", out, *TINY, "--save-every", "2"]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    fails_cleanly(capsys, [*args, "--objective", "ar", "--max-steps", "4", "--resume"], "objective", "--resume")
    fails_cleanly(capsys, [*args, "--max-steps", "4"], "--resume")  # would overwrite the run


def test_sample_and_ppl_work_on_a_trained_model(capsys, run_dir, small_corpus):
    assert main(["ppl", str(run_dir / "model"), "--data", small_corpus, "--max-batches", "1", "--mc-samples", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bound"] and res["ppl"] > 1 and res["tokens"] > 0
    assert main(["sample", str(run_dir / "model"), "-n", "2", "--length", "8", "--prompt", "the cat"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "the cat" for r in rows)


def test_generate_decodes_and_rejects_bad_settings(capsys, run_dir):
    model = str(run_dir / "model")
    assert main(["generate", model, "--prompt", "the cat", "--prompt", "a dog", "--max-new-tokens", "8",
                 "--block-length", "4", "--unmask", "threshold", "--threshold", "0.5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "a dog"]
    assert all(r["nfe"] >= 1 and r["finish_reason"] in ("stop", "length") for r in rows)
    fails_cleanly(capsys, ["generate", model, "--prompt", "x", "--max-new-tokens", "10", "--block-length", "4"],
                  "does not divide")
    fails_cleanly(capsys, ["generate", model, "--prompt", "x", "--unmask", "threshold", "--threshold", "1.5"],
                  "threshold")
    fails_cleanly(capsys, ["generate", model, "--prompt", "x", "--max-new-tokens", "5000"], "context")


def test_generate_with_constraints(capsys, run_dir, tmp_path):
    model = str(run_dir / "model")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    cases = [(["--regex", "[0-9]{2}-[a-z]{2}"], lambda t: re.fullmatch("[0-9]{2}-[a-z]{2}", t)),
             (["--choice", "yes", "--choice", "no"], lambda t: t in ("yes", "no")),
             (["--json-schema", f"@{tmp_path / 's.json'}"], lambda t: isinstance(json.loads(t)["n"], int)),
             (["--json-object"], lambda t: isinstance(json.loads(t), dict)),
             (["--grammar", 'start: "(" NUM ")"\nNUM: /[0-9]+/\n'], lambda t: re.fullmatch(r"\([0-9]+\)", t))]
    for flags, check in cases:
        assert main(["generate", model, "--prompt", "the cat", "--max-new-tokens", "16", *flags]) == 0
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert check(row["completion"]), (flags, row)
        assert row["constraint_s"] > 0
    fails_cleanly(capsys, ["generate", model, "--prompt", "x", "--regex", "[a-"], "invalid regex")
    fails_cleanly(capsys, ["generate", model, "--prompt", "x", "--regex", "a", "--choice", "b"], "at most one")
    fails_cleanly(capsys, ["generate", model, "--prompt", "x", "--grammar", "start: ((("], "does not compile")
    fails_cleanly(capsys, ["generate", model, "--prompt", "x", "--max-new-tokens", "2", "--regex", "[a-z]{30}"],
                  "cannot be satisfied")


def test_generate_show_draws_the_canvas(capsys, run_dir, monkeypatch):
    """--show on a terminal: the canvas (prompt, decided tokens) is drawn on stderr; stdout keeps
    the JSON lines."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["generate", str(run_dir / "model"), "--prompt", "the cat", "--max-new-tokens", "8",
                 "--block-length", "4", "--show"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[0])["prompt"] == "the cat"
    assert "[0] the cat" in err
