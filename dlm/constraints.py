"""Grammar-constrained decoding for masked diffusion: regex, JSON Schema, choices, Lark grammars.

Left-to-right token masking (what grammar engines do for autoregressive models) breaks when a
diffusion decoder commits tokens in parallel and out of order, so this module constrains the
*whole canvas* at every step:

* Regular constraints (regex, JSON Schema, choices) compile to an explicit token DFA
  (outlines-core). At each step a Viterbi dynamic program over the answer region (DINGO) treats
  a [MASK] slot as "exactly one unknown token" and picks the highest-scoring assignment for the
  positions the unmask policy commits, with a budget-aware end condition: the state reached must
  accept within the positions left (EOS and anything after it are free), so a finished output
  is always in the language, not just a valid prefix. It is vectorised over states and tokens
  over states and tokens (numpy arrays): no Python loop over the vocabulary.
* Context-free constraints (Lark grammars, and schemas too large for a DFA) run through
  llguidance. The chooser keeps a *witness*, a concrete valid completion of the current canvas
  with one token per masked slot; a token the policy wants is committed only when some witness
  contains it (certified), and when nothing can be certified the witness's own token is
  committed, so decoding never stalls and the result is always in the language.

Compile results are cached per (constraint, tokenizer) by `ConstraintCompiler`.

    compiler = ConstraintCompiler(tokenizer, model.config.vocab_size)
    c = compiler.compile(Constraint.json_schema({"type": "object", ...}))
    Decoder(model).generate([prompt_ids], config, constraints=[c])
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from dlm.errors import DLMError

KINDS = ("regex", "json", "choice", "grammar")
DEFAULT_WHITESPACE = r"[ ]?"  # between JSON tokens: compact output, a small DFA
MAX_DENSE_ENTRIES = 16_000_000  # (states x vocab) above this: use the witness engine instead (128 MB)


# ------------------------------------------------------------------ the user's constraint
@dataclass(frozen=True)
class Constraint:
    """What the output must match. `spec` is the regex, the JSON Schema as canonical JSON text
    ("" for any JSON object), the JSON list of choices, or the Lark grammar."""

    kind: str
    spec: str

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise DLMError("a regex constraint needs a non-empty pattern string")
        try:
            re.compile(pattern)
        except re.error as e:
            raise DLMError(f"invalid regex {pattern!r}: {e}") from None
        return cls("regex", pattern)

    @classmethod
    def json_schema(cls, schema=None) -> "Constraint":
        """A JSON Schema (dict or JSON text); None or {} means any JSON object."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise DLMError(f"the JSON schema is not valid JSON: {e}") from None
        if schema in (None, {}):
            return cls("json", "")
        if not isinstance(schema, dict):
            raise DLMError(f"a JSON schema must be an object, got {type(schema).__name__}")
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise DLMError(f"invalid JSON schema: {e.message}") from None
        return cls("json", json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, choices: Sequence[str]) -> "Constraint":
        if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise DLMError("a choice constraint needs a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def grammar(cls, lark: str) -> "Constraint":
        if not isinstance(lark, str) or not lark.strip():
            raise DLMError("a grammar constraint needs a Lark grammar text")
        return cls("grammar", lark)

    @property
    def schema(self) -> Optional[dict]:
        return json.loads(self.spec) if self.kind == "json" and self.spec else None

    def regex_source(self) -> str:
        """The regular expression a regular constraint compiles from."""
        if self.kind == "regex":
            return self.spec
        if self.kind == "choice":
            return "(" + "|".join(_escape(c) for c in json.loads(self.spec)) + ")"
        if self.kind == "json":
            from outlines_core.json_schema import build_regex_from_schema

            schema = self.schema if self.spec else {"type": "object"}
            schema = _small_ranges_as_enums(schema)
            unenforced = sorted(_keywords(schema) & REGEX_UNENFORCED)
            if unenforced:  # outlines-core would silently ignore them: not a guarantee
                raise _NotRegular(f"keywords {', '.join(unenforced)}")
            try:
                return build_regex_from_schema(json.dumps(schema), DEFAULT_WHITESPACE)
            except Exception as e:  # outlines-core: ValueError for unsupported keywords / types
                raise DLMError(f"unsupported JSON schema: {e}") from None
        raise DLMError(f"{self.kind} constraints are not regular")

    def describe(self) -> str:
        text = self.spec if len(self.spec) < 60 else self.spec[:57] + "..."
        return f"{self.kind} {text!r}" if self.spec else "any JSON object"


# JSON Schema keywords outlines-core's regex translation does not enforce; schemas using them
# (after small integer ranges become enums) go to llguidance, which enforces them or says which
# keyword it cannot handle.
REGEX_UNENFORCED = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
                    "minProperties", "maxProperties", "contains", "minContains", "maxContains", "patternProperties",
                    "propertyNames", "dependentRequired", "dependentSchemas", "if", "then", "else", "not",
                    "unevaluatedProperties", "unevaluatedItems"}
MAX_ENUM_RANGE = 1000


class _NotRegular(Exception):
    pass


def _keywords(node) -> set:
    """Every keyword used anywhere in a schema (property names excluded)."""
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(k)
            if k in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
                for sub in (v.values() if isinstance(v, dict) else []):
                    out |= _keywords(sub)
            elif k not in ("enum", "const", "required", "examples", "default"):
                out |= _keywords(v)
    elif isinstance(node, list):
        for v in node:
            out |= _keywords(v)
    return out


