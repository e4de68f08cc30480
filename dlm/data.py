"""Corpora for training and evaluation: text in, fixed-length token sequences out, cached on disk.

Data flow (all through HF `datasets`, so large corpora stay memory-mapped on disk):

  spec ──resolve_spec──> local files or a hub name
       ──load_text_dataset──> Dataset{"text"}          one row per document, blank ones dropped
       ──tokenize_and_chunk──> Dataset{"input_ids", "attention_mask"}, every row seq_len long
  build_lm_dataset does all three and caches the result under $DLM_CACHE/datasets
  (default ~/.cache/dlm/datasets), keyed by the data files, split, field, seq_len, mode and
  tokenizer; a second call with the same inputs loads the cached copy.

A spec is one of
  default                      the embedded corpus (dlm.corpus), written once to $DLM_CACHE/corpus-default
  corpus.txt                   documents are paragraphs: text separated by a blank line
  corpus.jsonl / .json         one record per document, text in --text-field (default "text")
  corpus.parquet / .csv        one row per document, text in --text-field
  (each may be compressed: .gz, .bz2, .xz, .zst)
  a directory                  `{split}.*` or sharded `{split}-*.*` files per split (also under data/;
                               validation may be named valid / val / dev); if no file is named after
                               a split, all data files form the train split
  a glob ("shards/*.jsonl")    all matches form the train split
  name or name:config          a Hugging Face hub dataset, e.g. wikitext:wikitext-2-raw-v1 (only
                               when no local path of that name exists; needs network or HF cache)
A single file or a glob only has a train split: asking for another split is an error, which
the trainer answers by holding out part of the training data.

Packing modes, for seq_len = 8 (B = BOS, E = EOS, P = PAD, a1 a2 ... tokens of document a):

  wrap (MDLM-style; no padding, documents cut anywhere):
      stream  a1 a2 a3 E b1 b2 b3 b4 b5 E c1 c2 ...        every document followed by EOS
      rows    B a1 a2 a3 E b1 b2 E                         seq_len - 2 stream tokens each,
              B b3 b4 b5 E c1 c2 E                         framed by BOS ... EOS
      attention_mask all 1. The stream's tail that does not fill a row is dropped; nothing
      else is (chunks may span batches of documents).
  pad (one document per row):
      B a1 a2 a3 E P P P    mask 1 1 1 1 1 0 0 0
      B d1 d2 d3 d4 d5 d6 d7    a document too long is cut: BOS stays first, no EOS at the end
  sft (prompt / completion, LLaDA-style supervised fine-tuning; records need a "prompt" field
      that is a prefix of the text, possibly empty):
      B p1 p2 c1 c2 E E E    mask 2 2 2 1 1 1 1 1
      One document per row, filled with EOS to seq_len. attention_mask 2 marks given context
      (BOS and the prompt: attended, never noised or scored); the completion and all the EOS
      filler are noised and scored, so a diffusion model learns to end its answer and fill the
      rest of a canvas with EOS confidently (what makes threshold decoding fire there). Prompt
      and completion are tokenized separately, as at generation time. A row is cut at seq_len
      (no EOS then); one whose prompt leaves no room for a completion token is dropped.

Used by `dlm train --data SPEC [--split S] [--text-field F] [--pack wrap|pad|sft] [--seq-len N]`,
`dlm ppl` and `dlm tokenizer train`; in Python:

    from dlm.data import build_lm_dataset
    from dlm.tokenizer import load_tokenizer
    ds = build_lm_dataset("default", load_tokenizer("tok/"), 128, split="validation").with_format("torch")
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dlm.errors import DLMError, MissingSplitError

log = logging.getLogger(__name__)

# Bump when tokenize_and_chunk changes what it produces: it invalidates every cached dataset.
DATA_VERSION = "dlm-data-1"
MODES = ("wrap", "pad", "sft")
PROMPT_FIELD = "prompt"  # --pack sft: the record field holding the prompt (a prefix of the text)
# File suffix -> `datasets` builder.
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
            ".csv": "csv"}
COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
# "wikitext", "org/name", "name:config": what a hub dataset id looks like.
_HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")


def cache_root() -> Path:
    """dlm's cache directory: $DLM_CACHE, else ~/.cache/dlm."""
    return Path(os.environ.get("DLM_CACHE") or Path.home() / ".cache" / "dlm").expanduser()


