"""dlm.corpus: the embedded natural documents and the written train/validation/test files."""

import json
import re

import pytest

import dlm.corpus as corpus
from dlm.corpus import corpus_stats, main, natural_text_documents, write_default_corpus
from dlm.errors import DLMError
from dlm.tasks import SPLITS, TASKS, split_of

SMALL = 400  # task examples in train; validation/test get the minimum of 200 each


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, write_default_corpus(out, seed=0, n_task_examples=SMALL)


def test_natural_documents(capsys):
    docs = natural_text_documents()
    assert capsys.readouterr() == ("", "")  # prints nothing
    assert len(docs) > 500
    assert sum(map(len, docs)) > 500_000
    assert len(set(docs)) == len(docs)
    assert all(0 < len(d) <= corpus.MAX_DOC_CHARS and d == d.strip() for d in docs)
    assert docs == natural_text_documents()  # deterministic (and a fresh list each call)
    text = "".join(docs)
    assert sum(c.isascii() for c in text) / len(text) > 0.99
    words = re.findall(r"[a-z]+", text.lower())
    assert words.count("the") / len(words) > 0.02  # English prose, not code or noise
    assert any(d.startswith('The "assert" statement') for d in docs)  # pydoc help topics
    assert any("JSON" in d for d in docs)  # stdlib docstrings


def test_split_long_respects_paragraphs():
    paras = [("word " * 150).strip() for _ in range(10)]  # 10 paragraphs of 749 chars
    pieces = corpus._split_long("\n\n".join(paras), limit=2000)
    assert all(len(p) <= 2000 for p in pieces)
    assert "\n\n".join(pieces) == "\n\n".join(paras)
    assert all(len(p) <= 100 for p in corpus._split_long("x" * 1000, limit=100))


def test_files_and_sources(written):
    out, paths = written
    assert set(paths) == {*SPLITS, *(f"tasks_{s}" for s in SPLITS)}
    for split in SPLITS:
        recs = _read(paths[split])
        sources = {r["source"] for r in recs}
        assert sources == {"natural", *(f"task:{t}" for t in TASKS)}
        n_tasks = sum(r["source"] != "natural" for r in recs)
        assert n_tasks == (SMALL if split == "train" else 200)
        tasks = _read(paths[f"tasks_{split}"])
        assert len(tasks) == n_tasks
        # the scoring file holds exactly the task documents of the text file
        assert sorted(t["prompt"] + t["answer"] for t in tasks) == \
            sorted(r["text"] for r in recs if r["source"] != "natural")
        assert set(tasks[0]) == {"task", "prompt", "answer"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["version"] == corpus.CORPUS_VERSION
    assert manifest["counts"]["validation"]["natural"] > 0 and manifest["counts"]["test"]["natural"] > 0


def test_splits_are_disjoint(written):
    _, paths = written
    texts = {s: {r["text"] for r in _read(paths[s])} for s in SPLITS}
    prompts = {s: {t["prompt"] for t in _read(paths[f"tasks_{s}"])} for s in SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not texts[a] & texts[b]
        assert not prompts[a] & prompts[b]
    for s in SPLITS:
        assert all(split_of(p) == s for p in prompts[s])
    # natural documents are all there, each in exactly one split
    natural = [r["text"] for s in SPLITS for r in _read(paths[s]) if r["source"] == "natural"]
    assert sorted(natural) == sorted(natural_text_documents())


def test_split_is_shuffled(written):
    _, paths = written
    sources = [r["source"] for r in _read(paths["train"])]
    assert sources[:50].count("natural") < 50 and len(set(sources[:50])) > 3


def test_determinism(written, tmp_path):
    out, paths = written
    same = write_default_corpus(tmp_path / "same", seed=0, n_task_examples=SMALL)
    for key in paths:
        assert paths[key].read_bytes() == same[key].read_bytes()
    other = write_default_corpus(tmp_path / "other", seed=1, n_task_examples=SMALL)
    assert other["tasks_train"].read_bytes() != paths["tasks_train"].read_bytes()
    assert other["train"].read_bytes() != paths["train"].read_bytes()


def test_manifest_caching(tmp_path, monkeypatch):
    out = tmp_path / "c"
    first = write_default_corpus(out, seed=3, n_task_examples=SMALL)
    before = {k: p.stat().st_mtime_ns for k, p in first.items()}

    def boom():
        raise AssertionError("regenerated although the manifest matched")

    monkeypatch.setattr(corpus, "natural_text_documents", boom)
    again = write_default_corpus(out, seed=3, n_task_examples=SMALL)
    assert again == first and {k: p.stat().st_mtime_ns for k, p in again.items()} == before
    # different parameters, or a missing file: regenerate
    with pytest.raises(AssertionError, match="regenerated"):
        write_default_corpus(out, seed=4, n_task_examples=SMALL)
    with pytest.raises(AssertionError, match="regenerated"):
        write_default_corpus(out, seed=3, n_task_examples=SMALL + 1)
    assert not (out / "manifest.json").exists()  # an interrupted rewrite is not trusted later
    monkeypatch.undo()
    write_default_corpus(out, seed=3, n_task_examples=SMALL)
    first["test"].unlink()
    monkeypatch.setattr(corpus, "natural_text_documents", boom)
    with pytest.raises(AssertionError, match="regenerated"):
        write_default_corpus(out, seed=3, n_task_examples=SMALL)
    monkeypatch.undo()
    assert write_default_corpus(out, seed=3, n_task_examples=SMALL)["test"].is_file()
    assert not list(out.glob(".*.tmp"))  # no temp files left behind


def test_kinds(tmp_path):
    paths = write_default_corpus(tmp_path / "t", kinds=("tasks",), n_task_examples=SMALL, task_names=["add", "json"])
    assert set(paths) == {*SPLITS, *(f"tasks_{s}" for s in SPLITS)}
    assert {r["source"] for r in _read(paths["train"])} == {"task:add", "task:json"}
    paths = write_default_corpus(tmp_path / "t", kinds=("natural",))
    assert set(paths) == set(SPLITS)
    assert not list((tmp_path / "t").glob("tasks_*.jsonl"))  # stale task files removed
    assert {r["source"] for r in _read(paths["validation"])} == {"natural"}
    with pytest.raises(DLMError, match="kinds"):
        write_default_corpus(tmp_path / "x", kinds=("natural", "web"))
    with pytest.raises(DLMError, match="unknown task"):
        write_default_corpus(tmp_path / "x", task_names=["add", "divide"])
    with pytest.raises(DLMError, match="task-examples"):
        write_default_corpus(tmp_path / "x", n_task_examples=0)


def test_corpus_stats(written, tmp_path):
    out, paths = written
    stats = corpus_stats(out)
    for split in SPLITS:
        recs = _read(paths[split])
        assert stats[split]["documents"] == len(recs)
        assert stats[split]["characters"] == sum(len(r["text"]) for r in recs)
        assert sum(v["documents"] for v in stats[split]["sources"].values()) == len(recs)
    with pytest.raises(DLMError, match="no corpus file"):
        corpus_stats(tmp_path / "missing")


def test_cli_main(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "2", "--task-examples", "300", "--kinds", "tasks"])
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["train"]["documents"] == 300
    assert set(report["paths"]) >= set(SPLITS)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cli"), "--kinds", "web"])