def _small_ranges_as_enums(node):
    """{"type": "integer", "minimum": a, "maximum": b} with b - a <= MAX_ENUM_RANGE -> an enum, which
    the token DFA enforces exactly (outlines-core ignores numeric bounds)."""
    if isinstance(node, list):
        return [_small_ranges_as_enums(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: (v if k in ("enum", "const", "required", "examples", "default") else _small_ranges_as_enums(v))
            for k, v in node.items()}
    if node.get("type") == "integer" and not {"multipleOf"} & set(node):
        lo = node.get("minimum", node["exclusiveMinimum"] + 1 if isinstance(node.get("exclusiveMinimum"), int) else None)
        hi = node.get("maximum", node["exclusiveMaximum"] - 1 if isinstance(node.get("exclusiveMaximum"), int) else None)
        if isinstance(lo, int) and isinstance(hi, int) and 0 <= hi - lo <= MAX_ENUM_RANGE:
            rest = {k: v for k, v in node.items() if k not in ("type", "minimum", "maximum", "exclusiveMinimum",
                                                                  "exclusiveMaximum")}
            return {**rest, "enum": list(range(lo, hi + 1))}
    return node


def _escape(text: str) -> str:
    """Escape a literal for the Rust regex dialect (Python's re.escape escapes spaces, Rust rejects that)."""
    return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$#&-~" else ch for ch in text)


# ------------------------------------------------------------------ tokenizer bytes
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
    """The bytes each token id stands for (None: special tokens and ids the tokenizer lacks).
    Handles byte-level BPE (GPT-2 style) and SentencePiece (U+2581 for space, <0xNN> byte fallback)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    byte_level = "ByteLevel" in type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__ \
        or "ByteLevel" in str(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
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


# ------------------------------------------------------------------ regular: the token DFA
PREPARED_RUN = 32  # reachability over runs of open slots up to this length is built at compile time


class _TokenClasses(NamedTuple):
    table: np.ndarray  # (S, C) next state per class
    live: np.ndarray  # (S, C) not DEAD
    cls_of: np.ndarray  # (V,) each token's class
    order: np.ndarray  # (V,) tokens grouped by class, ascending ids inside a class
    sorted_cls: np.ndarray  # (V,) cls_of[order]
    starts: np.ndarray  # (C,) where each class begins in `order`


class TokenDFA:
    """A dense token-level DFA with two extra states: DEAD (no valid continuation) and DONE
    (after EOS: every token is allowed, it is cut from the output).

    table (S, V) int64: next state; accepting (S,) bool; dist (S,) int64: fewest tokens to an
    accepting state or DONE (a large number when none is reachable)."""

    def __init__(self, transitions: dict[int, dict[int, int]], initial: int, finals: Sequence[int],
                 vocab_size: int, eos_id: int):
        states = sorted(set(transitions) | {s for m in transitions.values() for s in m.values()} | {initial} | set(finals))
        index = {s: i for i, s in enumerate(states)}
        S = len(states) + 2
        self.dead, self.done = S - 2, S - 1
        if S * vocab_size > MAX_DENSE_ENTRIES:
            raise DLMError(f"the constraint's automaton is too large for a dense table ({S} states x "
                           f"{vocab_size} tokens)")
        table = torch.full((S, vocab_size), self.dead, dtype=torch.int64)
        src, tok, dst = [], [], []
        for s, m in transitions.items():
            for t, n in m.items():
                if t != eos_id and 0 <= t < vocab_size:
                    src.append(index[s])
                    tok.append(t)
                    dst.append(index[n])
        if src:
            table[torch.tensor(src), torch.tensor(tok)] = torch.tensor(dst)
        accepting = torch.zeros(S, dtype=torch.bool)
        for f in finals:
            accepting[index[f]] = True
        table[accepting, eos_id] = self.done
        table[self.done] = self.done
        accepting[self.done] = True
        self.table, self.accepting, self.initial = table, accepting, index[initial]
        self.vocab_size, self.eos_id, self.num_states = vocab_size, eos_id, S
        # one-token reachability as a unique edge list (src -> dst), for [MASK] slots
        live = table != self.dead
        s_idx, t_idx = live.nonzero(as_tuple=True)
        pairs = torch.unique(s_idx * S + table[s_idx, t_idx])
        self.edge_src, self.edge_dst = pairs // S, pairs % S
        self.dist = self._distances()
        self._memo_d: dict = {}
        self._memo_cap = max(256, 1_000_000 // S)  # about 2 MB of sets per automaton
        # what every decoding step uses, built now (compile time) rather than on a first request
        self._np()
        self._classes()
        self._pow(PREPARED_RUN)

    def _distances(self) -> torch.Tensor:
        S = self.num_states
        big = torch.iinfo(torch.int64).max // 4
        dist = torch.full((S,), big, dtype=torch.int64)
        dist[self.accepting] = 0
        frontier = self.accepting.clone()
        d = 0
        while bool(frontier.any()):
            d += 1
            reach = torch.zeros(S, dtype=torch.bool)
            reach[self.edge_src[frontier[self.edge_dst]]] = True
            frontier = reach & (dist == big)
            dist[frontier] = d
        dist[self.dead] = big
        return dist

    def accepts(self, tokens: Sequence[int]) -> bool:
        return bool(self.accepting[self.walk(self.initial, tokens)])

    # ---------------------------------------------------------- per-step computations
    # numpy: these run once or twice per decoding step over a few dozen slots, where torch's
    # per-call overhead (microseconds per op) would dominate; all work is over states x tokens
    # arrays, never a Python loop over the vocabulary.
    def _np(self):
        if getattr(self, "_np_cache", None) is None:
            t = self.table.numpy().astype(np.int32)
            live = t != self.dead
            succ = np.zeros((self.num_states, self.num_states), dtype=bool)
            succ[self.edge_src.numpy(), self.edge_dst.numpy()] = True
            self._np_cache = (t, live, succ, self.dist.numpy())
        return self._np_cache

    def _classes(self) -> "_TokenClasses":
        """Token classes: tokens whose table columns are equal (the same next state from every
        state) are interchangeable for the automaton, and real constraints have few classes (a
        JSON schema over a 2,048-token vocabulary: 4 to 81), so per-step work is over states x
        classes and expands to the vocabulary at the end."""
        if getattr(self, "_cls_cache", None) is None:
            t = self._np()[0]
            cols = np.ascontiguousarray(t.T).view(np.dtype((np.void, t.shape[0] * t.itemsize)))[:, 0]
            _, first, cls_of = np.unique(cols, return_index=True, return_inverse=True)
            ctable, cls_of = t[:, first], cls_of.reshape(-1)
            order = np.argsort(cls_of, kind="stable")
            sorted_cls = cls_of[order]
            self._cls_cache = _TokenClasses(np.ascontiguousarray(ctable), ctable != self.dead, cls_of, order,
                                            sorted_cls, np.searchsorted(sorted_cls, np.arange(ctable.shape[1])))
        return self._cls_cache

    def _class_best(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each class's best token under scores v (the lowest id among ties) and its score, as
        (token ids ascending, scores), classes where every token is forbidden left out: the DP's
        candidates, exact for the whole vocabulary."""
        k = self._classes()
        vs = v[k.order]
        best = np.maximum.reduceat(vs, k.starts)
        hit = np.flatnonzero(vs == best[k.sorted_cls])  # positions achieving their class's max
        _, first = np.unique(k.sorted_cls[hit], return_index=True)
        toks = k.order[hit[first]]  # ids ascend inside a class: the first hit is the lowest
        keep = np.isfinite(best)
        toks, best = toks[keep], best[keep]
        srt = np.argsort(toks)
        return toks[srt], best[srt]

    def _pow(self, m: int) -> Optional[np.ndarray]:
        """(S, S) bool: some m tokens lead from s to s' (m >= 1), memoised; None for large automata,
        where the per-slot steps are cheaper than the S^3 products."""
        if self.num_states > 512:
            return None
        pows = getattr(self, "_pows", None)
        if pows is None:
            succ = self._np()[2]
            pows = self._pows = [None, succ]
        while len(pows) <= m:
            # torch, not numpy's BLAS: its worker threads keep spinning after a product and slow
            # the model's next forward passes (measured: 40% slower right after a compile)
            step = torch.from_numpy(pows[1]).float()
            pows.append((torch.from_numpy(pows[-1]).float() @ step > 0).numpy())
        return pows[m]

    def _runs(self, slots: Sequence[int], mask_id: int, keep: frozenset = frozenset()) -> list[tuple[int, int]]:
        """Split slot indices into (start, length) pieces: runs of masked slots not in `keep`
        (handled in one step with _pow) and single slots."""
        out, i, n = [], 0, len(slots)
        while i < n:
            j = i
            while j < n and slots[j] == mask_id and j not in keep:
                j += 1
            if j - i >= 2 and self._pow(j - i) is not None:
                out.append((i, j - i))
                i = j
            else:
                out.append((i, 1))
                i += 1
        return out

    def walk(self, state: int, tokens: Sequence[int]) -> int:
        t = self._np()[0]
        for tok in tokens:
            state = int(t[state, tok])
        return state

    # State sets travel as the bytes of (S,) bool arrays, and every step on them is memoised per
    # automaton: decoding steps of a request (and requests with the same constraint) revisit the
    # same sets, and a dict lookup on bytes (their hash is cached) costs a fraction of a numpy call.
    def _memo(self) -> dict:
        memo = self._memo_d
        if len(memo) >= self._memo_cap:
            memo.clear()  # bounded memory; entries are only ever recomputed
        return memo

    @staticmethod
    def _set(b: bytes) -> np.ndarray:
        return np.frombuffer(b, dtype=bool)

    def _fwb(self, fb: bytes, tok: int, mask_id: int, m: int = 1) -> bytes:
        """States after one slot (a token, or m open slots) from the set fb."""
        memo = self._memo()
        key = (0, fb, -m if tok == mask_id else tok)
        n = memo.get(key)
        if n is None:
            f = self._set(fb)
            if tok == mask_id:
                a = (self._pow(m) if m > 1 else self._np()[2])[f].any(0)
            else:
                a = np.zeros_like(f)
                a[self._np()[0][f, tok]] = True
            a[self.dead] = False
            n = memo[key] = a.tobytes()
        return n

    def _bwb(self, gb: bytes, tok: int, mask_id: int, m: int = 1) -> bytes:
        """States from which one slot (a token, or m open slots) leads into the set gb."""
        memo = self._memo()
        key = (1, gb, -m if tok == mask_id else tok)
        n = memo.get(key)
        if n is None:
            g = self._set(gb)
            if tok == mask_id:
                a = (self._pow(m) if m > 1 else self._np()[2])[:, g].any(1)
            else:
                a = g[self._np()[0][:, tok]]
            a[self.dead] = False
            n = memo[key] = a.tobytes()
        return n

    def _rowb(self, fb: bytes, gb: bytes) -> np.ndarray:
        """(C,) the token classes that lead some state of fb into gb."""
        memo = self._memo()
        key = (2, fb, gb)
        n = memo.get(key)
        if n is None:
            k = self._classes()
            n = memo[key] = self._set(gb)[k.table[self._set(fb)]].any(0)
        return n

    def _single(self, state: int) -> bytes:
        f = np.zeros(self.num_states, dtype=bool)
        f[state] = True
        return f.tobytes()

    def _reach_b(self, state: int, slots: Sequence[int], mask_id: int) -> list[bytes]:
        sets = [self._single(state)]
        for tok in slots:
            sets.append(self._fwb(sets[-1], tok, mask_id))
        return sets

    def _coreach_b(self, slots: Sequence[int], mask_id: int, left_after: int) -> list[bytes]:
        sets = [(self._np()[3] <= left_after).tobytes()]
        for tok in reversed(slots):
            sets.append(self._bwb(sets[-1], tok, mask_id))
        return sets[::-1]

    def reachable(self, state: int, slots: Sequence[int], mask_id: int) -> list[np.ndarray]:
        """Forward state sets: sets[i] = states possible before slot i (len(slots) + 1 sets)."""
        return [self._set(b) for b in self._reach_b(state, slots, mask_id)]

    def coreachable(self, slots: Sequence[int], mask_id: int, left_after: int) -> list[np.ndarray]:
        """Backward sets: sets[i] = states before slot i from which slots i.. and `left_after`
        more free positions can end accepted."""
        return [self._set(b) for b in self._coreach_b(slots, mask_id, left_after)]

    def allowed(self, state: int, slots: Sequence[int], mask_id: int, left_after: int,
                query: Sequence[int]) -> torch.Tensor:
        """(len(query), V) bool: tokens that slot query[j] (masked) can take in some valid
        completion of the whole canvas (each slot on its own)."""
        rows = self.allowed_classes(state, slots, mask_id, left_after, query)
        return torch.from_numpy(np.take(rows, self._classes().cls_of, axis=1))

    def allowed_classes(self, state: int, slots: Sequence[int], mask_id: int, left_after: int,
                        query: Sequence[int], sets=None) -> np.ndarray:
        """`allowed` over token classes: (len(query), C) bool. `sets`: state_sets(...), if known."""
        if not query:
            return np.zeros((0, self._classes().table.shape[1]), dtype=bool)
        fw, bw = sets if sets is not None else self.state_sets(state, slots, mask_id, left_after)
        return np.stack([self._rowb(fw[i], bw[i + 1]) for i in query])

    def best_assignment(self, state: int, slots: Sequence[int], mask_id: int, left_after: int,
                        scores: dict[int, torch.Tensor], sets=None) -> Optional[dict[int, int]]:
        """DINGO's dynamic program. `slots` are the canvas tokens from `state` on (MASK: unknown);
        slots whose index is in `scores` are committed now and take the tokens maximising the sum
        of their scores (V-vectors, -inf = forbidden); other masked slots stay masked (any one
        token); `left_after` free positions follow. Returns {slot: token}, or None if impossible.
        `sets`: state_sets(state, slots, mask_id, left_after) when the caller already has them.

        Exact. First, each committed slot's own best token: when those are jointly completable
        their sum bounds every assignment, so they are the answer. Else the DP, over token
        classes: tokens with equal table columns lead to the same states, so only each class's
        best token can be in an optimal assignment (ties: the lowest id, as over the vocabulary).
        Both run over the committed slots' span only: the slots before it give a set of start
        states (the score does not depend on them), the slots after it a set of states from which
        the rest can be completed."""
        if not scores:
            return {} if self._feasible(state, slots, mask_id, left_after) else None
        sc = {i: s.double().numpy() for i, s in scores.items()}
        lo, hi = min(sc), max(sc) + 1
        if sets is not None:
            start, end_ok = sets[0][lo], sets[1][hi]
        else:
            start = self._forward_b(self._single(state), slots[:lo], mask_id)
            end_ok = self._backward_b(slots[hi:], mask_id, left_after)
        # each slot's own best token, if jointly valid, is optimal: its sum bounds every other
        greedy = {i: int(v.argmax()) for i, v in sc.items()}
        if all(np.isfinite(sc[i][t]) for i, t in greedy.items()):
            f = self._forward_b(start, [greedy.get(i, slots[i]) for i in range(lo, hi)], mask_id)
            if bool((self._set(f) & self._set(end_ok)).any()):
                return greedy
        got = self._viterbi(self._set(start), slots[lo:hi], mask_id, self._set(end_ok),
                            {i - lo: self._class_best(v) for i, v in sc.items()})
        return None if got is None else {i + lo: t for i, t in got[0].items()}

    def state_sets(self, state: int, slots: Sequence[int], mask_id: int, left_after: int):
        """The forward and backward state sets of a canvas (reachable / coreachable, in an
        internal form), for allowed_classes and best_assignment on that same canvas."""
        return self._reach_b(state, slots, mask_id), self._coreach_b(slots, mask_id, left_after)

    def _forward_b(self, fb: bytes, slots: Sequence[int], mask_id: int) -> bytes:
        """States after slots (MASK = any one token) from the set fb, mask runs in one step each."""
        for i, m in self._runs(slots, mask_id):
            fb = self._fwb(fb, slots[i], mask_id, m)
        return fb

    def _backward_b(self, slots: Sequence[int], mask_id: int, left_after: int) -> bytes:
        """States from which slots and then `left_after` free positions can end accepted."""
        gb = (self._np()[3] <= left_after).tobytes()
        for i, m in reversed(self._runs(slots, mask_id)):
            gb = self._bwb(gb, slots[i], mask_id, m)
        return gb

    def _feasible(self, state: int, slots: Sequence[int], mask_id: int, left_after: int) -> bool:
        """Can slots (MASK = any one token) be completed validly from `state`?"""
        f = self._set(self._forward_b(self._single(state), slots, mask_id))
        return bool((f & (self._np()[3] <= left_after)).any())

    def _viterbi(self, start: np.ndarray, slots, mask_id, end_ok: np.ndarray,
                 cands) -> Optional[tuple[dict[int, int], float]]:
        """The DP itself, from the states `start` through slots into the states `end_ok`; cands:
        committed slot -> (token ids, their scores). Returns (choice, score)."""
        t, _, succ, _ = self._np()
        S, ninf = self.num_states, -np.inf
        w = np.where(start, 0.0, ninf)
        before: list[np.ndarray] = []
        back: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> (best src, best token) per dst
        runs = self._runs(slots, mask_id, frozenset(cands))
        for i, m in runs:
            tok = slots[i]
            before.append(w)
            on = np.flatnonzero(np.isfinite(w))
            nw = np.full(S, ninf)
            if m > 1:  # a run of m open slots: max over states m tokens back
                if on.size:
                    nw = np.where(self._pow(m)[on], w[on, None], ninf).max(0)
            elif i in cands:
                toks, vals = cands[i]
                src, tk = np.full(S, -1), np.full(S, -1)
                dst = t[np.ix_(on, toks)].ravel()  # (k, K) flattened: from on[a // K] by toks[a % K]
                cand = (w[on, None] + vals[None, :]).ravel()
                ok = np.flatnonzero((dst != self.dead) & np.isfinite(cand))
                if ok.size:
                    # per destination the best score; ties: the lowest flat index
                    o = ok[np.lexsort((ok, -cand[ok], dst[ok]))]
                    first = o[np.r_[True, dst[o][1:] != dst[o][:-1]]]
                    nw[dst[first]] = cand[first]
                    src[dst[first]] = on[first // len(toks)]
                    tk[dst[first]] = toks[first % len(toks)]
                back[i] = (src, tk)
            elif tok == mask_id:
                if on.size:
                    nw = np.where(succ[on], w[on, None], ninf).max(0)
            else:
                np.maximum.at(nw, t[on, tok], w[on])
            nw[self.dead] = ninf
            w = nw
        final = np.where(end_ok, w, ninf)
        if not np.isfinite(final).any():
            return None
        q = int(final.argmax())
        total = float(final[q])
        choice: dict[int, int] = {}
        for r in range(len(runs) - 1, -1, -1):
            i, m = runs[r]
            if i in back:
                src, tk = back[i]
                q, choice[i] = int(src[q]), int(tk[q])
                continue
            if m > 1:
                into_q = self._pow(m)[:, q]
            else:
                into_q = succ[:, q] if slots[i] == mask_id else t[:, slots[i]] == q
            q = int(np.where(into_q, before[r], ninf).argmax())
        return choice, total


# ------------------------------------------------------------------ context-free: witnesses
class GrammarEngine:
    """A Lark grammar (or a schema too large for a DFA) through llguidance's matcher."""

    def __init__(self, grammar: str, lltok, vocab_size: int, eos_id: int, describe: str):
        from llguidance import LLMatcher

        self.grammar, self.lltok, self.vocab_size, self.eos_id = grammar, lltok, vocab_size, eos_id
        m = LLMatcher(lltok, grammar, log_level=0)
        if m.is_error():
            raise DLMError(f"the constraint ({describe}) does not compile: {m.get_error()}")
        self._root = m

    def matcher(self):
        return self._root.deep_copy()

    def allowed(self, m) -> torch.Tensor:
        import numpy as np

        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.size)
        out[:n] = torch.from_numpy(bits[:n].astype(bool))
        out[self.eos_id] = False  # EOS is decided by is_accepting()
        return out

    def _closers(self, m, allowed: torch.Tensor, rank: Optional[torch.Tensor], limit: int = 64) -> list[int]:
        """Allowed tokens after which the grammar accepts (the best-ranked `limit` checked)."""
        ids = allowed.nonzero(as_tuple=True)[0]
        if rank is not None and ids.numel() > limit:
            ids = ids[rank.double()[ids].topk(limit).indices]
        elif ids.numel() > limit:
            ids = ids[:limit]
        out = []
        for t in ids.tolist():
            if m.consume_token(t):
                if m.is_accepting():
                    out.append(t)
                m.rollback(1)
        return out

    def accepts(self, tokens: Sequence[int]) -> bool:
        m = self.matcher()
        for t in tokens:
            if t == self.eos_id:
                break
            if m.validate_tokens([t]) != 1 or not m.consume_token(t):
                return False
        return m.is_accepting()

    def _search(self, slots: Sequence[int], mask_id: int, prefs: dict[int, torch.Tensor],
                prior: Optional[torch.Tensor], budget: int, width: int, close_window: int) -> Optional[list[int]]:
        """A concrete valid completion of `slots` (MASK: one unknown token each), found by a
        depth-first search that tries the best-scored allowed tokens first (`prefs` per slot,
        else `prior`; EOS first where the grammar accepts and no scores are known; in the last
        `close_window` slots, first the tokens after which the grammar accepts).
        None when no completion was found within `budget` token checks."""
        m = self.matcher()
        n = len(slots)
        out: list[int] = []
        spent = [0]

        def rest_after_eos(i):
            return [self.eos_id] + [t if t != mask_id else self.eos_id for t in slots[i + 1 :]]

        def dfs(i: int) -> bool:
            spent[0] += 1
            if spent[0] > budget:
                return False
            if i == n:
                return m.is_accepting()
            t = slots[i]
            if t != mask_id:
                if t == self.eos_id:
                    if m.is_accepting():
                        out.extend(rest_after_eos(i))
                        return True
                    return False
                return m.validate_tokens([t]) == 1 and extend(t, i)
            allowed = self.allowed(m)
            accepting = m.is_accepting()
            score = prefs.get(i)
            left = n - i
            cands: list[int] = []
            if accepting and (score is None or left <= close_window):
                cands.append(self.eos_id)
            if left <= close_window:  # running out of room: first the tokens that close the output
                cands += [c for c in self._closers(m, allowed, score if score is not None else prior) if c not in cands]
            ranked = score if score is not None else prior
            if ranked is not None:
                s = ranked.double().masked_fill(~allowed, float("-inf"))
                if score is not None and accepting:
                    s = s.clone()
                    s[self.eos_id] = ranked[self.eos_id]
                top = s.topk(min(width, s.numel())).indices.tolist()
                cands += [c for c in top if s[c] > float("-inf") and c not in cands]
            else:
                cands += [c for c in allowed.nonzero(as_tuple=True)[0][:width].tolist() if c not in cands]
            for c in cands:
                if c == self.eos_id:
                    out.extend(rest_after_eos(i))
                    return True
                if extend(c, i):
                    return True
                if spent[0] > budget:
                    return False
            return False

        def extend(t: int, i: int) -> bool:
            """Take token t at slot i and search on; undo it if that fails."""
            m.consume_token(t)
            out.append(t)
            if dfs(i + 1):
                return True
            out.pop()
            m.rollback(1)
            return False

        import sys

        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 4 * n + 100))
        try:
            return out if dfs(0) else None
        finally:
            sys.setrecursionlimit(limit)

    def witness(self, slots: Sequence[int], mask_id: int, prefs: dict[int, torch.Tensor],
                prior: Optional[torch.Tensor], budget: int = 3000, width: int = 3) -> Optional[list[int]]:
        """A concrete valid completion of `slots` (MASK: one unknown token each), or None.
        First a search that follows the model (closing only in the last slots); if that fails,
        one that closes the output as early as it can (short witnesses fit any budget)."""
        n = len(slots)
        for window in (6, n):
            w = self._search(slots, mask_id, prefs, prior, budget // 2, width, window)
            if w is not None:
                return w
        return None


# ------------------------------------------------------------------ compile (cached)
@dataclass
class CompiledConstraint:
    constraint: Constraint
    dfa: Optional[TokenDFA] = None  # regular constraints
    engine: Optional[GrammarEngine] = None  # context-free (or too large for a DFA)
    compile_s: float = 0.0

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether generated tokens (cut at EOS) are in the language."""
        if self.dfa is not None:
            return self.dfa.accepts(list(tokens) + [self.dfa.eos_id])
        return self.engine.accepts(tokens)

    def min_tokens(self) -> Optional[int]:
        """Fewest tokens of a valid output (regular constraints; None when unknown)."""
        return int(self.dfa.dist[self.dfa.initial]) if self.dfa is not None else None


_CACHE: "OrderedDict[tuple, CompiledConstraint]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = 64


class ConstraintCompiler:
    """Compiles constraints for one tokenizer; results are cached per (constraint, tokenizer)."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: Optional[int] = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        self.bytes = token_bytes(tokenizer, vocab_size)
        self.key = (vocab_size, self.eos_id, hash(tuple(self.bytes)))
        self._vocab = None
        self._lltok = None

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        key = (constraint, self.key)
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                return hit
        t0 = time.perf_counter()
        if constraint.kind == "grammar":
            from llguidance import LLMatcher

            compiled = CompiledConstraint(constraint, engine=self._engine(LLMatcher.grammar_from_lark(constraint.spec),
                                                                         constraint))
        else:
            try:
                compiled = CompiledConstraint(constraint, dfa=self._dfa(constraint))
            except (_TooLarge, _NotRegular):
                compiled = CompiledConstraint(constraint, engine=self._engine(self._ll_grammar(constraint), constraint))
        compiled.compile_s = time.perf_counter() - t0
        with _CACHE_LOCK:
            _CACHE[key] = compiled
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        return compiled

    def _dfa(self, constraint: Constraint) -> TokenDFA:
        from outlines_core import Index, Vocabulary

        source = constraint.regex_source()
        if self._vocab is None:
            groups: dict[bytes, list[int]] = {}
            for i, b in enumerate(self.bytes):
                if b is not None and i != self.eos_id:
                    groups.setdefault(b, []).append(i)
            self._vocab = Vocabulary(self.eos_id, groups)
        try:
            index = Index(source, self._vocab)
        except Exception as e:  # outlines-core reports bad patterns and empty languages as ValueError
            what = "regex" if constraint.kind == "regex" else constraint.kind
            raise DLMError(f"cannot compile the {what} constraint {constraint.describe()}: {e}") from None
        transitions = index.get_transitions()
        n_states = len(transitions) + 2
        if n_states * self.vocab_size > MAX_DENSE_ENTRIES:
            raise _TooLarge()
        return TokenDFA(transitions, index.get_initial_state(), list(index.get_final_states()),
                        self.vocab_size, self.eos_id)

    def _ll_grammar(self, constraint: Constraint) -> str:
        from llguidance import LLMatcher

        if constraint.kind == "json":
            return LLMatcher.grammar_from_json_schema(constraint.schema or {"type": "object"},
                                                      defaults={"whitespace_flexible": False})
        return LLMatcher.grammar_from_regex(constraint.regex_source())

    def _engine(self, grammar: str, constraint: Constraint) -> GrammarEngine:
        if self._lltok is None:
            import llguidance.hf

            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=len(self.tokenizer),
                                                       eos_token=self.eos_id)
        try:
            return GrammarEngine(grammar, self._lltok, self.vocab_size, self.eos_id, constraint.describe())
        except DLMError as e:
            if constraint.kind == "json":
                raise DLMError(f"unsupported JSON schema: {e}") from None
            raise


