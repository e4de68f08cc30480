"""The OpenAI-compatible server over real HTTP on loopback: the `openai` client (completions,
chat, streaming, structured output), batching = single requests, disconnects, every error.

    python -m pytest tests/test_serving.py -q
"""

import json
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from dlm.decoding.config import DecodeConfig
from dlm.model import DLMConfig, DLMModel
from dlm.tokenizer import train_tokenizer

WORDS = ('the cat sat on 12 mats ; {"name": "bob", "age": 42} [1, 2, 3] yes no maybe hello world').split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(300)]
    train_tokenizer(texts, d, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(d))
    torch.manual_seed(0)
    cfg = DLMConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=128)
    DLMModel(cfg).save_pretrained(str(d))
    return d


class Server:
    def __init__(self, model_dir, **settings):
        import uvicorn
        from dlm.serving.app import ServerSettings, create_app

        self.port = _free_port()
        self.settings = ServerSettings(model_dir=str(model_dir), served_model_name="tiny", **settings)
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.close()


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, defaults=DecodeConfig(unmask="threshold", threshold=0.5))
    yield s
    s.stop()


def test_models_tokenizer_and_health(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = httpx.post(server.url + "/tokenize", json={"prompt": "the cat sat"}).json()
    assert r["count"] == len(r["tokens"]) > 0
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "the cat sat"
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>" and info["model_max_length"] == 128
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completions_with_the_openai_client(server):
    c = server.client()
    r = c.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
    # list of strings, token ids, list of token ids; n choices each
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "the cat"}).json()["tokens"]
    for prompt in (["the cat", "a dog"], ids, [ids, ids]):
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, n=2, temperature=1.0, seed=3)
        assert len(r.choices) == 4 if isinstance(prompt[0], (str, list)) else len(r.choices) == 2
        assert [ch.index for ch in r.choices] == list(range(len(r.choices)))
    # same prompt as text and as ids, same seed: same output
    a = c.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=1.0, seed=11)
    b = c.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=1.0, seed=11)
    assert a.choices[0].text == b.choices[0].text


def test_stop_strings_cut_the_text(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="the", max_tokens=24, temperature=1.0, seed=5).choices[0].text
    if len(full) < 4:
        pytest.skip("the random model stopped at once")
    stop = full[2:4]
    r = c.completions.create(model="tiny", prompt="the", max_tokens=24, temperature=1.0, seed=5, stop=[stop])
    assert stop not in r.choices[0].text and full.startswith(r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"


def test_chat_and_streaming(server):
    c = server.client()
    msgs = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=1.0, seed=2)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=1.0, seed=2,
                                            stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    plain = c.completions.create(model="tiny", prompt="the cat", max_tokens=16, temperature=1.0, seed=4)
    parts = list(c.completions.create(model="tiny", prompt="the cat", max_tokens=16, temperature=1.0, seed=4,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts) == plain.choices[0].text


def test_stream_uses_sse_and_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "the", "max_tokens": 8, "stream": True, "seed": 1}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_structured_outputs_in_every_spelling(server):
    c = server.client()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}], max_tokens=40,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "p", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert isinstance(obj["age"], int) and isinstance(obj["name"], str)
    r = c.completions.create(model="tiny", prompt="x", max_tokens=40, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)
    cases = [({"structured_outputs": {"regex": "[0-9]{3}"}}, lambda t: re.fullmatch("[0-9]{3}", t)),
             ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
             ({"structured_outputs": {"json": schema}}, lambda t: json.loads(t)["age"] is not None),
             ({"structured_outputs": {"grammar": 'start: "[" NUM "]"\nNUM: /[0-9]+/\n'}},
              lambda t: re.fullmatch(r"\[[0-9]+\]", t)),
             ({"guided_regex": "(ab)+"}, lambda t: re.fullmatch("(ab)+", t)),
             ({"guided_choice": ["maybe"]}, lambda t: t == "maybe"),
             ({"guided_json": schema}, lambda t: isinstance(json.loads(t)["age"], int)),
             ({"guided_grammar": 'start: "x" "y"+\n'}, lambda t: re.fullmatch("xy+", t))]
    for extra, check in cases:
        r = c.completions.create(model="tiny", prompt="the", max_tokens=24, temperature=1.0, seed=1, extra_body=extra)
        assert check(r.choices[0].text), (extra, r.choices[0].text)


