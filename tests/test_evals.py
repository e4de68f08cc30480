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
    assert (out / "ppl_table.png").stat().st_size > 1000
    # a second run reuses the trained models
    again = main(argv)
    assert [r["ppl"] for r in again["rows"]] == pytest.approx([r["ppl"] for r in report["rows"]])


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
                              block_length=4, n_prompts=3, batch_size=2, repeats=1, seed=0, out=str(out))
    report = main(args)
    names = {r["config"] for r in report["results"]}
    assert names == {"vanilla", "threshold+dual", "AR (HF generate)"}
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1 and r["nfe"] >= 1
    assert json.load(open(out))["results"] and (tmp_path / "bench.png").exists()