class _TooLarge(Exception):
    pass


# ------------------------------------------------------------------ the decoder's chooser
class ConstrainedChooser:
    """Wraps one request's token chooser and keeps its canvas completable in the language.

    choose(): masks every slot's logits to the tokens it can take in a valid completion of the
    whole canvas (regular: exact for every open slot; grammars: exact at the first open slot), so
    the unmask policy ranks positions by constrained confidences (a slot only one token can fill
    has confidence 1). assign(): regular constraints take DINGO's best joint assignment for the
    committed slots; grammars commit the certified tokens (or the witness's own one). fill():
    early commit, the same way over every open slot, or None (then early commit does not fire).
    The decoder gives every request its own chooser, so the rows passed in are all that request's."""

    def __init__(self, base, constraint: CompiledConstraint, eos_id: int):
        self.base = base
        self.config = base.config
        self.mask_id = base.mask_id
        self.eos_id = eos_id
        self.c = constraint
        self.witness: Optional[list[int]] = None
        self.elapsed = 0.0
        self._last = None
        self._sets = None
        self._prefix = (0, constraint.dfa.initial if constraint.dfa is not None else 0)

    # ---------------------------------------------------------- hooks
    def begin(self, answer_start: int, answer_len: int, canvas) -> None:
        self.P, self.N = answer_start, answer_len
        c = self.c
        if c.dfa is not None and c.min_tokens() > answer_len:
            raise DLMError(f"the constraint {c.constraint.describe()} cannot be satisfied within "
                           f"max_new_tokens={answer_len}: its shortest valid output has {c.min_tokens()} tokens")
        self.base.begin(answer_start, answer_len, canvas)

    def choose(self, logits, rows, positions, canvas, generators):
        t0 = time.perf_counter()
        rel = [p - self.P for p in positions.tolist()]
        inside = [j for j, p in enumerate(rel) if p < self.N]  # block models run past the answer: free there
        if len(inside) == len(rel):  # (the base chooser's scores work on a float64 copy)
            logits = logits.masked_fill(self._forbidden(self._answer(canvas), rel).to(logits.device), float("-inf"))
        elif inside:
            logits = logits.clone()
            forbidden = self._forbidden(self._answer(canvas), [rel[j] for j in inside])
            logits[inside] = logits[inside].masked_fill(forbidden.to(logits.device), float("-inf"))
        scores, probs = self.base.scores(logits, rows, generators)
        tokens = scores.argmax(-1)
        conf = probs.gather(-1, tokens[:, None])[:, 0]
        self._last = scores
        self.elapsed += time.perf_counter() - t0
        return tokens, conf, probs

    def assign(self, rows, positions, commit, tokens, canvas):
        t0 = time.perf_counter()
        scores, c = self._last, self.c
        rel = [p - self.P for p in positions.tolist()]
        sel = [j for j, (on, p) in enumerate(zip(commit.tolist(), rel)) if on and p < self.N]
        commit, tokens = commit.clone(), tokens.clone()
        if sel:
            slots = self._answer(canvas)
            if c.dfa is not None:
                rows = scores[sel].cpu()
                choice = self._dp(c.dfa, slots, {rel[j]: rows[k] for k, j in enumerate(sel)}, exact=True)
                if choice is None:  # cannot happen while every commit goes through here
                    raise DLMError(f"internal error: the canvas left the language of {c.constraint.describe()}")
                tokens[sel] = torch.tensor([choice[rel[j]] for j in sel], dtype=tokens.dtype, device=tokens.device)
            else:
                entries = [j for j, p in enumerate(rel) if p < self.N]
                rows = scores[entries].cpu()
                prefs = {rel[j]: rows[k] for k, j in enumerate(entries)}
                keep = self._certify(slots, prefs, [(rel[j], int(tokens[j]), j) for j in sel])
                fill_all = len(sel) == len(entries)  # e.g. early commit: fill every open slot
                for j in sel:
                    if j in keep:
                        tokens[j] = keep[j]
                    elif fill_all:  # the witness completes what could not be certified
                        tokens[j] = self.witness[rel[j]]
                    else:
                        commit[j] = False
        self.elapsed += time.perf_counter() - t0
        return commit, tokens

    def fill(self, row: int, positions, logits, canvas):
        t0 = time.perf_counter()
        try:
            lp = logits.double().clone()
            lp[:, self.mask_id] = float("-inf")
            lp = lp.log_softmax(-1).cpu()
            out = lp.argmax(-1)
            rel = (positions - self.P).tolist()
            inside = [i for i, p in enumerate(rel) if p < self.N]
            slots = self._answer(canvas)
            if self.c.dfa is not None:
                choice = self._dp(self.c.dfa, slots, {rel[i]: lp[i] for i in inside})
                if choice is None:
                    return None
                filled = choice
            else:
                w = self.c.engine.witness(slots, self.mask_id, {rel[i]: lp[i] for i in inside}, prior=lp.mean(0))
                if w is None:
                    return None
                self.witness = w
                filled = dict(enumerate(w))
            for i in inside:
                out[i] = filled[rel[i]]
            return out
        finally:
            self.elapsed += time.perf_counter() - t0

    def scores(self, logits, rows, generators):
        return self.base.scores(logits, rows, generators)

    # ---------------------------------------------------------- helpers
    def _answer(self, canvas) -> list[int]:
        return canvas[0, self.P : self.P + self.N].tolist()

    def _span(self, slots: list[int], extra: Sequence[int]) -> tuple[int, int]:
        """[first open slot, end): everything before is fixed, everything after is open."""
        m = self.mask_id
        first = slots.index(m) if m in slots else len(slots)
        fixed = [i for i, t in enumerate(slots) if t != m]
        end = max([first] + [i + 1 for i in fixed] + [i + 1 for i in extra])
        return first, end

    def _forbidden(self, slots: list[int], query: list[int]) -> torch.Tensor:
        """(len(query), V) bool: the tokens each queried slot cannot take (see choose())."""
        c = self.c
        if c.dfa is not None:
            f, e = self._span(slots, query)
            state = self._walk(c.dfa, slots, f)
            sets = c.dfa.state_sets(state, slots[f:e], self.mask_id, self.N - e)
            self._sets = (slots, f, e, state, sets)  # assign() on the same canvas reuses them
            rows = c.dfa.allowed_classes(state, slots[f:e], self.mask_id, self.N - e, [q - f for q in query], sets)
            return torch.from_numpy(np.take(~rows, c.dfa._classes().cls_of, axis=1))
        # grammar: exact at the first open slot (after a fixed prefix), open elsewhere
        out = torch.zeros(len(query), c.engine.vocab_size, dtype=torch.bool)
        f, _ = self._span(slots, [])
        if f in query and self.eos_id not in slots[:f]:
            m = c.engine.matcher()
            if all(m.validate_tokens([t]) == 1 and m.consume_token(t) for t in slots[:f]):
                a = c.engine.allowed(m)
                if m.is_accepting():
                    a[self.eos_id] = True
                if bool(a.any()):
                    out[query.index(f)] = ~a
        return out

    def _walk(self, dfa: TokenDFA, slots: list[int], f: int) -> int:
        """The DFA state after the fixed prefix slots[:f], walked on from the last call's (a
        request's committed tokens never change, so the prefix only grows)."""
        f0, q0 = self._prefix
        if f < f0:
            f0, q0 = 0, dfa.initial
        q = dfa.walk(q0, slots[f0:f])
        self._prefix = (f, q)
        return q

    def _dp(self, dfa: TokenDFA, slots: list[int], scores: dict[int, torch.Tensor],
            exact: bool = False) -> Optional[dict[int, int]]:
        """The committed slots' best joint valid assignment. `exact`: the scores are -inf outside
        each slot's exact allowed set on this canvas (choose() made them so), so a single slot's
        best finite token is valid without a search."""
        if exact and len(scores) == 1:
            (p, v), = scores.items()
            best = int(v.argmax())
            return {p: best} if bool(torch.isfinite(v[best])) else None
        sets = None
        if self._sets is not None and self._sets[0] == slots and all(
                self._sets[1] <= p < self._sets[2] for p in scores):  # choose()'s canvas: its sets
            _, f, e, state, sets = self._sets
        else:
            f, e = self._span(slots, list(scores))
            state = self._walk(dfa, slots, f)
        choice = dfa.best_assignment(state, slots[f:e], self.mask_id, self.N - e,
                                     {p - f: s for p, s in scores.items()}, sets)
        return None if choice is None else {p + f: t for p, t in choice.items()}

    def _certify(self, slots: list[int], prefs: dict[int, torch.Tensor],
                 proposals: list[tuple[int, int, int]]) -> dict[int, int]:
        """Grammars: commit a proposal only if a witness contains it; else the witness's token."""
        eng = self.c.engine
        prior = torch.stack(list(prefs.values())).clamp(min=-1e4).mean(0) if prefs else None
        w = self.witness
        if w is None or any(s != self.mask_id and s != wt for s, wt in zip(slots, w)):
            w = eng.witness(slots, self.mask_id, prefs, prior)
            if w is None:
                raise DLMError(f"no output of max_new_tokens={self.N} tokens satisfies the constraint "
                               f"{self.c.constraint.describe()} (or it is too hard to find one)")
        proposals = sorted(proposals, key=lambda x: -float(prefs[x[0]][x[1]]))
        keep: dict[int, int] = {}
        slots = list(slots)
        for p, t, j in proposals:
            if w[p] != t:
                trial = list(slots)
                trial[p] = t
                nw = eng.witness(trial, self.mask_id, prefs, prior, budget=400)
                if nw is None:
                    continue
                w = nw
            slots[p] = t
            keep[j] = t
        if not keep:  # nothing certified: the witness's own token at the most wanted position
            p, _, j = proposals[0]
            keep[j] = w[p]
        self.witness = w
        return keep


def make_constraint(*, regex: Optional[str] = None, json_schema=None, json_object: bool = False,
                    choice: Optional[Sequence[str]] = None, grammar: Optional[str] = None) -> Optional[Constraint]:
    """At most one constraint from the usual option names (the CLI and the server use this)."""
    given = [n for n, v in (("regex", regex), ("json_schema", json_schema), ("json_object", json_object or None),
                            ("choice", choice), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise DLMError(f"give at most one constraint; got {', '.join(given)}")
    if regex is not None:
        return Constraint.regex(regex)
    if json_schema is not None:
        return Constraint.json_schema(json_schema)
    if json_object:
        return Constraint.json_schema(None)
    if choice is not None:
        return Constraint.choice(choice)
    if grammar is not None:
        return Constraint.grammar(grammar)
    return None
