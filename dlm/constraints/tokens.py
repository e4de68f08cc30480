"""The bytes each token id stands for: what the automata and grammars are built over.

Handles byte-level BPE (GPT-2 style, as dlm's own tokenizers) and SentencePiece (U+2581 for a
space, <0xNN> byte fallback). Special tokens (and ids the tokenizer lacks) stand for nothing.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, vocab_size: int) -> list[Optional[bytes]]:
    """The bytes of every token id below vocab_size (None: special tokens and missing ids)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in str(decoder or "")
    table = _byte_decoder()
    out: list[Optional[bytes]] = [None] * vocab_size
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            continue
        if byte_level and all(ch in table for ch in piece):
            out[i] = bytes(table[ch] for ch in piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out[i] = bytes([int(piece[3:5], 16)])
        else:
            out[i] = piece.replace("\u2581", " ").encode("utf-8")
        if out[i] == b"":
            out[i] = None
    return out


def detokenize(table: Sequence[Optional[bytes]], tokens: Sequence[int], eos_id: int) -> str:
    """The text of `tokens` (cut at EOS) from a token_bytes table; invalid UTF-8 is replaced."""
    out = bytearray()
    for t in tokens:
        if t == eos_id:
            break
        b = table[t] if 0 <= t < len(table) else None
        if b:
            out += b
    return out.decode("utf-8", errors="replace")
