"""Bounded soak test and schema-based fuzzing of the server.

* 2,000 requests from 32 concurrent clients, mixed options (plain, chat, streaming, n=2,
  structured output, decoding options) and some bad requests: no 5xx, every request gets
  exactly one complete response, ids are unique, memory stays flat.
* schemathesis generates requests from the server's own OpenAPI document: no 5xx.

    python -m pytest tests/test_serving_soak.py -q
"""

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from test_serving import Server, model_dir  # noqa: F401  (fixture)

from dlm.decoding.config import DecodeConfig

pytestmark = pytest.mark.slow


def _rss(server) -> int:
    """Resident memory of the server: the front end (this process) and its engine process."""
    procs = [psutil.Process()]
    pid = getattr(server.app.state.engine, "pid", None)
    if pid is not None:
        procs.append(psutil.Process(pid))
    return sum(p.memory_info().rss for p in procs)


def _request(rng: random.Random, i: int):
    """(path, body, expected status, expected choices, streaming)."""
    kind = rng.choice(["plain", "plain", "chat", "stream", "n2", "regex", "choice", "options", "bad", "bad2"])
    base = {"prompt": rng.choice(["the cat", "yes", "a dog sat", "hello world"]), "max_tokens": rng.randint(2, 8),
            "temperature": rng.choice([0.0, 1.0]), "seed": i}
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                        "seed": i}, 200, 1, False
    if kind == "stream":
        return "/v1/completions", {**base, "stream": True}, 200, 1, True
    if kind == "n2":
        return "/v1/completions", {**base, "n": 2}, 200, 2, False
    if kind == "regex":
        return "/v1/completions", {**base, "max_tokens": 6, "guided_regex": "[0-9]{2}"}, 200, 1, False
    if kind == "choice":
        return "/v1/completions", {**base, "structured_outputs": {"choice": ["yes", "no"]}}, 200, 1, False
    if kind == "options":
        return "/v1/completions", {**base, "max_tokens": 8, "block_length": 4, "cache": "dual",
                                   "unmask": "confidence"}, 200, 1, False
    if kind == "bad":
        return "/v1/completions", {**base, "model": "nope"}, 400, 0, False
    if kind == "bad2":
        return "/v1/completions", {**base, "max_tokens": -3}, 400, 0, False
    return "/v1/completions", base, 200, 1, False


def test_soak_2000_requests_32_clients(model_dir):  # noqa: F811
    s = Server(model_dir, max_queue=512, defaults=DecodeConfig(unmask="threshold", threshold=0.5))
    rss = []
    lock = threading.Lock()
    try:
        rng = random.Random(0)
        plan = [_request(rng, i) for i in range(2000)]
        ids: list[str] = []
        problems: list[str] = []

        def one(k):
            path, body, status, n_choices, stream = plan[k]
            with httpx.Client(base_url=s.url, timeout=120) as c:
                if stream:
                    with c.stream("POST", path, json=body) as r:
                        lines = [line for line in r.iter_lines() if line]
                    ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                    rid = json.loads(lines[0][6:])["id"] if ok else None
                    got = r.status_code
                else:
                    r = c.post(path, json=body)
                    got = r.status_code
                    data = r.json()
                    ok = got == status and (("choices" in data and len(data["choices"]) == n_choices)
                                            if status == 200 else "error" in data)
                    rid = data.get("id")
            with lock:
                if got >= 500 or not ok:
                    problems.append(f"{k}: {path} {body} -> {got}")
                if rid is not None:
                    ids.append(rid)
                if k % 250 == 0:
                    rss.append(_rss(s))

        with ThreadPoolExecutor(32) as ex:
            list(ex.map(one, range(len(plan))))
        expected = sum(1 for p in plan if p[2] == 200)
        assert not problems, problems[:5]
        assert len(ids) == expected and len(set(ids)) == expected  # none lost, none duplicated
        # memory flat: after the warm-up quarter, growth under 64 MiB
        assert max(rss[2:]) - rss[2] < 64 * 2**20, [r // 2**20 for r in rss]
        assert s.app.state.engine.stats()["running"] == 0 and s.app.state.engine.stats()["queued"] == 0
    finally:
        s.stop()


def test_schemathesis_fuzz_finds_no_server_errors(model_dir):  # noqa: F811
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    s = Server(model_dir, max_tokens_limit=32, defaults=DecodeConfig(unmask="threshold", threshold=0.5))
    try:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        failures, calls, statuses = [], [0], set()
        for op in schema.get_all_operations():
            op = op.ok()

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=op.as_strategy())
            def run(case):
                response = case.call(timeout=60)
                calls[0] += 1
                statuses.add(response.status_code)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except Exception as e:  # collect, report all
                    failures.append(f"{op.label}: {type(e).__name__}: {str(e)[:300]}")
            run()
        assert not failures, failures[:5]
        assert calls[0] >= 100 and 200 in statuses and 400 in statuses, (calls, statuses)
    finally:
        s.stop()


# Real-world schemas of the committed JSONSchemaBench sample (every folder, both engines, large
# bounds), plus hand-made ones: a huge maxLength, a bound no output of max_tokens can meet (400),
# and one whose output fails the final check (422). Deliberate 4xx only, never a 5xx.
SOAK_SCHEMAS = ["o46559.json", "o81583.json", "o9919.json", "o85251.json", "o37614.json", "o83167.json",
                "o24891.json", "o9354.json", "search_recipes_by_ingredients_016d76f7.json",
                "create_calendar_event_e56a0e1e.json", "motif.schema.json", "jsdoc-1.0.0.json",
                "kb_284_Normalized.json", "sp_38_Normalized.json", "wp_92_Normalized.json"]
