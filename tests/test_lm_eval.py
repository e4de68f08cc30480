"""lm-eval integration: the Monte Carlo ELBO against exact enumeration, AR exactness, and lm-eval
run from its own command line (through `dlm eval`) on a tiny model and the offline tasks."""

import json
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("lm_eval")

from dlm.evals.lm_eval_model import DLMEvalModel  # noqa: E402
from helpers import child_env  # noqa: E402

from dlm.model import DLMConfig, DLMModel  # noqa: E402

V, BOS, EOS, PAD, MASK = 40, 0, 1, 2, 39


def wrapped(objective, block=None, seed=0, **kw):
    """A DLMEvalModel around a random tiny model (skipping the loading from disk)."""
    from dlm.families import family_of
    from dlm.objectives import make_objective

    torch.manual_seed(seed)
    extra = {"num_hidden_layers": 1, "num_decoder_layers": 1} if objective == "e2d2" else {}
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK, bos_token_id=BOS, eos_token_id=EOS,
                                pad_token_id=PAD, objective=objective, block_size=block, attention_backend="sdpa",
                                **extra)
    m = DLMEvalModel.__new__(DLMEvalModel)
    m.model, m.cfg, m.device_ = DLMModel(cfg).eval(), cfg, torch.device("cpu")
    m.batch_size_, m.mc_samples, m.max_length, m.seed, m.decoder_args = 256, 32, 64, 0, {}
    m.ll_method, m.family = "elbo", family_of(cfg)
    m.is_ar = m.family.autoregressive
    m.objective = None if m.is_ar else make_objective(cfg)
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def exact_elbo(m: DLMEvalModel, ctx: list[int], cont: list[int]) -> float:
    """Test oracle: the ELBO by enumeration over every k and every set of k masked continuation
    positions (the whole continuation as one group), with the n / k weight of k-DCE."""
    from itertools import combinations

    from dlm.likelihood import denoiser_logits, layout

    x0, am, cpos = layout(m.model, ctx, cont)
    n, mask_id = len(cont), m.cfg.mask_token_id
    total = 0.0
    with torch.no_grad():
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            acc = 0.0
            for S in subsets:
                xt = x0.clone()
                xt[0, cpos[list(S)]] = mask_id
                masked = xt == mask_id
                logits = denoiser_logits(m.model, m.objective, x0, xt, am, masked).double()
                logits[:, mask_id] = float("-inf")
                acc += logits.log_softmax(-1).gather(-1, x0[masked][:, None]).sum().item() * n / k
            total += acc / len(subsets) / n
    return total


@pytest.mark.parametrize("objective,block", [("mdlm", None), ("radd", None), ("bd3lm", 4), ("e2d2", 4)])
def test_mc_elbo_is_unbiased(objective, block):
    m = wrapped(objective, block)
    ctx, cont = [BOS, 5, 6, 7], [8, 9, 10]  # for block models the continuation is one block
    with torch.no_grad():
        exact = exact_elbo(m, ctx, cont)
        ests = [m.elbo(ctx, cont, samples=256, seed=s) for s in range(12)]
    mean = sum(ests) / len(ests)
    sd = (sum((e - mean) ** 2 for e in ests) / (len(ests) - 1)) ** 0.5 / len(ests) ** 0.5
    assert abs(mean - exact) < 4 * sd + 1e-3, (mean, exact, sd)
    # it is a bound: never above the log-likelihood of any single ordering... and below 0
    assert exact < 0


def test_block_elbo_treats_blocks_separately():
    """Two continuation blocks: the estimate equals the sum of each block's exact ELBO given the
    clean blocks before it (the block model's factorisation)."""
    m = wrapped("bd3lm", 4)
    ctx, cont = [BOS, 5, 6, 7], [8, 9, 10, 11, 12, 13]  # blocks 1 (4 tokens) and 2 (2 tokens)
    with torch.no_grad():
        b1 = exact_elbo(m, ctx, cont[:4])
        b2 = exact_elbo(m, ctx + cont[:4], cont[4:])
        ests = [m.elbo(ctx, cont, samples=256, seed=s) for s in range(12)]
    mean = sum(ests) / len(ests)
    sd = (sum((e - mean) ** 2 for e in ests) / (len(ests) - 1)) ** 0.5 / len(ests) ** 0.5
    assert abs(mean - (b1 + b2)) < 4 * sd + 1e-3


def test_ar_loglikelihood_is_the_exact_sum_of_log_probs():
    m = wrapped("ar")
    ctx, cont = [BOS, 5, 6, 7], [8, 9, 10]
    with torch.no_grad():
        ((ll, greedy),) = m.score_pairs([(ctx, cont)])
        logp = m.model(torch.tensor([ctx + cont]), is_causal=True).logits[0].log_softmax(-1)
    ref = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(ref, abs=1e-5)
    assert greedy == all(logp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))


