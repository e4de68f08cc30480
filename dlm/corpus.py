"""The embedded default corpus: English text plus checkable tasks, built offline from CPython.

Two kinds of documents, no network and no downloads:

  natural  English prose that ships with every CPython: the pydoc help topics
           (`pydoc_data.topics`, the language reference rendered as text) and the docstrings of
           a fixed list of pure-Python stdlib modules, their public classes, functions and
           methods. Docstrings under 200 characters are skipped, long texts are split at
           paragraph boundaries into documents of at most 4000 characters, duplicates dropped.
           The exact text depends on the Python version (recorded in the manifest).
  tasks    short prompt/answer documents from dlm.tasks (add, sub, mul, copy, reverse, sort,
           lookup, json), e.g. "add: 23+58= 81"; see that module for the formats.

Output (in OUT_DIR):

  train.jsonl, validation.jsonl, test.jsonl            {"text": ..., "source": "natural" | "task:<name>"}
  tasks_train.jsonl, tasks_validation.jsonl, tasks_test.jsonl   {"task", "prompt", "answer"} for scoring
  manifest.json                                        parameters, counts, version

Natural documents go to a split by a stable hash of their text (about 90/5/5); task examples
are split by a hash of their prompt (see dlm.tasks), so nothing is shared between splits. Each
split is shuffled with random.Random(seed). Writing again with the same parameters is a no-op
(the manifest is compared); files are written atomically and the manifest last.

    python -m dlm.corpus OUT_DIR [--seed N] [--task-examples N] [--kinds natural,tasks]
    dlm corpus write OUT_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import os
import random
import sys
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

from dlm.errors import DLMError
from dlm.tasks import SPLITS, TASKS, generate_examples, get_task, split_of

# Bump when anything changes what write_default_corpus produces; it invalidates cached corpora.
CORPUS_VERSION = "dlm-corpus-2"
KINDS = ("natural", "tasks")
MAX_DOC_CHARS = 4000
MIN_DOCSTRING_CHARS = 200

# Pure-Python stdlib modules that import quickly with no side effects (no display, no network,
# no readline hooks, no deprecation warnings on 3.10-3.13). Missing ones are skipped.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bdb",
    "bisect", "bz2", "calendar", "cmd", "code", "codecs", "codeop", "collections", "colorsys",
    "compileall", "concurrent.futures", "configparser", "contextlib", "copy", "copyreg", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.charset",
    "email.generator", "email.header", "email.message", "email.parser", "email.policy",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
    "inspect", "io", "ipaddress", "json", "json.decoder", "json.encoder", "keyword", "linecache",
    "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes", "modulefinder",
    "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile",
    "pstats", "py_compile", "pyclbr", "queue", "quopri", "random", "re", "reprlib", "runpy",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "symtable", "sysconfig", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "tomllib",
    "trace", "traceback", "tracemalloc", "types", "typing", "unittest.case", "unittest.mock",
    "unittest.loader", "unittest.runner", "unittest.suite", "urllib.parse", "urllib.request",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax.handler", "xml.sax.saxutils", "xmlrpc.client", "zipfile",
    "zipimport", "zoneinfo",
)


# ------------------------------------------------------------------ natural text
def _split_long(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Split at paragraph boundaries (then lines, then hard) into pieces of at most `limit` chars."""
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    pieces: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= limit:
            pieces.append(para)
        else:  # a giant paragraph (a long grammar block): fall back to lines, then fixed cuts
            for line in para.split("\n"):
                pieces.extend(line[i:i + limit] for i in range(0, len(line), limit))
    docs, cur = [], ""
    for p in pieces:  # greedily pack consecutive pieces back together up to the limit
        joined = f"{cur}\n\n{p}" if cur else p
        if len(joined) <= limit:
            cur = joined
        else:
            docs.append(cur)
            cur = p
    docs.append(cur)
    return [d.strip() for d in docs if d.strip()]