HANDMADE = [{"type": "object", "properties": {"text": {"type": "string", "maxLength": 32767}}, "required": ["text"]},
            {"type": "array", "minItems": 100},
            {"type": "array", "items": {"const": 1}, "minItems": 2, "maxItems": 2, "uniqueItems": True}]


@pytest.fixture(scope="module")
def long_model_dir(model_dir, tmp_path_factory):  # noqa: F811
    """The served test model's tokenizer with 512 positions: room for real schemas' outputs."""
    import shutil

    import torch

    from dlm.model import DLMConfig, DLMModel

    d = tmp_path_factory.mktemp("soak-model")
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".txt"):
            shutil.copy(f, d / f.name)
    cfg = json.loads((model_dir / "config.json").read_text())
    torch.manual_seed(1)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "mask_token_id",
            "bos_token_id", "eos_token_id", "pad_token_id")
    DLMModel(DLMConfig(**{k: cfg[k] for k in keys}, max_position_embeddings=512)).save_pretrained(d)
    return d


def test_soak_with_real_world_schemas(long_model_dir):
    """600 requests from 32 clients, a third of them constrained by real-world schemas, the rest
    plain, streaming and bad requests: 0 5xx, 0 lost, 0 duplicated, every 200 output valid under
    its schema, deliberate 4xx only where expected, /health p99 under 100 ms while it runs,
    memory flat."""
    import gzip
    import statistics
    import time
    from pathlib import Path

    import jsonschema

    sample = {}
    with gzip.open(Path(__file__).parents[1] / "evals" / "jsonschemabench" / "sample.jsonl.gz", "rt") as f:
        for line in f:
            item = json.loads(line)
            if item["file"] in SOAK_SCHEMAS:
                sample[item["file"]] = item["schema"]
    schemas = [sample[f] for f in SOAK_SCHEMAS] + HANDMADE
    s = Server(long_model_dir, max_queue=512, max_batch=16, defaults=DecodeConfig(unmask="threshold", threshold=0.5))
    rss, health, ids, problems, answered = [], [], [], [], [0]
    lock = threading.Lock()
    stop = threading.Event()

    def poll_health():
        with httpx.Client(base_url=s.url, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                ok = c.get("/health").status_code == 200
                health.append(time.perf_counter() - t0 if ok else 99.0)
                time.sleep(0.05)

    rng = random.Random(1)
    plan = []
    for i in range(600):
        if i % 3 == 0:
            k = rng.randrange(len(schemas))
            plan.append(("schema", k, {"prompt": "json:", "max_tokens": rng.choice([48, 96]), "seed": i,
                                       "temperature": rng.choice([0.0, 1.0]),
                                       ("response_format" if i % 2 else "guided_json"):
                                           {"type": "json_schema", "json_schema": {"name": "x", "schema": schemas[k]}}
                                           if i % 2 else schemas[k]}))
        else:
            path, body, status, n_choices, stream = _request(rng, i)
            plan.append(("plain", (path, status, n_choices, stream), body))

    def one(k):
        kind, meta, body = plan[k]
        with httpx.Client(base_url=s.url, timeout=120) as c:
            if kind == "schema":
                r = c.post("/v1/completions", json=body)
                data = r.json()
                schema = schemas[meta]
                if r.status_code == 200:
                    ok = all(jsonschema.validators.validator_for(schema)(schema).is_valid(json.loads(ch["text"]))
                             for ch in data["choices"])
                else:  # the deliberate ones: no output fits max_tokens, or the final check refused it
                    ok = (r.status_code, data["error"]["code"]) in ((400, "constraint_unsatisfiable"),
                                                                    (422, "constraint_not_satisfied"))
                rid, got = data.get("id"), r.status_code
            else:
                path, status, n_choices, stream = meta
                if stream:
                    with c.stream("POST", path, json=body) as r:
                        lines = [line for line in r.iter_lines() if line]
                    ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                    rid = json.loads(lines[0][6:])["id"] if ok else None
                    got = r.status_code
                else:
                    r = c.post(path, json=body)
                    got, data = r.status_code, r.json()
                    ok = got == status and (("choices" in data and len(data["choices"]) == n_choices)
                                            if status == 200 else "error" in data)
                    rid = data.get("id")
        with lock:
            if got >= 500 or not ok:
                problems.append(f"{k}: {kind} -> {got}")
            if got == 200:
                answered[0] += 1
                ids.append(rid)
            if k % 100 == 0:
                rss.append(_rss(s))

    poller = threading.Thread(target=poll_health, daemon=True)
    try:
        poller.start()
        with ThreadPoolExecutor(32) as ex:
            list(ex.map(one, range(len(plan))))
        stop.set()
        poller.join(timeout=30)
        assert not problems, problems[:5]
        # every 200 carries its own id: none lost (each answered once), none duplicated
        assert None not in ids and len(set(ids)) == len(ids) == answered[0]
        plain_ok = sum(1 for k in range(len(plan)) if plan[k][0] == "plain" and plan[k][1][1] == 200)
        assert answered[0] >= plain_ok + 100  # and most schema requests succeeded too
        p99 = statistics.quantiles(health, n=100)[98]
        print(f"\nsoak: {answered[0]} answered 200 of {len(plan)}, /health p50 {statistics.median(health) * 1e3:.1f} "
              f"ms p99 {p99 * 1e3:.1f} ms max {max(health) * 1e3:.1f} ms over {len(health)} polls, rss "
              f"{[r // 2**20 for r in rss]} MiB")
        assert len(health) > 20 and p99 < 0.1, (p99, max(health), len(health))
        assert max(rss[2:]) - rss[2] < 64 * 2**20, [r // 2**20 for r in rss]
        assert s.app.state.engine.stats()["running"] == 0 and s.app.state.engine.stats()["queued"] == 0
    finally:
        stop.set()
        s.stop()
