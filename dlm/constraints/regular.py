"""Regular constraints (regex, choices, most JSON Schemas): a dense token DFA and DINGO's dynamic
program over the whole canvas.

A [MASK] slot means "exactly one unknown token": its transition from state q is the set of
states any single token reaches. At each step the Viterbi DP over the answer region (DINGO)
picks the highest-scoring assignment for the positions the unmask policy commits, with a
budget-aware end condition: the state reached must accept within the positions left (EOS and
anything after it are free), so a finished output is always in the language, not just a valid
prefix. All work is over numpy arrays of states x token classes, never a Python loop over the
vocabulary.

`TokenDFA` is the automaton (built once per constraint and tokenizer, shared by requests);
`RegularSession` is one request's use of it (the decoder's chooser calls it).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

PREPARED_RUN = 32  # reachability over runs of open slots up to this length is built at compile time
POW_MAX_STATES = 512  # above this the per-slot steps are cheaper than S^3 reachability products
DENSE_SUCC_MAX_STATES = 2048  # above this one-token reachability stays an edge list (S^2 bytes otherwise)


class _TokenClasses(NamedTuple):
    table: np.ndarray  # (S, C) next state per class
    cls_of: np.ndarray  # (V,) each token's class
    order: np.ndarray  # (V,) tokens grouped by class, ascending ids inside a class
    sorted_cls: np.ndarray  # (V,) cls_of[order]
    starts: np.ndarray  # (C,) where each class begins in `order`


class TokenDFA:
    """A dense token-level DFA with two extra states: DEAD (no valid continuation) and DONE
    (after EOS: every token is allowed, it is cut from the output).

    table (S, V) int32: next state; accepting (S,) bool; dist (S,) int64: fewest tokens to an
    accepting state or DONE (a large number when none is reachable).

        TokenDFA({0: {4: 1}, 1: {4: 1}}, initial=0, finals=[1], vocab_size=6, eos_id=1)"""

    def __init__(self, transitions: dict[int, dict[int, int]], initial: int, finals: Sequence[int],
                 vocab_size: int, eos_id: int):
        src, tok, dst = [], [], []
        for s, m in transitions.items():
            for t, n in m.items():
                src.append(s)
                tok.append(t)
                dst.append(n)
        self._build(np.array(src, dtype=np.int64), np.array(tok, dtype=np.int64), np.array(dst, dtype=np.int64),
                    initial, finals, vocab_size, eos_id)

    @classmethod
    def from_arrays(cls, src, tok, dst, initial: int, finals: Sequence[int], vocab_size: int,
                    eos_id: int) -> "TokenDFA":
        """From parallel arrays of transitions (src --tok--> dst), any state numbering."""
        self = cls.__new__(cls)
        self._build(np.asarray(src, dtype=np.int64), np.asarray(tok, dtype=np.int64),
                    np.asarray(dst, dtype=np.int64), initial, finals, vocab_size, eos_id)
        return self

    def _build(self, src, tok, dst, initial, finals, vocab_size, eos_id):
        states = np.unique(np.concatenate([src, dst, np.array([initial, *finals], dtype=np.int64)]))
        S = len(states) + 2
        self.dead, self.done = S - 2, S - 1
        keep = (tok != eos_id) & (tok >= 0) & (tok < vocab_size)
        table = np.full((S, vocab_size), self.dead, dtype=np.int32)
        table[np.searchsorted(states, src[keep]), tok[keep]] = np.searchsorted(states, dst[keep])
        accepting = np.zeros(S, dtype=bool)
        accepting[np.searchsorted(states, np.array(list(finals), dtype=np.int64))] = True
        table[accepting, eos_id] = self.done
        table[self.done] = self.done
        accepting[self.done] = True
        self.table, self.accepting = table, accepting
        self.initial = int(np.searchsorted(states, initial))
        self.vocab_size, self.eos_id, self.num_states = vocab_size, eos_id, S
        # one-token reachability (for [MASK] slots): the edge list, and for small automata the
        # dense successor matrix (faster per step; S^2 bytes)
        s_idx, t_idx = np.nonzero(table != self.dead)
        pairs = np.unique(s_idx.astype(np.int64) * S + table[s_idx, t_idx])
        self.edge_src, self.edge_dst = pairs // S, pairs % S
        self.succ = None
        if S <= DENSE_SUCC_MAX_STATES:
            self.succ = np.zeros((S, S), dtype=bool)
            self.succ[self.edge_src, self.edge_dst] = True
        self.dist = self._distances()
        self._memo_d: dict = {}
        self._memo_cap = max(256, 1_000_000 // S)  # about 2 MB of sets per automaton
        self._cls_cache: Optional[_TokenClasses] = None
        self._pows: Optional[list] = None
        # what every decoding step uses, built now (compile time) rather than on a first request
        self._classes()
        self._pow(PREPARED_RUN)

    @property
    def nbytes(self) -> int:
        """Memory held by the automaton (the compile cache is bounded by this)."""
        k = self._classes()
        pows = sum(p.nbytes for p in (self._pows or [])[1:] if p is not None)
        succ = self.succ.nbytes if self.succ is not None else 16 * len(self.edge_src)
        return self.table.nbytes + succ + k.table.nbytes + 3 * k.cls_of.nbytes + pows + 2 * 1_000_000

    def _distances(self) -> np.ndarray:
        S = self.num_states
        big = np.iinfo(np.int64).max // 4
        dist = np.full(S, big, dtype=np.int64)
        dist[self.accepting] = 0
        frontier = self.accepting.copy()
        d = 0
        while frontier.any():
            d += 1
            reach = np.zeros(S, dtype=bool)
            reach[self.edge_src[frontier[self.edge_dst]]] = True
            frontier = reach & (dist == big)
            dist[frontier] = d
        dist[self.dead] = big
        return dist

    def accepts(self, tokens: Sequence[int]) -> bool:
        return bool(self.accepting[self.walk(self.initial, tokens)])

    def min_tokens(self) -> int:
        """Fewest tokens of a valid output."""
        return int(self.dist[self.initial])

    # ---------------------------------------------------------- per-step computations
    # numpy: these run once or twice per decoding step over a few dozen slots, where torch's
    # per-call overhead (microseconds per op) would dominate.
    def _classes(self) -> _TokenClasses:
        """Token classes: tokens whose table columns are equal (the same next state from every
        state) are interchangeable for the automaton, and real constraints have few classes (a
        JSON schema over a 2,048-token vocabulary: 4 to 81), so per-step work is over states x
        classes and expands to the vocabulary at the end."""
        if self._cls_cache is None:
            t = self.table
            cols = np.ascontiguousarray(t.T).view(np.dtype((np.void, t.shape[0] * t.itemsize)))[:, 0]
            _, first, cls_of = np.unique(cols, return_index=True, return_inverse=True)
            ctable, cls_of = t[:, first], cls_of.reshape(-1)
            order = np.argsort(cls_of, kind="stable")
            sorted_cls = cls_of[order]
            self._cls_cache = _TokenClasses(np.ascontiguousarray(ctable), cls_of, order, sorted_cls,
                                            np.searchsorted(sorted_cls, np.arange(ctable.shape[1])))
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
        """(S, S) bool: some m tokens lead from s to s' (m >= 1), memoised; None for large automata."""
        if self.num_states > POW_MAX_STATES:
            return None
        if self._pows is None:
            self._pows = [None, self.succ]
        pows = self._pows
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
        t = self.table
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
            if tok == mask_id and m == 1 and self.succ is None:
                a = np.zeros_like(f)
                a[self.edge_dst[f[self.edge_src]]] = True
            elif tok == mask_id:
                a = (self._pow(m) if m > 1 else self.succ)[f].any(0)
            else:
                a = np.zeros_like(f)
                a[self.table[f, tok]] = True
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
            if tok == mask_id and m == 1 and self.succ is None:
                a = np.zeros_like(g)
                a[self.edge_src[g[self.edge_dst]]] = True
            elif tok == mask_id:
                a = (self._pow(m) if m > 1 else self.succ)[:, g].any(1)
            else:
                a = g[self.table[:, tok]]
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
        sets = [(self.dist <= left_after).tobytes()]
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
        return self.per_token(self.allowed_classes(state, slots, mask_id, left_after, query))

    def per_token(self, rows: np.ndarray) -> torch.Tensor:
        """(n, C) bool over token classes -> (n, V) bool over token ids."""
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
        gb = (self.dist <= left_after).tobytes()
        for i, m in reversed(self._runs(slots, mask_id)):
            gb = self._bwb(gb, slots[i], mask_id, m)
        return gb

    def _feasible(self, state: int, slots: Sequence[int], mask_id: int, left_after: int) -> bool:
        """Can slots (MASK = any one token) be completed validly from `state`?"""
        f = self._set(self._forward_b(self._single(state), slots, mask_id))
        return bool((f & (self.dist <= left_after)).any())

    def _viterbi(self, start: np.ndarray, slots, mask_id, end_ok: np.ndarray,
                 cands) -> Optional[tuple[dict[int, int], float]]:
        """The DP itself, from the states `start` through slots into the states `end_ok`; cands:
        committed slot -> (token ids, their scores). Returns (choice, score)."""
        t, succ = self.table, self.succ
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
                if on.size and succ is not None:
                    nw = np.where(succ[on], w[on, None], ninf).max(0)
                elif on.size:
                    live = np.isfinite(w[self.edge_src])
                    np.maximum.at(nw, self.edge_dst[live], w[self.edge_src[live]])
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
                if slots[i] != mask_id:
                    into_q = t[:, slots[i]] == q
                elif succ is not None:
                    into_q = succ[:, q]
                else:
                    into_q = np.zeros(S, dtype=bool)
                    into_q[self.edge_src[self.edge_dst == q]] = True
            q = int(np.where(into_q, before[r], ninf).argmax())
        return choice, total