def test_decoding_options_as_extra_fields(server):
    c = server.client()
    for extra in ({"unmask": "confidence", "block_length": 4, "cache": "dual"}, {"early_commit": True},
                  {"steps": 4, "unmask": "margin"}, {"cache": "prefix", "block_length": 8}):
        r = c.completions.create(model="tiny", prompt="the cat", max_tokens=8, extra_body=extra)
        assert r.choices[0].finish_reason in ("stop", "length")
    # steps are honoured: 8 tokens in 2 steps take 2 network calls, in 8 steps 8 (no early stop:
    # ignore_eos), and the stats say so
    for steps in (2, 8):
        r = c.completions.create(model="tiny", prompt="the cat", max_tokens=8,
                                 extra_body={"steps": steps, "unmask": "random", "ignore_eos": True})
        stats = r.choices[0].model_extra["stats"]
        assert stats["nfe"] == steps, stats
        assert r.usage.completion_tokens == 8


def test_concurrent_requests_share_steps_and_equal_single_results(server):
    c = server.client()
    prompts = [("the cat", 3), ("a dog sat on the mat", 4), ("yes", 5), ("hello world and more", 6)] * 2
    single = [c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=1.0, seed=s).choices[0].text
              for p, s in prompts]
    steps_before = server.app.state.engine.stats()["steps"]
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda ps: c.completions.create(model="tiny", prompt=ps[0], max_tokens=12,
                                                               temperature=1.0, seed=ps[1]).choices[0].text, prompts))
    assert together == single
    # eight requests of up to 12 steps each: shared forwards took far fewer than 8 x 12 steps
    assert server.app.state.engine.stats()["steps"] - steps_before < 8 * 12


def test_client_disconnect_frees_the_slot(model_dir):
    s = Server(model_dir, defaults=DecodeConfig(unmask="confidence"))  # one token per step: a long request
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 120, "stream": True,
                                                                   "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
            assert s.app.state.engine.stats()["running"] == 1
        deadline = time.time() + 10
        while s.app.state.engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.02)
        assert s.app.state.engine.stats()["running"] == 0
        # non-streaming: the client times out and goes away
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 120, "ignore_eos": True},
                       timeout=0.05)
        deadline = time.time() + 10
        while s.app.state.engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.02)
        assert s.app.state.engine.stats()["running"] == 0
    finally:
        s.stop()


