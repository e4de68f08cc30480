"""Golden outputs: behaviour pinned across refactors.

For fixed seeds and small deterministic models this pins
* the tokens and NFE of every decoder configuration of `dlm bench decode` (MDLM / RADD rows and
  BD3-LM / E2D2 rows), every unmask policy, sampling, and a time-conditioned MDLM;
* the server's responses to a fixed request set (text, finish reasons, usage, logprobs, NFE);
* the perplexity numbers of `dlm ppl` (every objective) and lm-eval's loglikelihoods.

The pinned values live in tests/golden/golden.json. A change that alters any of them changes
behaviour: if that is intended, regenerate the file and say why in the commit:

    DLM_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py -q
"""

import json
import os
import random
from pathlib import Path

import pytest
import torch

from dlm.decoding import DecodeConfig, Decoder
from dlm.model import DLMModel

GOLDEN = Path(__file__).parent / "golden" / "golden.json"
UPDATE = os.environ.get("DLM_UPDATE_GOLDEN") == "1"

# `dlm bench decode`'s configurations (evals/bench_decode.py), written out here so that a change
# there cannot silently change what is pinned.
MDLM_CONFIGS = {
    "vanilla": dict(unmask="confidence", cache="none"),
    "threshold": dict(unmask="threshold", threshold=0.9, cache="none"),
    "threshold+prefix": dict(unmask="threshold", threshold=0.9, cache="prefix"),
    "threshold+dual": dict(unmask="threshold", threshold=0.9, cache="dual"),
    "factor+dual": dict(unmask="factor", factor=1.0, cache="dual"),
    "early-commit": dict(unmask="confidence", early_commit=True, early_commit_scope="answer", cache="none"),
    "threshold+dual+early-commit": dict(unmask="threshold", threshold=0.9, cache="dual", early_commit=True),
    "early-commit(3/2/1)": dict(unmask="confidence", early_commit=True, early_commit_scope="answer",
                                early_commit_gaps=(3.0, 2.0, 1.0), cache="none"),
    "threshold(0.5)+dual": dict(unmask="threshold", threshold=0.5, cache="dual"),
    # the other policies and sampling
    "margin": dict(unmask="margin", steps=8),
    "entropy": dict(unmask="entropy", steps=8),
    "random": dict(unmask="random", steps=8),
    "ancestral": dict(unmask="ancestral", steps=8, temperature=1.0),
    "first_hitting": dict(unmask="first_hitting", temperature=1.0),
    "sample-topk-topp": dict(unmask="confidence", temperature=0.8, top_k=20, top_p=0.9, steps=8),
    "threshold+early-commit-block": dict(unmask="threshold", threshold=0.7, early_commit=True,
                                         early_commit_gaps=(1.0, 0.5, 0.2)),
}
BLOCK_CONFIGS = {
    "vanilla": dict(unmask="confidence", cache="none"),
    "exact-cache": dict(unmask="confidence", cache="exact"),
    "threshold+exact": dict(unmask="threshold", threshold=0.9, cache="exact"),
    "threshold+exact+early-commit": dict(unmask="threshold", threshold=0.9, cache="exact", early_commit=True),
    "exact+early-commit": dict(unmask="confidence", cache="exact", early_commit=True),
    "exact+early-commit(3/2/1)": dict(unmask="confidence", cache="exact", early_commit=True,
                                      early_commit_gaps=(3.0, 2.0, 1.0)),
    "threshold(0.5)+exact": dict(unmask="threshold", threshold=0.5, cache="exact"),
    "first_hitting+exact": dict(unmask="first_hitting", temperature=1.0, cache="exact"),
    "sample+exact": dict(unmask="confidence", temperature=1.0, cache="exact"),
}
PROMPTS = [[5, 7, 9], [10], [20, 23, 26, 29, 32, 35, 38]]  # progressions, as the models learned
V, MASK, BOS, EOS, PAD = 64, 63, 0, 1, 2


MODELS = Path(__file__).parent / "golden" / "models"


