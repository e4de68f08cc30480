"""The server under hostile and real-world input: a request's failure stays with it, constraint
compilation never blocks anyone, and the OpenAI surface's rough edges (seed range, chat logprobs,
scoring with max_tokens 0, streaming usage, the AR server's refusals, block lengths, the Bearer
scheme, a connection kept after an internal error).

    python -m pytest tests/test_serving_hardening.py -q
"""

import http.client
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serving import Server, _error, model_dir  # noqa: F401  (fixture)

from dlm.constraints import CompileLimits
from dlm.decoding.config import DecodeConfig

UNIQUE_11 = {"type": "array", "items": {"const": 1}, "minItems": 2, "maxItems": 2, "uniqueItems": True}


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    s = Server(model_dir, defaults=DecodeConfig(unmask="threshold", threshold=0.5),
               compile_limits=CompileLimits(timeout_s=3.0, max_dfa_mb=1024))
    yield s
    s.stop()


def _post(server, body, path="/v1/completions", **kw):
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def test_a_failing_request_fails_alone_and_names_only_its_own_cause(server):
    """A constraint whose output fails the final check (uniqueItems over items that can only be
    1: [1,1]) and one no output of max_tokens fits, sent beside plain completions: only they
    fail, each with its own 4xx, and no message carries another request's content."""
    good = [{"prompt": f"the cat number {i}", "max_tokens": 6, "seed": i} for i in range(3)]
    bad = {"prompt": "secret prompt", "max_tokens": 8, "guided_json": UNIQUE_11}
    unsat = {"prompt": "x", "max_tokens": 3, "guided_grammar": 'start: "aaaa" "bbbb" "cccc" "dddd" "eeee"\n'}
    with ThreadPoolExecutor(5) as ex:
        futs = [ex.submit(_post, server, b) for b in [*good, bad, unsat]]
        rs = [f.result() for f in futs]
    for r in rs[:3]:
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
    e = _error(rs[3], 422)
    assert e["code"] == "constraint_not_satisfied" and "uniqueItems" in e["message"]
    assert "the cat number" not in e["message"]
    e = _error(rs[4], 400)
    assert e["code"] == "constraint_unsatisfiable" and "secret" not in e["message"]
    assert "the cat number" not in e["message"]
    # streaming: the failing choice ends with its own error event, and so does nothing else
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={**bad, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert any("constraint_not_satisfied" in line for line in lines)
    assert _post(server, good[0]).status_code == 200


def test_constraint_compilation_never_blocks_the_event_loop(server):
    """A regex whose token automaton takes seconds to build (2^18 states): /health keeps
    answering while it compiles (the build is stopped at the 1 s budget), and the request itself
    completes (grammar engine). A blocked loop would answer once or twice in that time."""
    result = {}

    def slow():
        result["r"] = _post(server, {"prompt": "x", "max_tokens": 20, "seed": 3,
                                     "guided_regex": "(a|b)*a(a|b){17}"})

    t = threading.Thread(target=slow)
    t.start()
    answered = 0
    while t.is_alive():
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        answered += 1
        time.sleep(0.02)
    t.join()
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["choices"][0]["text"]
    assert answered >= 5, answered


def test_seed_range_and_a_kept_connection_after_errors(server, monkeypatch):
    assert _error(_post(server, {"prompt": "x", "max_tokens": 2, "seed": 2**64}), 400)["param"] == "seed"
    for seed in (-(2**63), -1, 2**63 - 1):
        assert _post(server, {"prompt": "x", "max_tokens": 2, "seed": seed}).status_code == 200
    # one keep-alive connection: a 400 and then an internal error (500) do not close it
    svc = server.app.state.service

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(svc, "chat_prompt", broken)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for body, path, want in ((b'{"prompt": "x", "seed": 18446744073709551616}', "/v1/completions", 400),
                                 (b'{"messages": [{"role": "user", "content": "hi"}]}', "/v1/chat/completions", 500),
                                 (b'{"prompt": "x", "max_tokens": 2}', "/v1/completions", 200)):
            conn.request("POST", path, body=body, headers={"content-type": "application/json"})
            r = conn.getresponse()
            data = json.loads(r.read())
            assert r.status == want, data
            if want == 500:
                assert data["error"]["type"] == "server_error" and "boom" not in data["error"]["message"]
    finally:
        conn.close()


def test_chat_logprobs_in_openai_shape(server):
    from dlm.likelihood import token_top_logprobs
    from dlm.loading import load_model
    from dlm.serving.protocol import ChatMessage

    c = server.client()
    msgs = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= -1e9 for e in content)
    assert all(e.bytes == list(e.token.encode()) for e in content)
    # each logprob is the chain score of that token given the prompt and the tokens before it
    svc = server.app.state.service
    ids = svc.encode(svc.chat_prompt([ChatMessage(**m) for m in msgs]))
    gen = svc.encode(r.choices[0].message.content)
    assert [e.token for e in content] == [svc.tokenizer.decode([t]) for t in gen]
    model = load_model(server.settings.model_dir)  # the engine's copy is in its own process
    lp, _ = token_top_logprobs(model, [svc.cfg.bos_token_id, *ids, *gen], 2, start=1 + len(ids))
    assert [e.logprob for e in content] == pytest.approx(lp[1 + len(ids):], abs=1e-6)
    no = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert no.choices[0].logprobs is None
    assert _error(_post(server, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                        "/v1/chat/completions"), 400)["param"] == "top_logprobs"


