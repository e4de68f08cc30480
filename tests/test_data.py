"""dlm.data: loading corpora, wrap / pad packing against slow references, the on-disk cache, errors.

    python -m pytest tests/test_data.py -q
"""

import json
import os
import random

import datasets
import pytest

import dlm.data as data
from dlm.data import (
    build_lm_dataset,
    load_text_dataset,
    resolve_spec,
    tokenize_and_chunk,
)
from dlm.errors import DLMError
from dlm.tokenizer import special_token_ids, train_tokenizer

datasets.disable_progress_bars()

WORDS = ("the cat sat on a mat while the dog ran in the park and a bird sang over the old red house "
         "near the river where children played").split()


def _docs(n, seed=0, max_words=40):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(_docs(300) + ["Ünïcödé 日本 🐈"], tmp_path_factory.mktemp("tok"), vocab_size=400)


def _write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": len(t)}) + "\n")
    return str(path)


def _encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------ loading
def test_load_txt_paragraphs(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first doc\nsecond line\n\nsecond doc\n\n\n\nthird doc\n\n \n", encoding="utf-8")
    ds = load_text_dataset(str(p))
    assert ds.column_names == ["text"]
    assert ds["text"][:] == ["first doc\nsecond line", "second doc", "third doc"]


def test_load_jsonl_json_parquet_csv(tmp_path):
    texts = ["alpha beta", "gamma", "", "delta epsilon"]
    want = [t for t in texts if t]
    _write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    ds = load_text_dataset(str(tmp_path / "a.jsonl"), text_field="body")
    assert ds.column_names == ["text"] and ds["text"][:] == want  # blank documents are dropped

    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    assert load_text_dataset(str(tmp_path / "b.json"))["text"][:] == want

    datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3, 4]}).to_parquet(str(tmp_path / "c.parquet"))
    ds = load_text_dataset(str(tmp_path / "c.parquet"))
    assert ds.column_names == ["text"] and ds["text"][:] == want

    datasets.Dataset.from_dict({"text": texts}).to_csv(str(tmp_path / "d.csv"), index=False)
    assert load_text_dataset(str(tmp_path / "d.csv"))["text"][:] == want


