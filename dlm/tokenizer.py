"""Tokenizers for masked diffusion LMs: train a byte-level BPE, or load any HF tokenizer.

A masked (absorbing-state) diffusion LM needs four special roles:

  BOS   <|bos|>    first token of every training sequence (given, never predicted)
  EOS   <|eos|>    ends documents and sequences; generation stops at it
  PAD   <|pad|>    fills `pad`-mode sequences (attention_mask 0, never scored)
  MASK  <|mask|>   the absorbing state the forward process corrupts tokens into

`train_tokenizer` builds a byte-level BPE with HF `tokenizers` (the GPT-2 recipe: any text
round-trips, no unknown tokens) and saves it as a `transformers` tokenizer directory, so
`AutoTokenizer.from_pretrained(dir)` loads it. `load_tokenizer` loads any HF tokenizer (a directory
or a hub name such as "gpt2") and adds whichever of the four roles it lacks.

Encoding never adds special tokens: `tok.encode(text)` returns just the text's tokens, and the
data pipeline (dlm.data) places BOS / EOS / PAD itself.

    dlm tokenizer train --data default --vocab-size 4096 --out tok/
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

from dlm.errors import DLMError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK)  # ids 0..3 in a tokenizer trained here
ROLES = ("bos", "eos", "pad", "mask")

# Tokenizers do not know the model's context length; the model config enforces it.
MODEL_MAX_LENGTH = 1_000_000_000

# "gpt2", "org/name": what a Hugging Face hub id looks like (no path separators beyond one "/").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    # tokenizers trains much faster on lists of strings than on single strings.
    batch: list[str] = []
    for t in texts:
        if t:
            batch.append(t)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE on `texts`, save it to `out_dir`, return it (a PreTrainedTokenizerFast).

    The 256 byte symbols are always in the vocabulary, so every string encodes and
    `decode(encode(s)) == s`. The special tokens get ids 0..3 (BOS, EOS, PAD, MASK).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise DLMError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least {n_min}")
    if min_frequency < 1:
        raise DLMError(f"--min-frequency {min_frequency} must be at least 1")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # Adds no tokens; only keeps character offsets exact (the GPT-2 setting).
    bpe.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    n_docs = [0]

    def counted():
        for b in _batches(texts):
            n_docs[0] += len(b)
            yield b

    bpe.train_from_iterator(counted(), trainer=trainer)
    if n_docs[0] == 0:
        raise DLMError("no text to train the tokenizer on (all documents are empty); check --data and --text-field")

    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".json", ".txt", ".model"))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer directory, a tokenizer.json file or a hub name; add missing special roles.

    Roles the tokenizer lacks are filled in: MASK and PAD are added as new special tokens
    (`<|mask|>`, `<|pad|>`), EOS as `<|eos|>`; a missing BOS reuses EOS, as GPT-2 does (its
    single `<|endoftext|>` serves as both), so BOS and EOS may share an id. New tokens get ids
    after the existing vocabulary: a model trained with another tokenizer needs its
    embeddings resized (`model_vocab_size` gives the padded size for a fresh model).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = str(name_or_path)
    path = Path(name).expanduser()
    fix = "pass a tokenizer directory or hub name, or train one with `dlm tokenizer train --data ... --out DIR`"
    if path.is_dir():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                    "tokenizer.model")):
            raise DLMError(f"no tokenizer files in {path}; {fix}")
        source, where = str(path), str(path)
    elif path.is_file():
        if path.suffix != ".json":
            raise DLMError(f"{path} is not a tokenizer directory or tokenizer.json file; {fix}")
        source, where = str(path), str(path)
    elif _looks_like_hub_id(name):
        source, where = name, f"{name!r} (no such local path; tried the Hugging Face hub)"
    else:
        raise DLMError(f"tokenizer path {name} does not exist; {fix}")
    try:
        if path.is_file():  # a bare tokenizers serialization
            tok = PreTrainedTokenizerFast(tokenizer_file=source, model_max_length=MODEL_MAX_LENGTH)
        else:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # offline, unknown repo, corrupt files, unknown class: the same fix for all
        text = str(e).strip()
        raise DLMError(f"could not load tokenizer {where}: {text.splitlines()[0] if text else type(e).__name__}; "
                       f"{fix}") from None
    if not getattr(tok, "is_fast", False):
        raise DLMError(f"tokenizer {name} has no fast (tokenizers-backed) version, which dlm needs; "
                       "use one with a tokenizer.json, or train one with `dlm tokenizer train`")
    _add_missing_roles(tok)
    return tok


def _add_missing_roles(tok) -> None:
    missing = {}
    if tok.mask_token is None:
        missing["mask_token"] = MASK
    if tok.eos_token is None:
        missing["eos_token"] = EOS
    if tok.pad_token is None:
        missing["pad_token"] = PAD
    if missing:
        tok.add_special_tokens(missing)
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token  # GPT-2 style: one token both starts and ends text


def check_tokenizer(tok) -> None:
    """Raise DLMError unless BOS, EOS, PAD and MASK all exist and MASK is a token of its own."""
    ids = {r: getattr(tok, f"{r}_token_id", None) for r in ROLES}
    missing = [r for r, i in ids.items() if i is None]
    if missing:
        raise DLMError(f"the tokenizer has no {', '.join(r.upper() for r in missing)} token; load it with "
                       "dlm.tokenizer.load_tokenizer (which adds them) or train one with `dlm tokenizer train`")
    # The model must tell "masked" apart from every real token, or denoising is ambiguous.
    clash = [r for r in ("bos", "eos", "pad") if ids[r] == ids["mask"]]
    if clash:
        raise DLMError(f"the tokenizer's MASK token is also its {'/'.join(r.upper() for r in clash)} token; "
                       f"give it a separate mask token (e.g. tok.add_special_tokens({{'mask_token': '{MASK}'}}))")


def special_token_ids(tok) -> dict[str, int]:
    """{"bos", "eos", "pad", "mask"} -> token id (DLMError if a role is missing). A published
    model's tokenizer carries its model's ids (`use_model_ids`): they win over the tokenizer's."""
    given = getattr(tok, "dlm_special_ids", None)
    if given is not None:
        return dict(given)
    check_tokenizer(tok)
    return {r: int(getattr(tok, f"{r}_token_id")) for r in ROLES}