def resolve_spec(spec: str) -> str:
    """Map the special specs "default" (text + tasks), "default-text" (text only) and
    "default-tasks" (checkable tasks only) to the embedded corpus's directory (written on first use)."""
    if spec == "default":
        from dlm.corpus import write_default_corpus

        out = cache_root() / "corpus-default"
        write_default_corpus(out)
        return str(out)
    if spec in ("default-text", "default-tasks"):  # the embedded corpus's English only / tasks only
        from dlm.corpus import write_default_corpus

        out = cache_root() / f"corpus-{spec}"
        write_default_corpus(out, kinds=["natural"] if spec == "default-text" else ["tasks"])
        return str(out)
    return spec


# ------------------------------------------------------------------ where the text comes from
@dataclass(frozen=True)
class _Local:
    builder: str  # a `datasets` packaged builder: text, json, parquet, csv
    files: tuple[str, ...]


@dataclass(frozen=True)
class _Hub:
    name: str
    config: Optional[str]


def _suffixes(path) -> tuple[str, str]:
    """("corpus.jsonl.gz") -> (".jsonl", ".gz"); unknown data suffixes give ""."""
    name = os.path.basename(str(path)).lower()
    comp = next((c for c in COMPRESSION if name.endswith(c)), "")
    ext = os.path.splitext(name[: len(name) - len(comp)])[1]
    return (ext if ext in BUILDERS else ""), comp


def _stem(path) -> str:
    name = os.path.basename(str(path)).lower()
    ext, comp = _suffixes(name)
    return name[: len(name) - len(ext) - len(comp)]


def _split_names(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split.lower(),))


def _files_of_split(files: list[str], split: str) -> list[str]:
    names = _split_names(split)
    return [f for f in files if any(_stem(f) == n or _stem(f).startswith(n + "-") for n in names)]


def _data_files_in_dir(path: Path) -> list[str]:
    return sorted(str(f) for d in (path, path / "data") if d.is_dir() for f in d.iterdir()
                  if f.is_file() and _suffixes(f)[0])


def _pick_split(spec: str, by_split: dict[str, list[str]], split: str) -> _Local:
    files = by_split.get(split)
    if not files:
        raise MissingSplitError(f"{spec} has no {split!r} split (available: {', '.join(by_split) or 'none'}); "
                       f"pass --split with one of those, or add a {split} file")
    builders = {BUILDERS[_suffixes(f)[0]] for f in files}
    if len(builders) > 1:
        raise DLMError(f"the {split} files of {spec} mix formats ({', '.join(sorted(builders))}); "
                       "convert them to one format")
    return _Local(builders.pop(), tuple(files))


def _resolve_source(spec: str, split: str):
    """A resolved spec -> _Local (the files of `split`) or _Hub; DLMError if neither."""
    kinds = "a .txt/.jsonl/.json/.parquet/.csv file, a directory of them, a glob, a hub dataset name, 'default' or 'default-text'"
    if any(c in spec for c in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True)
                       if os.path.isfile(f) and _suffixes(f)[0])
        if not files:
            raise DLMError(f"no data files match {spec}; check the pattern (pass {kinds})")
        return _pick_split(spec, {"train": files}, split)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _data_files_in_dir(path)
        if not files:
            raise DLMError(f"no data files (.txt, .jsonl, .json, .parquet, .csv) in directory {spec}; "
                           "add some or pass a file")
        by_split = {s: fs for s in SPLIT_ALIASES if (fs := _files_of_split(files, s))}
        if not by_split:  # no file is named after a split: it is all training data
            by_split = {"train": files}
        elif split not in by_split and (custom := _files_of_split(files, split)):
            by_split[split] = custom  # a split name of the user's own, e.g. "eval.jsonl"
        return _pick_split(spec, by_split, split)
    if path.is_file():
        if not _suffixes(path)[0]:
            raise DLMError(f"unsupported data file type {path.name}; use .txt, .jsonl, .json, .parquet or .csv "
                           "(rename plain text to .txt)")
        return _pick_split(spec, {"train": [str(path)]}, split)
    if path.exists():
        raise DLMError(f"{spec} is neither a file nor a directory; pass {kinds}")
    if _HUB_SPEC.match(spec) and not _suffixes(spec)[0]:
        name, _, config = spec.partition(":")
        return _Hub(name, config or None)
    raise DLMError(f"data path {spec} does not exist; pass {kinds}")


