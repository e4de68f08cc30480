"""Training end to end: loss falls, exact resume, Ctrl-C, atomic checkpoints, DeepSpeed 1 vs 2
processes (ZeRO 0 and 3), export, and the quickstart. (Bad input: tests/test_cli.py.)"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from dlm.training import checkpoint
from dlm.training.config import TrainConfig
from dlm.training.trainer import train
from helpers import child_env, dlm_cli


def cfg_for(corpus, out, **kw) -> TrainConfig:
    base = dict(data=corpus, output_dir=str(out), size="debug", seq_len=32, micro_batch=8, max_steps=12,
                lr=3e-3, warmup_steps=2, vocab_size=300, log_every=1, eval_every=6, eval_batches=2,
                save_every=6, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def losses(out) -> dict:
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def vals(out) -> list:
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["val_nll"] for r in recs if "val_nll" in r]


def cli_args(corpus, out, **kw) -> list:
    args = []
    for k, v in cfg_for(corpus, out, **kw).to_dict().items():
        if v is None or v == TrainConfig().to_dict()[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return ["train", *args]


# ---------------------------------------------------------------- single process, in-process
@pytest.mark.parametrize("objective", ["mdlm", "radd", "ar"])
def test_loss_falls_and_model_exports(small_corpus, tmp_path, objective):
    out = tmp_path / objective
    model_dir = train(cfg_for(small_corpus, out, objective=objective, max_steps=60, eval_every=20))
    l = losses(out)
    first = sum(l[s] for s in range(1, 6)) / 5
    last = sum(l[s] for s in range(56, 61)) / 5
    assert last < 0.7 * first, (first, last)
    v = vals(out)
    assert v[-1] < v[0]
    from dlm.loading import load_model

    m = load_model(model_dir)
    assert m.config.objective == objective
    assert os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
    assert checkpoint.latest_tag(str(out / "checkpoints")) == "step-0000060"


def test_sft_training_never_noises_or_scores_the_prompt(tmp_path, monkeypatch):
    """--pack sft: the trainer hands the objective the prompt marks (attention_mask 2), in training
    and in validation; a mask of only 1s and 2s is not "all ones" (that dropped it before)."""
    import torch

    from dlm.objectives import MDLM

    corpus = tmp_path / "c"
    corpus.mkdir()
    for split, n in (("train", 64), ("validation", 16)):
        with open(corpus / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"say {i % 7} twice -> {i % 7} {i % 7}", "prompt": f"say {i % 7} twice ->"}) + "\n")
    seen = []
    real = MDLM.corrupt

    def spy(self, input_ids, attention_mask, noise):
        xt, masked, scored, t = real(self, input_ids, attention_mask, noise)
        seen.append((attention_mask, masked, scored))
        return xt, masked, scored, t

    monkeypatch.setattr(MDLM, "corrupt", spy)
    train(cfg_for(str(corpus), tmp_path / "run", pack="sft", max_steps=2, eval_every=2, save_every=2))
    assert seen
    for am, masked, scored in seen:
        assert am is not None and bool((am == 2).any())
        given = am == 2
        assert not bool(masked[given].any()) and not bool(scored[given].any())
        assert bool(scored[am == 1].any()) and torch.equal(scored[:, 1:], (am == 1)[:, 1:])


def test_exact_resume_after_stop(small_corpus, tmp_path):
    full = tmp_path / "full"
    train(cfg_for(small_corpus, full, max_steps=12))
    part = tmp_path / "part"
    assert train(cfg_for(small_corpus, part, max_steps=12, stop_after_steps=5)) is None
    assert checkpoint.latest_tag(str(part / "checkpoints")) == "step-0000005"
    train(cfg_for(small_corpus, part, max_steps=12, resume=True))
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])


def test_refuses_to_overwrite_a_run_without_resume(small_corpus, tmp_path):
    from dlm.errors import DLMError

    train(cfg_for(small_corpus, tmp_path / "r", max_steps=3, save_every=3))
    with pytest.raises(DLMError, match="--resume"):
        train(cfg_for(small_corpus, tmp_path / "r", max_steps=3))


def test_failed_save_keeps_previous_checkpoint(small_corpus, tmp_path, monkeypatch):
    out = tmp_path / "r"
    train(cfg_for(small_corpus, out, max_steps=4, save_every=4))
    ckpt = str(out / "checkpoints")
    before = sorted(os.listdir(os.path.join(ckpt, "step-0000004")))

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom("disk full")

    import deepspeed.runtime.engine as eng

    monkeypatch.setattr(eng.DeepSpeedEngine, "save_checkpoint", explode)
    with pytest.raises(Boom):
        train(cfg_for(small_corpus, out, max_steps=8, save_every=2, resume=True))
    assert checkpoint.latest_tag(ckpt) == "step-0000004"
    assert sorted(os.listdir(os.path.join(ckpt, "step-0000004"))) == before


def test_a_run_reports_grad_norm_and_exports_readable_files(small_corpus, tmp_path):
    import torch

    out = tmp_path / "gn"
    before = torch.get_num_threads()
    model_dir = train(cfg_for(small_corpus, out, max_steps=4, zero_stage=0, threads=3))
    assert torch.get_num_threads() == 3  # --threads
    torch.set_num_threads(before)
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if "loss" in line]
    assert recs and all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in recs)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(model_dir):
        assert os.stat(os.path.join(model_dir, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_failed_run_takes_back_what_it_wrote(tmp_path):
    """Bad data found after the output directory was set up: no train_config.json, tokenizer or
    empty directory is left behind; a directory that existed keeps what it had."""
    from dlm.errors import DLMError

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DLMError):
        train(cfg_for(str(empty), tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(DLMError):
        train(cfg_for(str(empty), old))
    assert sorted(os.listdir(old)) == ["notes.txt"]


def test_single_process_cpu_run_builds_no_cpp_extension(small_corpus, tmp_path):
    """DeepSpeed's shared-memory all-reduce is a C++ JIT build; one process has nothing to reduce,
    so none is built (nor a 'built successfully' line printed)."""
    ext = tmp_path / "extensions"
    env = {**child_env(), "TORCH_EXTENSIONS_DIR": str(ext)}
    r = subprocess.run([sys.executable, "-m", "dlm.cli", *cli_args(small_corpus, tmp_path / "o", max_steps=2)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not ext.exists() or not any(ext.iterdir())
    assert "built successfully" not in r.stdout + r.stderr
    assert r.stdout.strip().endswith("model")  # stdout: just the exported model's path


# ---------------------------------------------------------------- subprocesses: launchers, signals
def test_two_processes_match_one_process(small_corpus, tmp_path):
    """Same global batch (8): 1 process x 4 x accum 2, 2 processes x 4 (ZeRO 0), 2 x 4 (ZeRO 3)."""
    one = tmp_path / "one"
    r = dlm_cli(*cli_args(small_corpus, one, max_steps=6, micro_batch=4, grad_accum=2, eval_every=3))
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {"one": losses(one)}
    for stage in (0, 3):
        out = tmp_path / f"two-z{stage}"
        r = dlm_cli(*cli_args(small_corpus, out, max_steps=6, micro_batch=4, zero_stage=stage, eval_every=3,
                              tokenizer=str(one / "tokenizer")), launcher="torchrun2")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[stage] = losses(out)
        assert os.path.isfile(out / "model" / "model.safetensors")
    for stage in (0, 3):
        for s in range(1, 7):
            assert abs(runs["one"][s] - runs[stage][s]) < 2e-4 * max(1, abs(runs["one"][s])), (stage, s)
    # Validation NELBO is computed on the same rows with the same noise in every layout.
    assert abs(vals(one)[-1] - vals(tmp_path / "two-z3")[-1]) < 1e-3


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_saves_then_resume_finishes(small_corpus, tmp_path, sig, code):
    """Ctrl-C or SIGTERM: a checkpoint, then the shell's code for that signal (130 / 143)."""
    out = tmp_path / "sig"
    # far more steps than run before the signal lands, however fast the machine
    args = cli_args(small_corpus, out, max_steps=100_000, save_every=200_000, eval_every=200_000)
    proc = subprocess.Popen([sys.executable, "-m", "dlm.cli", *args], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    if sig == signal.SIGTERM:
        return
    tag = checkpoint.latest_tag(str(out / "checkpoints"))
    assert tag is not None and "resume" in err
    stopped = int(tag.split("-")[1])
    assert 3 <= stopped < 100_000
    r = dlm_cli(*cli_args(small_corpus, out, max_steps=stopped + 3, save_every=1000, eval_every=1000, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert max(losses(out)) == stopped + 3


def test_loss_falls_on_the_embedded_corpus(tmp_path):
    """The embedded default corpus (stdlib English + checkable tasks), a debug model, 200 steps."""
    out = tmp_path / "default"
    train(cfg_for("default", out, seq_len=64, micro_batch=16, vocab_size=512, max_steps=200, lr=2e-3,
                  warmup_steps=20, eval_every=100, eval_batches=4, save_every=200))
    l = losses(out)
    first = sum(l[s] for s in range(1, 11)) / 10
    last = sum(l[s] for s in range(191, 201)) / 10
    assert last < 0.85 * first, (first, last)
    v = vals(out)  # fixed validation noise: a steady signal, unlike the training loss
    assert len(v) == 2 and v[1] < v[0]
    assert v[1] < 0.8 * math.log(512), v  # well below the uniform predictor's ~ln(V) per token


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = dlm_cli("quickstart", "--output-dir", str(out), "--size", "debug", "--max-steps", "20", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume" not in r.stderr  # nobody passed --resume: no message about it
    res = json.load(open(out / "quickstart.json"))
    assert set(res) == {"mdlm", "ar"}
    assert res["mdlm"]["bound"] is True and res["ar"]["bound"] is False
    assert res["mdlm"]["tokens"] == res["ar"]["tokens"] > 0  # same tokens scored: comparable numbers
    assert all(len(r["samples"]) == 3 for r in res.values())
    assert "perplexity" in r.stderr


def test_two_processes_hold_out_validation_and_fail_together(small_corpus, tmp_path):
    """A corpus without a validation split (the hold-out path, under the deepspeed launcher) and a
    missing corpus (under torchrun), on 2 ranks: the first trains, the second ends both ranks with
    one error line instead of a hang."""
    single = tmp_path / "train.jsonl"
    single.write_text(open(os.path.join(small_corpus, "train.jsonl")).read())
    out = tmp_path / "two"
    r = dlm_cli(*cli_args(str(single), out, max_steps=3, micro_batch=4, eval_every=3, ema=0.9, pack="pad"),
                launcher="deepspeed2", timeout=240)  # the deepspeed launcher (--local_rank passed to dlm)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "holding out" in r.stderr and len(vals(out)) == 1
    assert r.stdout.splitlines().count(str(out / "model")) == 1  # printed once, by rank 0
    r = dlm_cli(*cli_args(str(tmp_path / "missing.jsonl"), tmp_path / "bad"), launcher="torchrun2", timeout=240)
    assert r.returncode != 0
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("dlm: error:")]) == 1, r.stderr[-3000:]