def _error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_openai_errors_never_500(server):
    u = server.url + "/v1/completions"
    _error(httpx.post(u, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "model" in _error(httpx.post(u, json={"model": "gpt-9", "prompt": "x"}), 400)["message"]
    assert _error(httpx.post(u, json={"prompt": "x", "max_tokens": "many"}), 400)["param"] == "max_tokens"
    _error(httpx.post(u, json={"prompt": 5}), 400)
    _error(httpx.post(u, json={}), 400)
    _error(httpx.post(u, json={"prompt": "x", "max_tokens": 100000}), 400)
    _error(httpx.post(u, json={"prompt": "the " * 200, "max_tokens": 8}), 400)
    _error(httpx.post(u, json={"prompt": [1, 2, 99999]}), 400)
    _error(httpx.post(u, json={"prompt": "", "max_tokens": 4}), 400)
    _error(httpx.post(u, json={"prompt": "x", "temperature": -1}), 400)
    _error(httpx.post(u, json={"prompt": "x", "unmask": "psychic"}), 400)
    _error(httpx.post(u, json={"prompt": "x", "threshold": 1.5, "unmask": "threshold"}), 400)
    _error(httpx.post(u, json={"prompt": "x", "cache": "exact"}), 400)
    assert "regex" in _error(httpx.post(u, json={"prompt": "x", "guided_regex": "[a-"}), 400)["message"]
    assert "satisfied" in _error(httpx.post(u, json={"prompt": "x", "max_tokens": 2,
                                                     "guided_regex": "[a-z]{40}"}), 400)["message"]
    _error(httpx.post(u, json={"prompt": "x", "guided_grammar": "start: (((("}), 400)
    _error(httpx.post(u, json={"prompt": "x", "guided_json": {"type": "strin"}}), 400)
    _error(httpx.post(u, json={"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}), 400)
    _error(httpx.post(server.url + "/v1/chat/completions", json={"messages": []}), 400)
    _error(httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"content": "no role"}]}), 400)
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    # the server still works
    assert httpx.post(u, json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_limits_queue_and_api_key(model_dir):
    s = Server(model_dir, api_key="sekret", max_queue=2, max_body_bytes=2000,
               defaults=DecodeConfig(unmask="confidence"))
    try:
        u = s.url + "/v1/completions"
        assert _error(httpx.post(u, json={"prompt": "x"}), 401)["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model="tiny", prompt="x")
        ok = s.client(api_key="sekret").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert ok.choices
        auth = {"Authorization": "Bearer sekret"}
        _error(httpx.post(u, json={"prompt": "x" * 5000}, headers=auth), 413)
        assert httpx.get(s.url + "/health").status_code == 200  # health and metrics stay open
        # queue of 2: a third concurrent long request gets 429 with Retry-After
        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(httpx.post, u, json={"prompt": "the", "max_tokens": 60}, headers=auth, timeout=60)
                    for _ in range(4)]
            codes = [f.result() for f in futs]
        statuses = sorted(r.status_code for r in codes)
        assert 429 in statuses and 200 in statuses, statuses
        busy = next(r for r in codes if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and _error(busy, 429)["code"] == "queue_full"
    finally:
        s.stop()


def test_metrics_are_prometheus_text(server):
    server.client().completions.create(model="tiny", prompt="the", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("dlm_requests_total", "dlm_queue_depth", "dlm_tokens_per_second", "dlm_forward_passes_total",
                 "dlm_request_latency_seconds_bucket", "dlm_time_to_first_token_seconds_bucket"):
        assert name in text, name


def test_echo_logprobs_follow_the_chain_rule_scores(server, model_dir):
    from dlm.loading import load_model
    from dlm.likelihood import token_logprobs

    ids = httpx.post(server.url + "/tokenize", json={"prompt": "the cat sat on"}).json()["tokens"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [ids], "max_tokens": 1, "temperature": 0,
                                                         "logprobs": 1, "echo": True, "seed": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    model = load_model(str(model_dir)).eval()
    want, _, _ = token_logprobs(model, [model.config.bos_token_id, *ids])
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want[2 : len(ids) + 1], abs=1e-5)
    assert all(max(t.values()) >= v - 1e-9 for t, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))


def test_lm_eval_local_completions_matches_in_process(server, model_dir, tmp_path):
    """lm-eval's own `local-completions` client against the server, and the in-process "dlm"
    model with the same (chain) loglikelihood: identical per-sample scores and accuracy."""
    import subprocess
    import sys

    from helpers import child_env

    def run(model, args, out):
        r = subprocess.run([sys.executable, "-m", "dlm.cli", "eval", "--model", model, "--model_args", args,
                            "--tasks", "dlm_add_mc", "--limit", "6", "--output_path", str(out), "--log_samples"],
                           capture_output=True, text=True, env=child_env(), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        samples = [json.loads(line) for p in out.rglob("samples_*.jsonl") for line in open(p)]
        return sorted((s["doc_id"], [float(x[0][0]) for x in s["resps"]]) for s in samples)

    remote = run("local-completions", f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                                      f"tokenizer={model_dir},num_concurrent=2,max_retries=1", tmp_path / "remote")
    local = run("dlm", f"pretrained={model_dir},loglikelihood=chain", tmp_path / "local")
    assert [d for d, _ in remote] == [d for d, _ in local] and len(remote) == 6
    for (_, a), (_, b) in zip(remote, local):
        assert a == pytest.approx(b, abs=1e-4)


def test_ar_baseline_is_served_with_exact_logprobs(model_dir, tmp_path):
    """The same-size AR baseline through dlm serve: greedy output equals step-by-step argmax
    decoding without a cache, echo logprobs are the exact log p(x_i | x_<i), streaming works and
    structured outputs are refused with a 400."""
    import shutil

    from dlm.loading import load_model

    ar_dir = tmp_path / "ar"
    shutil.copytree(model_dir, ar_dir)
    cfg = json.loads((ar_dir / "config.json").read_text())
    cfg["objective"] = "ar"
    (ar_dir / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(ar_dir)).eval()
    s = Server(ar_dir)
    try:
        ids = httpx.post(s.url + "/tokenize", json={"prompt": "the cat sat"}).json()["tokens"]
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [ids], "max_tokens": 6, "temperature": 0,
                                                        "ignore_eos": True, "logprobs": 1, "echo": True}).json()
        ch = r["choices"][0]
        x = [model.config.bos_token_id, *ids]
        with torch.no_grad():
            for _ in range(6):  # reference: full recompute, argmax without MASK
                logits = model(torch.tensor([x]), is_causal=True).logits[0, -1].double()
                logits[model.config.mask_token_id] = float("-inf")
                x.append(int(logits.argmax()))
            logp = model(torch.tensor([x]), is_causal=True).logits[0, :-1].double().log_softmax(-1)
        exact = logp.gather(-1, torch.tensor(x[1:])[:, None])[:, 0].tolist()
        assert ch["text"] == AutoTokenizer.from_pretrained(str(ar_dir)).decode(x[1:])  # echo: prompt + output
        assert ch["logprobs"]["token_logprobs"][0] is None
        assert ch["logprobs"]["token_logprobs"][1:] == pytest.approx(exact[1:], abs=1e-5)
        c = s.client()
        chunks = list(c.completions.create(model="tiny", prompt="the cat", max_tokens=5, stream=True, seed=2,
                                           temperature=1.0, extra_body={"ignore_eos": True}))
        streamed = "".join(k.choices[0].text for k in chunks)
        once = c.completions.create(model="tiny", prompt="the cat", max_tokens=5, seed=2, temperature=1.0,
                                    extra_body={"ignore_eos": True}).choices[0].text
        assert streamed == once  # seeded sampling repeats
        bad = httpx.post(s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 4,
                                                          "guided_regex": "[0-9]+"})
        assert bad.status_code == 400 and "diffusion" in bad.json()["error"]["message"]
    finally:
        s.stop()


def test_request_timeout_and_no_remote_code(model_dir, monkeypatch):
    """A request past --request-timeout leaves the batch with a 408 (the server keeps serving);
    the tokenizer is loaded without remote code unless the setting says so."""
    import dlm.tokenizer

    seen = []
    real = dlm.tokenizer.load_tokenizer

    def spy(path, trust_remote_code=False):
        seen.append(trust_remote_code)
        return real(path, trust_remote_code=trust_remote_code)

    monkeypatch.setattr(dlm.tokenizer, "load_tokenizer", spy)
    s = Server(model_dir, request_timeout=1e-6, defaults=DecodeConfig(unmask="confidence"))
    try:
        assert seen == [False]
        u = s.url + "/v1/completions"
        err = _error(httpx.post(u, json={"prompt": "the", "max_tokens": 40, "ignore_eos": True}), 408)
        assert err["type"] == "timeout_error" and err["code"] == "timeout"
        assert httpx.get(s.url + "/health").json()["running"] == 0  # its slot is free
    finally:
        s.stop()