def use_model_ids(tok, config):
    """Attach a model config's BOS / EOS / PAD / MASK ids to a published model's tokenizer (the
    data pipeline's roles; BOS falls back to EOS and PAD to EOS, as for Qwen tokenizers)."""
    eos = config.eos_token_id
    tok.dlm_special_ids = {"bos": config.bos_token_id if config.bos_token_id is not None else eos, "eos": eos,
                           "pad": config.pad_token_id if config.pad_token_id is not None else eos,
                           "mask": config.mask_token_id}
    if any(v is None for v in tok.dlm_special_ids.values()):
        raise DLMError(f"the model config lacks special ids ({tok.dlm_special_ids}); dlm needs EOS and MASK")
    return tok


def check_tokenizer_for_model(tok, config, where: str = "the model", roles: bool = True) -> None:
    """Raise DLMError unless `tok` is usable with a model config: every token has an embedding and
    (`roles`: dlm's own models) the BOS/EOS/PAD/MASK ids are the ones the model was trained with.
    A published model's tokenizer is taken as it is: its special ids are the model config's."""
    fix = "use the tokenizer saved with the model (drop --tokenizer)"
    if len(tok) > config.vocab_size:
        raise DLMError(f"the tokenizer has {len(tok)} tokens but {where} has only {config.vocab_size} embeddings; {fix}")
    if not roles:
        return
    check_tokenizer(tok)
    for role in ROLES:
        want = getattr(config, f"{role}_token_id", None)
        got = getattr(tok, f"{role}_token_id")
        if want is not None and int(want) != int(got):
            raise DLMError(f"the tokenizer's {role.upper()} id is {got} but {where} uses {want}; {fix}")


def model_vocab_size(tok, multiple: int = 64) -> int:
    """Embedding rows for a model using `tok`: len(tok) rounded up to a multiple (for fast matmuls)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return -(-len(tok) // multiple) * multiple


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the full tokenizer definition plus the special-role ids; keys cached datasets."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8"))
    ids = getattr(tok, "dlm_special_ids", None) or {r: getattr(tok, f"{r}_token_id", None) for r in ROLES}
    h.update(json.dumps(ids, sort_keys=True).encode("utf-8"))
    return h.hexdigest()