def _model(name: str) -> DLMModel:
    """A small model trained on a synthetic language (tests/golden/make_models.py), committed."""
    return DLMModel.from_pretrained(MODELS / name).eval()


def _decode_all(objective: str, configs: dict) -> dict:
    model = _model(objective)
    dec = Decoder(model)
    out = {}
    block = objective in ("bd3lm", "e2d2")
    for name, over in configs.items():
        cfg = dict(over)
        if not block:
            cfg.setdefault("block_length", 8)
        res = dec.generate(PROMPTS, DecodeConfig(max_new_tokens=16, seed=7, **cfg))
        out[name] = [{"tokens": r.tokens, "finish": r.finish_reason, "nfe": r.stats["nfe"]} for r in res]
    return out


def _compare(section: str, got):
    """Check `got` against the pinned value (or record it with DLM_UPDATE_GOLDEN=1)."""
    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if UPDATE:
        data[section] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    assert section in data, f"no golden values for {section}; run with DLM_UPDATE_GOLDEN=1 once"
    _assert_same(data[section], json.loads(json.dumps(got)), section)


def _assert_same(want, got, where):
    if isinstance(want, float) or isinstance(got, float):
        assert want == pytest.approx(got, rel=1e-5, abs=1e-6), f"{where}: {got} != pinned {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(want) == set(got), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _assert_same(want[k], got[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(want) == len(got), f"{where}: {got} != pinned {want}"
        for i, (a, b) in enumerate(zip(want, got)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert want == got, f"{where}: {got!r} != pinned {want!r}"


@pytest.mark.parametrize("objective", ["mdlm", "radd", "mdlm-tc"])
def test_golden_decode_bidirectional(objective):
    configs = MDLM_CONFIGS if objective != "mdlm-tc" else {
        k: MDLM_CONFIGS[k] for k in ("vanilla", "threshold+dual", "ancestral", "first_hitting")}
    _compare(f"decode/{objective}", _decode_all(objective, configs))


@pytest.mark.parametrize("objective", ["bd3lm", "e2d2"])
def test_golden_decode_block_models(objective):
    _compare(f"decode/{objective}", _decode_all(objective, BLOCK_CONFIGS))


def test_golden_decode_outputs_are_not_trivial():
    """The pinned decodes exercise real work: outputs of several tokens, several forwards."""
    data = json.loads(GOLDEN.read_text())
    for section, configs in data.items():
        if section.startswith("decode/"):
            lens = [len(r["tokens"]) for rows in configs.values() for r in rows]
            assert sum(lens) / len(lens) >= 4, section


# ------------------------------------------------------------------ perplexity and lm-eval
def _rows(n=6, L=24):
    """Rows of the models' language (BOS, an arithmetic progression mod 40, EOS), one padded."""
    ids = torch.full((n, L), EOS)
    ids[:, 0] = BOS
    for r in range(n):
        k = 8 + 2 * r
        ids[r, 1 : 1 + k] = 3 + (3 * r + (r % 4 + 1) * torch.arange(k)) % 40
    am = torch.ones_like(ids)
    am[-1, L // 2 :] = 0
    ids[-1, L // 2 :] = PAD
    return ids, am


class _Rows:
    def __init__(self, ids, am):
        self.ids, self.am = ids, am

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, sl):
        return {"input_ids": self.ids[sl], "attention_mask": self.am[sl]}


def test_golden_perplexity():
    from dlm.likelihood import perplexity

    ids, am = _rows()
    got = {}
    for objective in ("mdlm", "radd", "bd3lm", "e2d2", "ar", "mdlm-tc"):
        res = perplexity(_model(objective), _Rows(ids, am), batch_size=4, mc_samples=3, seed=5)
        got[objective] = {"nll": res["nll"], "tokens": res["tokens"], "bound": res["bound"]}
    _compare("ppl", got)


def test_golden_chain_logprobs():
    from dlm.likelihood import token_logprobs

    seq = [BOS, 5, 9, 12, 30, 31, 7, 8]
    got = {}
    for objective in ("mdlm", "bd3lm", "e2d2", "ar"):
        lp, top, top_lp = token_logprobs(_model(objective), seq)
        got[objective] = {"lp": lp, "top": top, "top_lp": top_lp}
    _compare("chain", got)


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def served():
    return MODELS / "served"


REQUESTS = [
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 8, "temperature": 0}),
    ("/v1/completions", {"prompt": ["the cat", "a dog"], "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 3}),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 12, "temperature": 1.0, "seed": 4, "stop": ["a"]}),
    ("/v1/completions", {"prompt": "the cat sat on", "max_tokens": 1, "temperature": 0, "logprobs": 1,
                         "echo": True}),
    ("/v1/completions", {"prompt": "yes no", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 8, "unmask": "threshold", "threshold": 0.5,
                         "block_length": 4, "cache": "dual", "temperature": 0}),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 8, "early_commit": True, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10,
                              "temperature": 1.0, "seed": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 24, "temperature": 1.0, "seed": 1,
                         "structured_outputs": {"regex": "[0-9]{3}"}}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 24, "temperature": 1.0, "seed": 1,
                         "structured_outputs": {"choice": ["yes", "no"]}}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 40, "temperature": 0, "guided_json": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}},
        "required": ["name", "age"]}}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 24, "temperature": 1.0, "seed": 1,
                         "structured_outputs": {"grammar": 'start: "[" NUM "]"\nNUM: /[0-9]+/\n'}}),
    ("/v1/completions", {"prompt": "the", "max_tokens": 8, "temperature": 1.0, "seed": 9, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                              "temperature": 1.0, "seed": 9, "stream": True}),
]