# ------------------------------------------------------------------ loading text
def _check_utf8(path: str) -> None:
    """DLMError naming the file and byte offset of the first invalid UTF-8 sequence."""
    comp = _suffixes(path)[1]
    opener = COMPRESSION[comp] if comp else open
    if opener is None:  # .zst: no stdlib decompressor; `datasets` reports decode errors itself
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0  # bytes of the (decompressed) file read so far
    with opener(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = decoder.getstate()[0]  # an incomplete character held from the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                offset = pos - len(pending) + e.start
                bad = (pending + chunk)[e.start:e.end]
                raise DLMError(f"{path} is not valid UTF-8 (byte offset {offset}: {bad!r}); re-encode it, e.g. "
                               f"`iconv -f LATIN1 -t UTF-8 {path} > fixed{_suffixes(path)[0]}`") from None
            if not chunk:
                return
            pos += len(chunk)


def _check_files(files: tuple[str, ...], builder: str) -> None:
    for f in files:
        if os.path.getsize(f) == 0:
            raise DLMError(f"data file {f} is empty; give a file with text or remove it")
        if builder != "parquet":
            _check_utf8(f)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_local(src: _Local, spec: str):
    import datasets

    _check_files(src.files, src.builder)
    # .txt: one document per paragraph (blank-line separated), not per line, so documents keep
    # their line structure and EOS falls between paragraphs.
    kwargs = {"sample_by": "paragraph"} if src.builder == "text" else {}
    try:
        return datasets.load_dataset(src.builder, data_files={"train": list(src.files)}, split="train", **kwargs)
    except Exception as e:  # malformed JSON / parquet / csv: `datasets` raises many different types
        where = src.files[0] if len(src.files) == 1 else f"the {len(src.files)} files of {spec}"
        raise DLMError(f"could not read {where} as {src.builder} ({_first_line(e)}); check the file "
                       "is well-formed and its extension matches its format") from None


def _load_hub(src: _Hub, spec: str, split: str):
    import datasets

    try:
        splits = datasets.load_dataset(src.name, src.config)
    except Exception as e:  # offline, unknown name, missing config: one fix for all
        raise DLMError(f"could not load dataset {spec!r} from the Hugging Face hub ({_first_line(e)}); check the "
                       "name (name:config for a configuration) and the network, or pass a local file or "
                       "directory") from None
    if split not in splits:
        raise MissingSplitError(f"hub dataset {spec} has no {split!r} split (available: {', '.join(splits)}); "
                       "pass --split with one of those")
    return splits[split]


def _strip_newlines(batch):
    # Paragraph splitting leaves the newlines of 3+ blank-line runs at the edges of documents.
    return {"text": [t.strip("\n") for t in batch["text"]]}


def _not_blank(batch):
    return [bool(t) and not t.isspace() for t in batch["text"]]


def _text_column(ds, spec: str, split: str, field: str, from_txt: bool, with_prompt: bool = False):
    """Keep `field` only, renamed to "text", without blank documents (and "prompt" when `with_prompt`)."""
    import datasets

    if field not in ds.column_names:
        raise DLMError(f"{spec} has no field {field!r} (columns: {', '.join(ds.column_names)}); "
                       "pass --text-field with the one that holds the text")
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DLMError(f"field {field!r} of {spec} holds {feature}, not text; pass --text-field naming a text "
                       f"column (columns: {', '.join(ds.column_names)})")
    n_rows = len(ds)
    if with_prompt:
        if from_txt or PROMPT_FIELD not in ds.column_names:
            raise DLMError(f"--pack sft needs records with a {PROMPT_FIELD!r} field (the prompt, a prefix of the "
                           f"text) beside {field!r}; {spec} has {', '.join(ds.column_names)}")
        ds = ds.select_columns([field, PROMPT_FIELD])
    else:
        ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if from_txt:
        ds = ds.map(_strip_newlines, batched=True, desc="stripping")
    ds = ds.filter(_not_blank, batched=True, desc="dropping blank documents")
    if len(ds) == 0:
        what = f"all {n_rows} documents are blank" if n_rows else "it has no rows"
        raise DLMError(f"the {split} split of {spec} is empty ({what} in field {field!r}); give data with text "
                       "or check --text-field")
    return ds


def _load_text(spec: str, src, split: str, text_field: str, with_prompt: bool = False):
    if isinstance(src, _Hub):
        return _text_column(_load_hub(src, spec, split), spec, split, text_field, False, with_prompt)
    from_txt = src.builder == "text"
    # The text builder always names its column "text"; --text-field only applies to records.
    return _text_column(_load_local(src, spec), spec, split, "text" if from_txt else text_field, from_txt,
                        with_prompt)


def load_text_dataset(spec: str, split: str = "train", text_field: str = "text", with_prompt: bool = False):
    """Load `split` of `spec` (see the module docstring) as a datasets.Dataset with one column "text".

    .txt files are read with the `datasets` "text" builder, sample_by="paragraph": a document
    is a run of lines ended by a blank line. Blank documents are dropped everywhere. Raises
    DLMError for a missing path, empty data, non-UTF-8 files, a missing text field or split.
    """
    resolved = resolve_spec(spec)
    return _load_text(spec, _resolve_source(resolved, split), split, text_field, with_prompt)


# ------------------------------------------------------------------ tokenizing and packing
def _check_packing(seq_len: int, mode: str) -> None:
    if mode not in MODES:
        raise DLMError(f"unknown packing mode {mode!r}; use --pack wrap, pad or sft")
    if not isinstance(seq_len, int) or seq_len < 4:
        raise DLMError(f"--seq-len {seq_len} is too short: a sequence needs BOS, EOS and text; use at least 4")


def _fingerprint(*parts) -> str:
    # Explicit fingerprints: `datasets` cannot hash the tokenizer-holding callables reliably.
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


def _cache_file(cache_dir, stage: str, fingerprint: str) -> dict:
    if cache_dir is None:
        return {}
    os.makedirs(cache_dir, exist_ok=True)
    return {"cache_file_name": os.path.join(str(cache_dir), f"{stage}-{fingerprint}.arrow")}


class _Tokenize:
    """Batched map: text -> token ids, no special tokens, no truncation."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        # A private copy: a hub tokenizer.json may enable truncation/padding, which would cut documents.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()

    def __call__(self, batch):
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # no offsets: faster
        if PROMPT_FIELD not in batch:
            return {"ids": [e.ids for e in encode(batch["text"], add_special_tokens=False)]}
        prompts, completions = [], []
        for text, prompt in zip(batch["text"], batch[PROMPT_FIELD]):
            prompt = prompt or ""
            if not text.startswith(prompt):
                raise DLMError(f"--pack sft: the prompt {prompt[:60]!r} is not a prefix of its text {text[:60]!r}")
            prompts.append(prompt)
            completions.append(text[len(prompt):])
        return {"pids": [e.ids for e in encode(prompts, add_special_tokens=False)],
                "ids": [e.ids for e in encode(completions, add_special_tokens=False)]}


class _WrapChunks:
    """Batched map over tokenized documents (with indices): the wrap-mode rows that start in this batch.

    Row k holds stream tokens [k * body, (k + 1) * body) of the global stream (documents each
    followed by EOS). `offsets[i]` is where document i starts in that stream, so each batch
    knows its rows without seeing the others; a row that runs past the batch's last document
    reads the following documents from `source`.
    """

    def __init__(self, source, offsets, seq_len: int, bos: int, eos: int):
        self.source, self.offsets = source, offsets
        self.body, self.seq_len, self.bos, self.eos = seq_len - 2, seq_len, bos, eos
        self.n_rows = int(offsets[-1]) // self.body

    def __call__(self, batch, indices):
        body = self.body
        lo, hi = int(self.offsets[indices[0]]), int(self.offsets[indices[-1] + 1])
        k0, k1 = -(-lo // body), min(-(-hi // body), self.n_rows)  # rows whose first token is in [lo, hi)
        if k0 >= k1:
            return {"input_ids": [], "attention_mask": []}
        stream: list[int] = []
        for ids in batch["ids"]:
            stream.extend(ids)
            stream.append(self.eos)
        j = indices[-1] + 1
        while lo + len(stream) < k1 * body:
            stream.extend(self.source[j]["ids"])
            stream.append(self.eos)
            j += 1
        rows = [[self.bos] + stream[k * body - lo:(k + 1) * body - lo] + [self.eos] for k in range(k0, k1)]
        return {"input_ids": rows, "attention_mask": [[1] * self.seq_len] * len(rows)}


class _PadRows:
    """Batched map: one row per document, BOS + doc + EOS cut to seq_len, then PAD."""

    def __init__(self, seq_len: int, bos: int, eos: int, pad: int):
        self.seq_len, self.bos, self.eos, self.pad = seq_len, bos, eos, pad

    def __call__(self, batch):
        L = self.seq_len
        input_ids, mask = [], []
        for ids in batch["ids"]:
            seq = ([self.bos] + ids[: L - 1] + [self.eos])[:L]
            n = len(seq)
            input_ids.append(seq + [self.pad] * (L - n))
            mask.append([1] * n + [0] * (L - n))
        return {"input_ids": input_ids, "attention_mask": mask}


class _SFTRows:
    """Batched map: BOS + prompt (mask 2) + completion + EOS, filled with EOS to seq_len (mask 1)."""

    def __init__(self, seq_len: int, bos: int, eos: int):
        self.seq_len, self.bos, self.eos = seq_len, bos, eos

    def __call__(self, batch):
        L = self.seq_len
        input_ids, mask = [], []
        for pids, ids in zip(batch["pids"], batch["ids"]):
            given = 1 + len(pids)
            if given >= L:  # no room for a completion token
                continue
            seq = ([self.bos] + pids + ids + [self.eos])[:L]
            input_ids.append(seq + [self.eos] * (L - len(seq)))
            mask.append([2] * given + [1] * (L - given))
        return {"input_ids": input_ids, "attention_mask": mask}


def tokenize_and_chunk(ds, tokenizer, seq_len: int, mode: str = "wrap", num_proc: Optional[int] = None,
                       cache_dir=None):
    """Dataset{"text"} -> Dataset{"input_ids" (int64), "attention_mask" (int8)}, rows of exactly seq_len.

    mode "wrap", "pad" or "sft" (see the module docstring; sft needs a "prompt" column). `cache_dir`: where the intermediate
    arrow files go (default: `datasets`' own choice, beside the source or in memory).
    """
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Features, List, Value

    from dlm.tokenizer import special_token_ids, tokenizer_fingerprint

    _check_packing(seq_len, mode)
    if "text" not in ds.column_names:
        raise DLMError(f"the dataset has no 'text' column (columns: {', '.join(ds.column_names)}); "
                       "load it with dlm.data.load_text_dataset")
    sp = special_token_ids(tokenizer)
    parent = getattr(ds, "_fingerprint", None) or uuid.uuid4().hex
    if mode == "sft" and PROMPT_FIELD not in ds.column_names:
        raise DLMError(f"--pack sft needs a {PROMPT_FIELD!r} column; load with load_text_dataset(..., with_prompt=True)")
    if mode != "sft" and PROMPT_FIELD in ds.column_names:
        ds = ds.remove_columns([PROMPT_FIELD])
    fp_tok = _fingerprint(DATA_VERSION, parent, "tokenize", tokenizer_fingerprint(tokenizer), mode == "sft")
    tok_features = {"ids": List(Value("int32"))}
    if mode == "sft":
        tok_features["pids"] = List(Value("int32"))
    tokenized = ds.map(
        _Tokenize(tokenizer), batched=True, remove_columns=ds.column_names, num_proc=num_proc,
        features=Features(tok_features), new_fingerprint=fp_tok, desc="tokenizing",
        **_cache_file(cache_dir, "tokenized", fp_tok),
    )
    out_features = Features({"input_ids": List(Value("int64"), length=seq_len),
                             "attention_mask": List(Value("int8"), length=seq_len)})
    fp_out = _fingerprint(fp_tok, mode, seq_len, sp)
    common = dict(batched=True, remove_columns=list(tok_features), num_proc=num_proc, features=out_features,
                  new_fingerprint=fp_out, **_cache_file(cache_dir, mode, fp_out))
    if mode == "sft":
        return tokenized.map(_SFTRows(seq_len, sp["bos"], sp["eos"]), desc="sft rows", **common)
    if mode == "pad":
        return tokenized.map(_PadRows(seq_len, sp["bos"], sp["eos"], sp["pad"]), desc="padding", **common)
    # Document start offsets in the global stream (each document + its EOS), from arrow lengths.
    lengths = pc.list_value_length(tokenized.data.table.column("ids")).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths.astype(np.int64) + 1, out=offsets[1:])
    chunker = _WrapChunks(tokenized, offsets, seq_len, sp["bos"], sp["eos"])
    return tokenized.map(chunker, with_indices=True, desc="packing", **common)


# ------------------------------------------------------------------ the cached pipeline
def _cache_key(src, split: str, text_field: str, seq_len: int, mode: str, tokenizer) -> str:
    from dlm.tokenizer import tokenizer_fingerprint

    if isinstance(src, _Local):
        stats = [os.stat(f) for f in src.files]
        where = {"builder": src.builder,
                 "files": [[os.path.abspath(f), s.st_size, s.st_mtime_ns] for f, s in zip(src.files, stats)]}
    else:  # a hub dataset is keyed by name only: a new hub revision needs DLM_CACHE cleared
        where = {"hub": src.name, "config": src.config}
    material = {"version": DATA_VERSION, "source": where, "split": split, "text_field": text_field,
                "seq_len": seq_len, "mode": mode, "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _slug(spec: str) -> str:
    base = os.path.basename(spec.rstrip("/\\")) or spec
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40] or "data"


def build_lm_dataset(spec: str, tokenizer, seq_len: int, split: str = "train", mode: str = "wrap",
                     text_field: str = "text", cache_dir=None, num_proc: Optional[int] = None):
    """load_text_dataset + tokenize_and_chunk, cached on disk; returns a plain (unformatted) Dataset.

    The cache entry lives in `cache_dir` (default $DLM_CACHE/datasets, i.e. ~/.cache/dlm/datasets),
    named after the spec, split, mode and seq_len plus a hash of everything that affects the
    result. It is written to a temporary directory and renamed into place, so concurrent
    builders (several ranks) never see half an entry. DLMError if no row results.
    """
    import datasets

    _check_packing(seq_len, mode)
    src = _resolve_source(resolve_spec(spec), split)
    key = _cache_key(src, split, text_field, seq_len, mode, tokenizer)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "datasets"
    final = root / f"{_slug(spec)}-{split}-{mode}{seq_len}-{key[:16]}"
    if (final / "state.json").is_file():
        try:
            return datasets.load_from_disk(str(final))
        except Exception as e:  # a damaged entry (disk full, manual edits): build it again
            log.warning("rebuilding damaged dataset cache %s (%s)", final, _first_line(e))
            shutil.rmtree(final, ignore_errors=True)

    texts = _load_text(spec, src, split, text_field, with_prompt=mode == "sft")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DLMError(f"cannot create the dataset cache {root} ({e.strerror}); set DLM_CACHE to a writable "
                       "directory") from None
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        lm = tokenize_and_chunk(texts, tokenizer, seq_len, mode, num_proc=num_proc, cache_dir=tmp / "work")
        if len(lm) == 0:
            raise DLMError(f"the {split} split of {spec} yields no sequence of {seq_len} tokens (too little text "
                           f"for --pack {mode}); give more text or a smaller --seq-len")
        lm.save_to_disk(str(tmp / "final"))
        del lm
        try:
            os.rename(tmp / "final", final)
        except OSError:
            if not (final / "state.json").is_file():  # not merely another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s (%s, %s, seq_len %d) at %s", spec, split, mode, seq_len, final)
    return datasets.load_from_disk(str(final))