def _public_objects(mod) -> Iterable[object]:
    """The module, then its public classes/functions defined there, with their public methods."""
    yield mod
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    # Only what is defined here (or in its C accelerator, e.g. heapq -> _heapq): re-exports are
    # skipped, and so are methods other libraries patch in (transformers adds Logger.warning_once),
    # which would make the corpus depend on what was imported before.
    home = (mod.__name__, "_" + mod.__name__.rsplit(".", 1)[-1])
    for name in sorted(set(names)):
        obj = getattr(mod, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or getattr(obj, "__module__", None) not in home:
            continue
        yield obj
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                meth = vars(obj)[attr]
                meth = getattr(meth, "__func__", meth)  # unwrap classmethod / staticmethod
                # C methods (method descriptors) have no __module__ and cannot be patched in.
                if not attr.startswith("_") and inspect.isroutine(meth) \
                        and getattr(meth, "__module__", None) in (*home, None):
                    yield meth


@functools.lru_cache(maxsize=1)
def _natural_docs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    sink = io.StringIO()
    # Some imports warn or print on some versions; the corpus must be silent and identical.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        for modname in sorted(STDLIB_MODULES):
            try:
                mod = importlib.import_module(modname)
            except Exception:  # absent on this version/platform (tomllib < 3.11, ...)
                continue
            for obj in _public_objects(mod):
                doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    texts.append(doc)
    seen: set[str] = set()
    docs = []
    for text in texts:
        for doc in _split_long(inspect.cleandoc(text)):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return tuple(docs)


def natural_text_documents() -> list[str]:
    """English documents from CPython's help topics and stdlib docstrings (deterministic order)."""
    return list(_natural_docs())


# ------------------------------------------------------------------ writing
def _atomic_write(path: Path, lines: Iterable[str]) -> None:
    # A unique sibling name (not mkstemp, whose 0600 mode would ignore the umask), then rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonl(records: Iterable[dict]) -> Iterable[str]:
    return (json.dumps(r, ensure_ascii=False) for r in records)


def _split_natural(docs: Sequence[str]) -> dict[str, list[str]]:
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for d in docs:
        by_split[split_of(d)].append(d)
    # With thousands of docs both held-out splits are full; guarantee it for tiny corpora too
    # by moving the train doc with the smallest digest (deterministic).
    for s in SPLITS[1:]:
        if not by_split[s] and len(by_split["train"]) > 1:
            d = min(by_split["train"], key=lambda x: hashlib.sha256(x.encode("utf-8")).hexdigest())
            by_split["train"].remove(d)
            by_split[s].append(d)
    return by_split


def _paths(out: Path, with_tasks: bool) -> dict[str, Path]:
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    if with_tasks:
        paths.update({f"tasks_{s}": out / f"tasks_{s}.jsonl" for s in SPLITS})
    return paths


def write_default_corpus(out_dir, seed: int = 0, kinds: Sequence[str] = KINDS, n_task_examples: int = 20000,
                         task_names: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Write the corpus to `out_dir` (cached by manifest); returns {split or "tasks_<split>": path}.

    Task examples: `n_task_examples` in train, n_task_examples // 20 (at least 200) in
    validation and in test.
    """
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = [k for k in KINDS if k in kinds] if set(kinds) <= set(KINDS) else None
    if not kinds:
        raise DLMError(f"corpus kinds must be a non-empty subset of {', '.join(KINDS)}")
    with_tasks = "tasks" in kinds
    names = list(TASKS) if task_names is None else [get_task(n).name for n in task_names]
    if with_tasks and (not names or n_task_examples < 1):
        raise DLMError("the tasks corpus needs at least one task and --task-examples >= 1; "
                       "or leave 'tasks' out of the kinds")
    n_held = max(200, n_task_examples // 20)
    params = {
        "version": CORPUS_VERSION, "seed": seed, "kinds": kinds,
        "n_task_examples": n_task_examples if with_tasks else 0,
        "task_names": names if with_tasks else [],
        # Docstrings change between Python versions, and so would the natural documents.
        "python": "%d.%d" % sys.version_info[:2],
    }
    out = Path(out_dir)
    paths = _paths(out, with_tasks)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if old.get("params") == params and all(p.is_file() for p in paths.values()):
            return paths
    out.mkdir(parents=True, exist_ok=True)
    # Drop the manifest first: if we crash half-way, the next call regenerates instead of trusting it.
    with contextlib.suppress(FileNotFoundError):
        manifest_path.unlink()

    natural = _split_natural(natural_text_documents()) if "natural" in kinds else {s: [] for s in SPLITS}
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        # "prompt": the given part of a document, for --pack sft (empty: all of it is to be generated).
        records = [{"text": d, "source": "natural", "prompt": ""} for d in natural[split]]
        if with_tasks:
            exs = generate_examples(names, n_task_examples if split == "train" else n_held, seed, split)
            records += [{"text": e.text, "source": f"task:{e.task}", "prompt": e.prompt} for e in exs]
            _atomic_write(paths[f"tasks_{split}"],
                          _jsonl({"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in exs))
        else:  # stale task files from an earlier run would contradict this corpus
            with contextlib.suppress(FileNotFoundError):
                (out / f"tasks_{split}.jsonl").unlink()
        random.Random(seed).shuffle(records)
        _atomic_write(paths[split], _jsonl(records))
        counts[split] = {"natural": len(natural[split]), "tasks": len(records) - len(natural[split])}

    manifest = {"params": params, "counts": counts, "files": {k: p.name for k, p in paths.items()}}
    _atomic_write(manifest_path, [json.dumps(manifest, indent=1)])
    return paths


def corpus_stats(out_dir) -> dict:
    """{split: {"documents", "characters", "sources": {source: {"documents", "characters"}}}}."""
    out = Path(out_dir)
    stats = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        if not path.is_file():
            raise DLMError(f"no corpus file {path}; write one with `python -m dlm.corpus {out}`")
        total = {"documents": 0, "characters": 0}
        sources: dict[str, dict[str, int]] = {}
        with path.open(encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                src = sources.setdefault(rec["source"], {"documents": 0, "characters": 0})
                for d in (total, src):
                    d["documents"] += 1
                    d["characters"] += len(rec["text"])
        stats[split] = {**total, "sources": dict(sorted(sources.items()))}
    return stats


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dlm.corpus", description="write the embedded default corpus")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-examples", type=int, default=20000, help="training examples of the checkable tasks")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of: natural,tasks")
    args = ap.parse_args(argv)
    try:
        paths = write_default_corpus(args.out_dir, seed=args.seed, kinds=args.kinds,
                                     n_task_examples=args.task_examples)
        stats = corpus_stats(args.out_dir)
    except DLMError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
    print(json.dumps({"paths": {k: str(v) for k, v in paths.items()}, "stats": stats}, indent=1))


if __name__ == "__main__":
    main()