@pytest.fixture(scope="module")
def tiny_model(small_corpus, tmp_path_factory):
    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    out = tmp_path_factory.mktemp("lmeval")
    return train(TrainConfig(data=small_corpus, output_dir=str(out), size="debug", seq_len=64, micro_batch=4,
                             max_steps=2, vocab_size=300, eval_every=2, eval_batches=1, save_every=2,
                             tensorboard=False))


def test_lm_eval_cli_on_the_offline_tasks(tiny_model, tmp_path):
    """lm-eval's own command line (via `dlm eval`), all three request types, under a minute."""
    out = tmp_path / "out"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "dlm.cli", "eval", "--model_args",
                        f"pretrained={tiny_model},mc_samples=2,unmask=threshold,threshold=0.5",
                        "--tasks", "dlm_add,dlm_add_mc,dlm_text_ppl", "--limit", "3", "--output_path", str(out),
                        "--log_samples"], capture_output=True, text=True, env=child_env(), timeout=300)
    took = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert took < 60, took
    results = [json.load(open(p)) for p in out.rglob("results_*.json")]
    assert results, list(out.rglob("*"))
    res = results[0]["results"]
    assert 0.0 <= res["dlm_add"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["dlm_add_mc"]["acc,none"] <= 1.0
    assert res["dlm_text_ppl"]["bits_per_byte,none"] > 0
    assert list(out.rglob("samples_dlm_add_*.jsonl"))  # --log_samples


def test_offline_task_data_is_deterministic_and_scored_by_the_task_scorer():
    from dlm.evals.tasks import dataset as ds

    a, b = ds.checkable("add", n=5), ds.checkable("add", n=5)
    assert a["test"]["prompt"] == b["test"]["prompt"]
    doc = a["test"][0]
    assert ds.process_generation(doc, [doc["answer"]]) == {"exact_match": 1.0}
    assert ds.process_generation(doc, [" 1234567"]) == {"exact_match": 0.0}
    mc = ds.multiple_choice("sort", n=5)["test"][0]
    assert len(mc["choices"]) == 4 and 0 <= mc["label"] < 4
    assert len(ds.heldout_text(n=3)["test"]) == 3


def test_bad_model_args():
    from dlm.errors import DLMError

    with pytest.raises(DLMError, match="pretrained"):
        DLMEvalModel()


def test_long_inputs_are_cut_to_the_window():
    m = wrapped("mdlm", max_length=16)
    with torch.no_grad():
        (ll, _), = m.score_pairs([([BOS, *range(3, 30)], [5, 6, 7])])  # context cut to BOS + last 12
        (full, _), = m.score_pairs([([BOS, *range(18, 30)], [5, 6, 7])])
        assert ll == pytest.approx(full)
        (ll, _), = m.score_pairs([([BOS, 3, 4], list(range(3, 18)))])  # 15 + BOS = 16: context = BOS only
        assert ll < 0
        with pytest.raises(Exception, match="does not fit"):
            m.score_pairs([([BOS], list(range(3, 20)))])


class CharTok:
    """A tokenizer stub: one token per character, decoded to letters."""

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) % 30) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i % 26)) for i in ids)


def test_generate_until_batches_like_single_requests():
    from types import SimpleNamespace

    m = wrapped("mdlm", batch_size_=4)

    m.tok = CharTok()
    reqs = [SimpleNamespace(args=(ctx, {"until": ["\\n"], "max_gen_toks": 6})) for ctx in ("ab", "hello there", "x")]
    together = m.generate_until(reqs)
    alone = [m.generate_until([r])[0] for r in reqs]
    assert together == alone and all(len(t) <= 6 for t in together)


def test_generate_until_stops_at_until_strings():
    from types import SimpleNamespace

    m = wrapped("mdlm", batch_size_=4)

    m.tok = CharTok()
    free = m.generate_until([SimpleNamespace(args=("hello", {"until": [], "max_gen_toks": 8}))])[0]
    assert len(free) >= 3
    stop = free[2]
    cut = m.generate_until([SimpleNamespace(args=("hello", {"until": [stop], "max_gen_toks": 8}))])[0]
    assert cut == free[: free.index(stop)]


def test_dlm_eval_passes_lm_evals_subcommands_and_flags_through():
    """`dlm eval` is lm-eval's CLI with the dlm model and tasks added: ls and validate see dlm's
    offline tasks, run --help lists lm-eval's own flags, and the help says why `lm_eval --model
    dlm` cannot work (no plugin hook for models)."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dlm.cli", "eval", *args], capture_output=True, text=True,
                              env=child_env(), timeout=300)

    r = cli("ls", "tasks")
    assert r.returncode == 0 and "dlm_add_mc" in r.stdout and "dlm_tasks" in r.stdout
    r = cli("validate", "--tasks", "dlm_add_mc,dlm_add")
    assert r.returncode == 0 and "valid" in (r.stdout + r.stderr)
    r = cli("run", "--help")
    assert r.returncode == 0 and "--log_samples" in r.stdout and "--include_path" in r.stdout
    r = cli("--help")
    assert "plugin hook" in r.stdout and "dlm eval ls tasks" in r.stdout
