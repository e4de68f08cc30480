"""The published families end to end on their tiny checkpoints (with a tokenizer beside them):
`dlm generate` from the command line, `dlm serve` answering the openai client (completions,
chat through the checkpoint's own chat template, streaming, echo logprobs), constraints, and
`dlm ppl`-style scoring."""

import json
import re
import subprocess
import sys

import pytest
import torch

from helpers import child_env
from published import WRITERS, write_tokenizer

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("published_e2e")
    out = {}
    for fam in ("llada", "dream", "sdar", "fast_dllm_v2"):
        d = root / fam
        WRITERS[fam](str(d), seed=11)
        write_tokenizer(str(d), fam)
        out[fam] = d
    return out


@pytest.mark.parametrize("family", ["llada", "fast_dllm_v2"])
def test_generate_from_the_command_line(ckpt, family):
    r = subprocess.run([sys.executable, "-m", "dlm.cli", "generate", str(ckpt[family]), "--prompt", "add: 12+30=",
                        "--max-new-tokens", "8", "--threads", "1"], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt"] == "add: 12+30=" and out["finish_reason"] in ("stop", "length")
    assert out["nfe"] >= 1


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_serve_answers_the_openai_client(ckpt, family):
    from test_serving import Server

    s = Server(ckpt[family])
    try:
        svc = s.app.state.service
        assert svc.defaults.unmask == "threshold" and svc.defaults.cache == ("dual" if family == "llada" else "exact")
        c = s.client()
        r = c.completions.create(model="tiny", prompt="add: 1+2=", max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens == 9
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2)
        # the checkpoint's chat template, its special tokens written once (no BOS added twice)
        text = svc.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = svc.tokenizer.encode(text, add_special_tokens=False)
        assert chat.usage.prompt_tokens == len(ids) == (25 if family == "llada" else 21), chat.usage
        assert ids.count(0) == (1 if family == "llada" else 0)  # LLaDA's template starts with its BOS
        assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
        chunks = list(c.completions.create(model="tiny", prompt="x", max_tokens=6, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        echo = c.completions.create(model="tiny", prompt="abc", max_tokens=0, echo=True, logprobs=1)
        lp = echo.choices[0].logprobs
        assert lp.tokens == ["a", "b", "c"] and lp.token_logprobs[0] is None
        assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        r = c.completions.create(model="tiny", prompt="json:", max_tokens=24, temperature=0,
                                 extra_body={"guided_json": schema})
        obj = json.loads(r.choices[0].text)
        assert isinstance(obj["n"], int)
        r = c.completions.create(model="tiny", prompt="n:", max_tokens=8, temperature=0,
                                 extra_body={"guided_regex": "[0-9]{3}"})
        assert re.fullmatch("[0-9]{3}", r.choices[0].text)
    finally:
        s.stop()


def test_lm_eval_scores_and_generates(ckpt):
    pytest.importorskip("lm_eval")
    from dlm.evals.lm_eval_model import DLMEvalModel

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = DLMEvalModel(pretrained=str(ckpt["dream"]), mc_samples=4, batch_size=2)
    scores = lm.loglikelihood([Req("add: 1+2=", "3"), Req("", "abc")])
    assert all(ll < 0 and isinstance(greedy, bool) for ll, greedy in scores)
    assert lm.loglikelihood_rolling([Req("the cat sat on the mat")])[0] < 0
    chain = DLMEvalModel(pretrained=str(ckpt["sdar"]), loglikelihood="chain").loglikelihood([Req("ab", "cd")])
    assert chain[0][0] < 0
    out = lm.generate_until([Req("add: 1+2=", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(out[0], str) and "\n" not in out[0]


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_fine_tuning_under_zero3_saves_the_family_format(ckpt, family, small_corpus, tmp_path):
    from dlm import load_model
    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    out = train(TrainConfig(data=small_corpus, output_dir=str(tmp_path / "ft"), init_from=str(ckpt[family]),
                            seq_len=32, micro_batch=2, max_steps=2, eval_every=2, eval_batches=1, save_every=2,
                            zero_stage=3, tensorboard=False, lr=1e-3))
    raw = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    orig = json.loads((ckpt[family] / "config.json").read_text())
    assert raw["model_type"] == orig["model_type"]
    tuned, base = load_model(out), load_model(str(ckpt[family]))
    assert tuned.config.family == family
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed  # the step moved the weights
    metrics = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and m["loss"] > 0 for m in metrics)


def test_a_dit_checkpoint_without_a_tokenizer_takes_tokenizer(ckpt):
    """The OpenWebText DiTs ship no tokenizer (GPT-2's is theirs): --tokenizer gives one, taken
    as it is (no roles added), with the checkpoint's special ids."""
    import os

    dit = os.path.join(os.path.dirname(__file__), "golden", "dit", "bd3lm")
    r = subprocess.run([sys.executable, "-m", "dlm.cli", "generate", dit, "--tokenizer", str(ckpt["llada"]),
                        "--prompt", "abc", "--max-new-tokens", "8", "--threads", "1"],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] in ("stop", "length") and out["nfe"] >= 1


@pytest.mark.parametrize("family", ["dream", "sdar"])
def test_ppl_of_a_published_model(ckpt, family, small_corpus):
    r = subprocess.run([sys.executable, "-m", "dlm.cli", "ppl", str(ckpt[family]), "--data", small_corpus,
                        "--seq-len", "32", "--mc-samples", "2", "--max-batches", "1", "--batch-size", "2",
                        "--threads", "1"], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bound"] and res["ppl"] > 1 and res["tokens"] > 0 and res["ppl_low"] <= res["ppl"] <= res["ppl_high"]
