"""evals/: the perplexity-table script end to end at toy size."""

import json

import pytest


def test_ppl_table_smoke(tmp_path, small_corpus):
    from dlm.evals.ppl_table import main

    out = tmp_path / "results"
    argv = ["--data", small_corpus, "--size", "debug", "--seq-len", "32", "--micro-batch", "4", "--steps", "4",
            "--vocab-size", "300", "--mc-samples", "2", "--models", "AR,BD3-LM B'=4,E2D2 B'=4",
            "--runs", str(tmp_path / "runs"), "--out", str(out)]
    report = main(argv)
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"AR", "BD3-LM B'=4", "E2D2 B'=4"}
    assert rows["AR"]["bound"] is False and rows["E2D2 B'=4"]["bound"] is True
    assert len({r["val_tokens"] for r in rows.values()}) == 1  # the same validation tokens for all
    assert len({r["train_tokens"] for r in rows.values()}) == 1
    assert json.load(open(out / "ppl_table.json"))["rows"]
    assert "| AR |" in (out / "ppl_table.md").read_text()
    assert "95% MC interval" in (out / "ppl_table.md").read_text()
    assert (out / "ppl_table.png").stat().st_size > 1000
    # a second run reuses the trained models
    again = main(argv)
    assert [r["ppl"] for r in again["rows"]] == pytest.approx([r["ppl"] for r in report["rows"]])


def test_ppl_table_says_which_models_it_cannot_tell_apart():
    from dlm.evals.ppl_table import too_close

    rows = [{"model": "A", "nll": 3.00, "nll_se": 0.02}, {"model": "B", "nll": 3.03, "nll_se": 0.02},
            {"model": "C", "nll": 3.50, "nll_se": 0.02}, {"model": "AR", "nll": 2.9, "nll_se": 0.0}]
    assert too_close(rows) == [("A", "B")]  # 0.03 < 1.96 * 0.028; C and AR are far apart


def test_ppl_table_rejects_unknown_models():
    from dlm.evals.ppl_table import main

    from dlm.errors import DLMError

    with pytest.raises(DLMError, match="GPT"):
        main(["--models", "GPT"])


def test_bench_decode_smoke(tmp_path, small_corpus):
    import argparse

    from dlm.evals.bench_decode import main
    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    dirs = {}
    tok = None
    for obj in ("mdlm", "ar"):
        dirs[obj] = train(TrainConfig(data=small_corpus, output_dir=str(tmp_path / obj), objective=obj, size="debug",
                                      seq_len=32, micro_batch=4, max_steps=2, vocab_size=300, eval_every=2,
                                      eval_batches=1, save_every=2, tensorboard=False, tokenizer=tok))
        tok = dirs[obj]
    out = tmp_path / "bench.json"
    args = argparse.Namespace(model=dirs["mdlm"], ar_model=dirs["ar"], lengths="8", configs="vanilla,threshold+dual",
                              block_length=4, n_prompts=3, batch_size=2, repeats=1, seed=0, out=str(out),
                              split="validation", early_commit_gaps="2/1/0.5")
    report = main(args)
    names = {r["config"] for r in report["results"]}
    assert names == {"vanilla", "threshold+dual", "early-commit(2/1/0.5)", "AR (HF generate)"}
    assert report["split"] == "validation"
    ec = next(r for r in report["results"] if r["config"] == "early-commit(2/1/0.5)")
    assert ec["settings"]["early_commit_gaps"] == (2.0, 1.0, 0.5)
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1 and r["nfe"] >= 1
    assert json.load(open(out))["results"] and (tmp_path / "bench.png").exists()
    # a subset without the vanilla row: no ratio to it, the rest reported
    args.configs, args.ar_model, args.early_commit_gaps = "threshold+dual", None, None
    report = main(args)
    assert [r["config"] for r in report["results"]] == ["threshold+dual"]
    assert report["results"][0]["speedup_vs_vanilla"] is None