def _strip(body: dict) -> dict:
    """The parts of a response that are behaviour: no ids, times or timings."""
    out = {"usage": body.get("usage"), "choices": []}
    for ch in body["choices"]:
        c = {k: v for k, v in ch.items() if k not in ("stats",)}
        if "stats" in ch:
            c["nfe"] = ch["stats"]["nfe"]
            c["generated_tokens"] = ch["stats"]["generated_tokens"]
        out["choices"].append(c)
    return out


def _stream_summary(lines: list[str]) -> dict:
    texts, reasons = {}, {}
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for ch in chunk["choices"]:
            piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
            texts[ch["index"]] = texts.get(ch["index"], "") + (piece or "")
            if ch.get("finish_reason"):
                reasons[ch["index"]] = ch["finish_reason"]
    return {"texts": texts, "reasons": reasons, "done": lines[-1] == "data: [DONE]"}


def test_golden_server_responses(served):
    from fastapi.testclient import TestClient

    from dlm.serving.app import ServerSettings, create_app

    app = create_app(ServerSettings(model_dir=str(served), served_model_name="tiny",
                                    defaults=DecodeConfig(unmask="threshold", threshold=0.5)))
    got = []
    try:
        with TestClient(app) as client:
            for path, body in REQUESTS:
                if body.get("stream"):
                    with client.stream("POST", path, json=body) as r:
                        lines = [line for line in r.iter_lines() if line]
                    got.append({"status": r.status_code, "stream": _stream_summary(lines)})
                else:
                    r = client.post(path, json=body)
                    got.append({"status": r.status_code, "body": _strip(r.json())})
    finally:
        app.state.close()
    assert all(g["status"] == 200 for g in got), got
    _compare("server", got)


def test_golden_lm_eval_loglikelihood(served):
    from dlm.evals.lm_eval_model import DLMEvalModel

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = DLMEvalModel(pretrained=str(served), mc_samples=4, batch_size=2, seed=0)
    reqs = [Req("the cat", " sat on"), Req("yes no", " maybe"), Req("hello", " world")]
    got = {"elbo": [list(x) for x in lm.loglikelihood(reqs)],
           "rolling": lm.loglikelihood_rolling([Req("the cat sat on 12 mats ; yes no maybe")])}
    lm_chain = DLMEvalModel(pretrained=str(served), loglikelihood="chain", batch_size=2)
    got["chain"] = [list(x) for x in lm_chain.loglikelihood(reqs)]
    _compare("lm_eval", got)