def test_load_compressed_jsonl(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped text"}) + "\n")
    assert load_text_dataset(str(tmp_path / "a.jsonl.gz"))["text"][:] == ["zipped text"]


def test_load_directory_splits_and_glob(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", ["train one", "train two"])
    _write_jsonl(d / "valid.jsonl", ["val one"])
    _write_jsonl(d / "tasks_train.jsonl", ["must not be mixed in"])  # not named after a split
    assert load_text_dataset(str(d))["text"][:] == ["train one", "train two"]
    assert load_text_dataset(str(d), "validation")["text"][:] == ["val one"]
    with pytest.raises(DLMError, match="no 'test' split.*available: train, validation"):
        load_text_dataset(str(d), "test")

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        _write_jsonl(shards / f"part{i}.jsonl", [f"shard {i}"])
    assert sorted(load_text_dataset(str(shards / "*.jsonl"))["text"][:]) == ["shard 0", "shard 1", "shard 2"]
    assert len(load_text_dataset(str(shards))) == 3  # no split names: all files are train
    with pytest.raises(DLMError, match="split"):
        load_text_dataset(str(shards / "*.jsonl"), "validation")


def test_default_corpus():
    corpus = pytest.importorskip("dlm.corpus")
    if not hasattr(corpus, "write_default_corpus"):
        pytest.skip("dlm.corpus.write_default_corpus not written yet")
    d = resolve_spec("default")
    assert os.path.isfile(os.path.join(d, "train.jsonl"))
    assert resolve_spec("default") == d and resolve_spec("x.txt") == "x.txt"
    ds = load_text_dataset("default", "validation")
    assert len(ds) > 0 and ds.column_names == ["text"]


# ------------------------------------------------------------------ packing
def _wrap_reference(tok, texts, seq_len):
    ids = special_token_ids(tok)
    stream = []
    for t in texts:
        stream += _encode(tok, t) + [ids["eos"]]
    body = seq_len - 2
    return [[ids["bos"]] + stream[k * body:(k + 1) * body] + [ids["eos"]] for k in range(len(stream) // body)]


@pytest.mark.parametrize("seq_len", [4, 7, 32, 300])
def test_wrap_matches_reference(tok, seq_len):
    # 2500 documents: several map batches, so rows that span batches are covered; some long documents.
    texts = _docs(2500, seed=seq_len) + [" ".join(WORDS * 10)] + _docs(20, seed=1)
    out = tokenize_and_chunk(datasets.Dataset.from_dict({"text": texts}), tok, seq_len, "wrap")
    ids = special_token_ids(tok)
    rows = out["input_ids"][:]
    assert all(len(r) == seq_len and r[0] == ids["bos"] and r[-1] == ids["eos"] for r in rows)
    assert all(m == [1] * seq_len for m in out["attention_mask"][:])
    assert rows == _wrap_reference(tok, texts, seq_len)


def test_wrap_parallel_equals_serial(tok):
    ds = datasets.Dataset.from_dict({"text": _docs(1500, seed=3)})
    serial = tokenize_and_chunk(ds, tok, 24, "wrap")
    parallel = tokenize_and_chunk(ds, tok, 24, "wrap", num_proc=2)
    assert parallel["input_ids"][:] == serial["input_ids"][:]


def test_wrap_too_little_text_gives_no_rows(tok):
    out = tokenize_and_chunk(datasets.Dataset.from_dict({"text": ["the cat"]}), tok, 64, "wrap")
    assert len(out) == 0 and out.column_names == ["input_ids", "attention_mask"]


def test_pad_mode(tok):
    ids = special_token_ids(tok)
    L = 12
    short = "the cat"
    n = len(_encode(tok, short))
    # Documents of exactly L - 2, L - 1 and many more tokens, built from single-token words.
    word = "cat"
    assert len(_encode(tok, " cat")) == 1
    fit = word + " cat" * (L - 3)
    over1 = word + " cat" * (L - 2)
    long = word + " cat" * 50
    assert [len(_encode(tok, t)) for t in (fit, over1)] == [L - 2, L - 1]
    out = tokenize_and_chunk(datasets.Dataset.from_dict({"text": [short, fit, over1, long]}), tok, L, "pad")
    rows, masks = out["input_ids"][:], out["attention_mask"][:]
    assert all(len(r) == L for r in rows) and all(len(m) == L for m in masks)

    assert rows[0] == [ids["bos"]] + _encode(tok, short) + [ids["eos"]] + [ids["pad"]] * (L - n - 2)
    assert masks[0] == [1] * (n + 2) + [0] * (L - n - 2)
    assert rows[1] == [ids["bos"]] + _encode(tok, fit) + [ids["eos"]] and masks[1] == [1] * L
    for r, text in ((rows[2], over1), (rows[3], long)):  # cut: BOS first, last token is text, no EOS
        assert r == [ids["bos"]] + _encode(tok, text)[: L - 1]
        assert ids["eos"] not in r and ids["pad"] not in r
    assert masks[3] == [1] * L


def test_sft_mode(tok):
    ids = special_token_ids(tok)
    L = 14
    prompt, text = "the cat sat", "the cat sat on a mat"
    p_ids, c_ids = _encode(tok, prompt), _encode(tok, text[len(prompt):])
    long_prompt = "the cat" * 20
    rows = {"text": [text, "a dog ran", long_prompt + " on", "on " * 30],
            "prompt": [prompt, "", long_prompt, "on "]}
    out = tokenize_and_chunk(datasets.Dataset.from_dict(rows), tok, L, "sft")
    got, masks = out["input_ids"][:], out["attention_mask"][:]
    assert len(got) == 3  # the long prompt leaves no room for a completion: dropped
    body = [ids["bos"]] + p_ids + c_ids + [ids["eos"]]
    assert got[0] == body + [ids["eos"]] * (L - len(body))  # EOS filler, never PAD
    assert masks[0] == [2] * (1 + len(p_ids)) + [1] * (L - 1 - len(p_ids))
    assert masks[1] == [2] + [1] * (L - 1)  # empty prompt: only BOS is given
    assert len(got[2]) == L and masks[2][:2] == [2, 2]  # too long: cut at seq_len
    with pytest.raises(DLMError, match="not a prefix"):
        tokenize_and_chunk(datasets.Dataset.from_dict({"text": ["a b"], "prompt": ["b"]}), tok, L, "sft")
    with pytest.raises(DLMError, match="prompt"):
        tokenize_and_chunk(datasets.Dataset.from_dict({"text": ["a b"]}), tok, L, "sft")


def test_sft_build_needs_prompt_field(tok, tmp_path):
    src = _write_jsonl(tmp_path / "c.jsonl", _docs(20))
    with pytest.raises(DLMError, match="'prompt' field"):
        build_lm_dataset(src, tok, 16, mode="sft", cache_dir=tmp_path / "cache")
    with open(tmp_path / "p.jsonl", "w", encoding="utf-8") as f:
        for d in _docs(20):
            f.write(json.dumps({"text": d, "prompt": d.split(" ")[0]}) + "\n")
    ds = build_lm_dataset(str(tmp_path / "p.jsonl"), tok, 48, mode="sft", cache_dir=tmp_path / "cache")
    assert len(ds) == 20 and all(m[1] == 2 for m in ds["attention_mask"][:])


def test_torch_format(tok):
    import torch

    out = tokenize_and_chunk(datasets.Dataset.from_dict({"text": _docs(50)}), tok, 16, "pad").with_format("torch")
    batch = out[0:4]
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].shape == (4, 16)


@pytest.mark.parametrize("seq_len, mode, match", [(3, "wrap", "seq-len"), (16, "stack", "mode")])
def test_packing_errors(tok, seq_len, mode, match):
    ds = datasets.Dataset.from_dict({"text": ["the cat"]})
    with pytest.raises(DLMError, match=match):
        tokenize_and_chunk(ds, tok, seq_len, mode)


# ------------------------------------------------------------------ cache
def test_build_cache_hit_and_miss(tok, tmp_path, monkeypatch):
    src = _write_jsonl(tmp_path / "c.jsonl", _docs(200))
    calls = []
    real = data.tokenize_and_chunk
    monkeypatch.setattr(data, "tokenize_and_chunk", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    cache = tmp_path / "cache"

    first = build_lm_dataset(src, tok, 16, cache_dir=cache)
    second = build_lm_dataset(src, tok, 16, cache_dir=cache)
    assert calls == [16]  # the second build was a cache hit
    assert second["input_ids"][:] == first["input_ids"][:]
    assert len(first) > 0 and first.format["type"] is None
    assert not [p for p in os.listdir(cache) if p.startswith(".tmp")]  # no temporary directory left

    build_lm_dataset(src, tok, 24, cache_dir=cache)  # another seq_len: miss
    build_lm_dataset(src, tok, 16, mode="pad", cache_dir=cache)  # another mode: miss
    assert calls == [16, 24, 16]
    _write_jsonl(tmp_path / "c.jsonl", _docs(210, seed=5))  # the data changed: miss
    os.utime(src, ns=(1, 1))
    changed = build_lm_dataset(src, tok, 16, cache_dir=cache)
    assert calls == [16, 24, 16, 16] and changed["input_ids"][:] != first["input_ids"][:]


def test_build_default_cache_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "dlmcache"))
    src = _write_jsonl(tmp_path / "c.jsonl", _docs(50))
    ds = build_lm_dataset(src, tok, 16, mode="pad")
    assert len(ds) == 50
    entries = os.listdir(tmp_path / "dlmcache" / "datasets")
    assert len(entries) == 1 and entries[0].startswith("c.jsonl-train-pad16-")


def test_build_no_rows(tok, tmp_path):
    src = _write_jsonl(tmp_path / "c.jsonl", ["the cat"])
    with pytest.raises(DLMError, match="no sequence"):
        build_lm_dataset(src, tok, 64, cache_dir=tmp_path / "cache")


def test_build_missing_split(tok, tmp_path):
    src = _write_jsonl(tmp_path / "c.jsonl", ["the cat"])
    with pytest.raises(DLMError, match="no 'validation' split"):
        build_lm_dataset(src, tok, 8, split="validation", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    with pytest.raises(DLMError, match="does not exist"):
        load_text_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DLMError, match="no data files match"):
        load_text_dataset(str(tmp_path / "*.jsonl"))


def test_empty_files(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DLMError, match="empty"):
        load_text_dataset(str(tmp_path / "e.txt"))
    (tmp_path / "blank.txt").write_text("\n\n   \n\n\n", encoding="utf-8")
    with pytest.raises(DLMError, match="empty"):
        load_text_dataset(str(tmp_path / "blank.txt"))
    _write_jsonl(tmp_path / "b.jsonl", ["", "  ", "\n"])
    with pytest.raises(DLMError, match="empty"):
        load_text_dataset(str(tmp_path / "b.jsonl"))


def test_non_utf8(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"caf\xc3\xa9 ok\n" + b"x" * 2_000_000 + b" na\xefve\n")  # bad byte past a read chunk
    with pytest.raises(DLMError, match=r"UTF-8 \(byte offset 2000012: b.\\xef.\).*iconv") as e:
        load_text_dataset(str(p))
    assert "latin.txt" in str(e.value)
    (tmp_path / "bom.jsonl").write_bytes(b"\xff\xfe{\x00}\x00")
    with pytest.raises(DLMError, match="byte offset 0"):
        load_text_dataset(str(tmp_path / "bom.jsonl"))
    (tmp_path / "cut.txt").write_bytes(b"ends mid character \xe6\x97")
    with pytest.raises(DLMError, match="byte offset 19"):
        load_text_dataset(str(tmp_path / "cut.txt"))


def test_missing_text_field(tmp_path):
    src = _write_jsonl(tmp_path / "c.jsonl", ["hello"], field="body")
    with pytest.raises(DLMError, match=r"no field 'text' \(columns: body, id\).*--text-field"):
        load_text_dataset(src)
    with pytest.raises(DLMError, match="not text"):
        load_text_dataset(src, text_field="id")


def test_malformed_json(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DLMError, match="could not read"):
        load_text_dataset(str(tmp_path / "bad.jsonl"))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "notes.md").write_text("# hi", encoding="utf-8")
    with pytest.raises(DLMError, match="unsupported"):
        load_text_dataset(str(tmp_path / "notes.md"))


def test_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DLMError, match="no-such-user-dlm/no-such-dataset"):
        load_text_dataset("no-such-user-dlm/no-such-dataset:cfg")


def test_embedded_corpus_subsets():
    import json as _json

    from dlm.data import resolve_spec

    for spec, want_task in (("default-tasks", True), ("default-text", False)):
        path = resolve_spec(spec)
        first = _json.loads(open(os.path.join(path, "train.jsonl")).readline())
        assert first["source"].startswith("task:") == want_task, (spec, first)