@pytest.mark.parametrize("spec", ["3/2", "a/b/c", "1/-1/0"])
def test_bench_decode_rejects_bad_gaps(spec):
    from dlm.evals.bench_decode import _gap_configs

    from dlm.errors import DLMError

    with pytest.raises(DLMError, match="triples"):
        _gap_configs(spec, is_block=True)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """A random tiny MDLM with a trained tokenizer, saved like `dlm train` does."""
    import random

    import torch
    from transformers import AutoTokenizer

    from dlm.model import DLMConfig, DLMModel
    from dlm.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("bench_model")
    rng = random.Random(0)
    words = 'add 12 and 30 : {"name": "bob", "age": 42} [1, 2] yes no'.split()
    train_tokenizer([" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)], d, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(d))
    torch.manual_seed(0)
    DLMModel(DLMConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       max_position_embeddings=256)).save_pretrained(str(d))
    return d


def test_bench_constrained_smoke(tmp_path, served_model):
    from dlm.cli import main

    schemas = tmp_path / "s.json"
    schemas.write_text(json.dumps([{"name": "pt", "schema": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"]}},
        {"name": "big", "schema": {"type": "integer", "minimum": 5}}]))
    out = tmp_path / "c.json"
    assert main(["bench", "constrained", str(served_model), "--schemas", str(schemas), "--seeds", "2",
                 "--max-new-tokens", "32", "--out", str(out)]) == 0
    rep = json.load(open(out))
    assert rep["summary"]["constrained"]["valid_rate"] == 1.0 and rep["summary"]["schemas"] == 2
    assert rep["summary"]["time_per_token_ratio"] > 0


def test_bench_serve_random_init_serves_a_real_width_shape(tmp_path):
    """bench serve --random-init: a published shape (one layer of MDLM-OWT's width, its 50,258-token
    vocabulary) written in its format with a stand-in tokenizer and served end to end at fixed
    tokens per step."""
    from dlm.cli import main
    from dlm.evals.bench_load import write_random_checkpoint, write_stand_in_tokenizer
    from dlm.loading import load_config, load_tokenizer_for

    out = tmp_path / "s.json"
    assert main(["bench", "serve", "--random-init", "mdlm-owt", "--layers", "1", "--concurrency", "1,2",
                 "--requests", "4", "--max-tokens", "8", "--ignore-eos", "--tokens-per-step", "2",
                 "--out", str(out)]) == 0
    rep = json.load(open(out))
    assert all(r["failed"] == 0 and r["tokens"] == 4 * 8 for r in rep["rows"])
    assert "random weights" in rep["random_init"] and "--steps 4" in rep["serve_args"]
    # the stand-in tokenizer: one token per embedding row, the config's special ids
    d = str(tmp_path / "ck")
    write_random_checkpoint("mdlm-owt", d, layers=1, dtype="float32")
    write_stand_in_tokenizer(d, load_config(d))
    cfg, tok = load_config(d), load_tokenizer_for(d)
    assert len(tok) == cfg.vocab_size == 50258
    assert tok.convert_ids_to_tokens(cfg.mask_token_id) == "<|mask|>" and tok.eos_token_id == cfg.eos_token_id
    assert tok.decode(tok.encode("w5 w77", add_special_tokens=False)) == "w5 w77"


def test_bench_serve_smoke(tmp_path, served_model):
    from dlm.cli import main

    out = tmp_path / "s.json"
    assert main(["bench", "serve", str(served_model), "--concurrency", "1,2", "--requests", "4", "--max-tokens", "8",
                 "--serve-args", "--unmask threshold --threshold 0.5", "--out", str(out)]) == 0
    rows = json.load(open(out))["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["failed"] == 0 and r["requests"] == 4 and r["tokens_per_s"] > 0 for r in rows)
    # the decoding work from the server's counters: at most a block's worth of tokens per forward
    # (the served model's block size), a mean batch between 1 and the clients
    assert all(0 < r["tokens_per_forward"] <= 32 and 1 <= r["mean_batch"] <= r["concurrency"] for r in rows), rows