def test_max_tokens_zero_with_echo_scores_the_prompt(server):
    r = _post(server, {"prompt": "the cat sat on", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["text"] == "the cat sat on" and r.json()["usage"]["completion_tokens"] == 0
    lp = ch["logprobs"]
    assert lp["token_logprobs"][0] is None and all(v < 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == "the cat sat on"
    assert _error(_post(server, {"prompt": "x", "max_tokens": 0}), 400)["param"] == "max_tokens"


def test_streamed_usage_counts_every_prompt(server):
    prompts = ["the cat", "a dog sat on the mat"]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "prompt": prompts, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    n = sum(len(httpx.post(server.url + "/tokenize", json={"prompt": p}).json()["tokens"]) for p in prompts)
    assert usage["prompt_tokens"] == n
    plain = _post(server, {"prompt": prompts, "max_tokens": 4}).json()["usage"]
    assert plain["prompt_tokens"] == n


def test_block_length_is_checked(server):
    e = _error(_post(server, {"prompt": "x", "max_tokens": 4, "block_length": 3}), 400)
    assert e["param"] == "block_length" and "divide" in e["message"]
    assert _post(server, {"prompt": "x", "max_tokens": 4, "block_length": 2}).status_code == 200


def test_block_model_refuses_another_block_length(model_dir, tmp_path):  # noqa: F811
    d = tmp_path / "bd3"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(objective="bd3lm", block_size=4)
    (d / "config.json").write_text(json.dumps(cfg))
    s = Server(d)
    try:
        e = _error(_post(s, {"prompt": "x", "max_tokens": 8, "block_length": 8}), 400)
        assert "blocks of 4" in e["message"]
        assert _post(s, {"prompt": "x", "max_tokens": 8, "block_length": 4}).status_code == 200
    finally:
        s.stop()


def test_ar_server_refuses_constraints_and_diffusion_options_before_any_work(model_dir, tmp_path):  # noqa: F811
    d = tmp_path / "ar"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["objective"] = "ar"
    (d / "config.json").write_text(json.dumps(cfg))
    s = Server(d)
    try:
        e = _error(_post(s, {"prompt": "x", "guided_json": {"type": "string", "maxLength": 32767}}), 400)
        assert "diffusion model" in e["message"]
        for opt in ({"block_length": 4}, {"unmask": "threshold"}, {"cache": "dual"}, {"early_commit": True}):
            e = _error(_post(s, {"prompt": "x", "max_tokens": 4, **opt}), 400)
            assert e["param"] == next(iter(opt)) and "autoregressive" in e["message"]
        assert _post(s, {"prompt": "x", "max_tokens": 4, "top_k": 5}).status_code == 200
    finally:
        s.stop()


def test_bearer_scheme_is_case_insensitive(model_dir):  # noqa: F811
    s = Server(model_dir, api_key="k3y")
    try:
        for auth in ("Bearer k3y", "bearer k3y", "BEARER k3y"):
            assert _post(s, {"prompt": "x", "max_tokens": 2}, headers={"Authorization": auth}).status_code == 200
        for auth in ("Bearer nope", "Basic k3y", "k3y", ""):
            assert _post(s, {"prompt": "x", "max_tokens": 2}, headers={"Authorization": auth}).status_code == 401
    finally:
        s.stop()