class RegularSession:
    """One request's use of a TokenDFA: the answer region has `n` slots (MASK = undecided).

    forbidden(): every queried open slot's exact allowed set on this canvas; commit(): DINGO's
    best joint assignment of the committed slots; fill(): the same over every open slot (early
    commit). The decided prefix only grows, so its DFA state is walked on from the last call's."""

    def __init__(self, dfa: TokenDFA, mask_id: int, n: int, describe: str = "regular"):
        self.dfa, self.mask_id, self.n, self.describe = dfa, mask_id, n, describe
        self._prefix = (0, dfa.initial)
        self._sets = None  # (slots, f, e, state, sets) of the last forbidden() call: commit() reuses them

    def min_tokens(self) -> int:
        return self.dfa.min_tokens()

    def begin(self, slots: list[int]) -> None:
        """Fail now when the shortest valid output is longer than the answer region."""
        from dlm.constraints.spec import ConstraintUnsatisfiable

        if self.dfa.min_tokens() > self.n:
            raise ConstraintUnsatisfiable(
                f"the constraint {self.describe} cannot be satisfied within {self.n} tokens: its shortest valid "
                f"output has {self.dfa.min_tokens()}; raise max_tokens (--max-new-tokens)")

    def _span(self, slots: list[int], extra: Sequence[int]) -> tuple[int, int]:
        """[first open slot, end): everything before is fixed, everything after is open."""
        m = self.mask_id
        first = slots.index(m) if m in slots else len(slots)
        fixed = [i for i, t in enumerate(slots) if t != m]
        end = max([first] + [i + 1 for i in fixed] + [i + 1 for i in extra])
        return first, end

    def _walk(self, slots: list[int], f: int) -> int:
        f0, q0 = self._prefix
        if f < f0:
            f0, q0 = 0, self.dfa.initial
        q = self.dfa.walk(q0, slots[f0:f])
        self._prefix = (f, q)
        return q

    def forbidden(self, slots: list[int], query: list[int]) -> torch.Tensor:
        """(len(query), V) bool: the tokens each queried slot cannot take."""
        dfa = self.dfa
        f, e = self._span(slots, query)
        state = self._walk(slots, f)
        sets = dfa.state_sets(state, slots[f:e], self.mask_id, self.n - e)
        self._sets = (list(slots), f, e, state, sets)
        rows = dfa.allowed_classes(state, slots[f:e], self.mask_id, self.n - e, [q - f for q in query], sets)
        return dfa.per_token(~rows)

    def assignment(self, slots: list[int], scores: dict[int, torch.Tensor],
                   exact: bool = False) -> Optional[dict[int, int]]:
        """The slots in `scores` take their best joint valid tokens. `exact`: the scores are -inf
        outside each slot's exact allowed set on this canvas (forbidden() made them so), so a
        single slot's best finite token is valid without a search."""
        if exact and len(scores) == 1:
            (p, v), = scores.items()
            best = int(v.argmax())
            return {p: best} if bool(torch.isfinite(v[best])) else None
        sets = None
        if self._sets is not None and self._sets[0] == slots and all(self._sets[1] <= p < self._sets[2] for p in scores):
            _, f, e, state, sets = self._sets
        else:
            f, e = self._span(slots, list(scores))
            state = self._walk(slots, f)
        choice = self.dfa.best_assignment(state, slots[f:e], self.mask_id, self.n - e,
                                          {p - f: s for p, s in scores.items()}, sets)
        return None if choice is None else {p + f: t for p, t in choice.items()}

    def commit(self, slots: list[int], scores: dict[int, torch.Tensor], proposals: dict[int, int],
               fill_all: bool) -> dict[int, int]:
        """Tokens for the proposed slots: their best joint valid assignment (all of them commit)."""
        from dlm.errors import DLMError

        choice = self.assignment(slots, {p: scores[p] for p in proposals}, exact=True)
        if choice is None:  # cannot happen while every commit goes through here
            raise DLMError("internal error: the canvas left the language of the constraint")
        return choice

    def fill(self, slots: list[int], scores: dict[int, torch.Tensor], prior=None) -> Optional[dict[int, int]]:
        return self.assignment(slots, scores)
