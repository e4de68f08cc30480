"""Context-free constraints (Lark grammars, and JSON Schemas beyond a token DFA: recursion, large
length / item bounds, numeric ranges) through llguidance, with witnesses.

llguidance answers left-to-right questions (which tokens may come next); a diffusion decoder
fills slots out of order. So a request keeps a *witness*: a concrete valid completion of its
current canvas, one token per masked slot, found by a bounded depth-first search that follows the
model's scores. A token the unmask policy wants is committed only when some witness contains it
(certified); when nothing can be certified the witness's own token is committed, so decoding
never stalls and the result is always in the language (Muendler et al. 2025 reduce the same
question to infilling; see ../shared/REFERENCE.md section 3).

Every search is bounded (`budget` token checks) and iterative (no recursion limit, whatever the
canvas length); llguidance bounds each mask computation itself (its parser limits).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from dlm.constraints.spec import ConstraintUnsatisfiable
from dlm.errors import DLMError


def parser_limits():
    from llguidance import LLParserLimits

    # verbose_errors off: an error message must not carry the grammar (another client's schema)
    return LLParserLimits(verbose_errors=False)


class GrammarEngine:
    """A grammar (llguidance's format: Lark, or compiled from a JSON Schema) for one tokenizer."""

    def __init__(self, grammar: str, lltok, vocab_size: int, eos_id: int, describe: str,
                 closing: Sequence[int] = ()):
        from llguidance import LLMatcher

        self.grammar, self.lltok, self.vocab_size, self.eos_id = grammar, lltok, vocab_size, eos_id
        # single-character tokens, closing punctuation first, with their kind
        self.closing = [(t, "digit" if c.isdigit() else "lower" if c.islower() else "upper" if c.isupper() else "punct")
                        for t, c in closing]
        m = LLMatcher(lltok, grammar, log_level=0, limits=parser_limits())
        if m.is_error():
            raise DLMError(f"the constraint ({describe}) does not compile: {m.get_error()}")
        self._root = m

    @property
    def nbytes(self) -> int:
        return len(self.grammar) + 4 * self.vocab_size + 1_000_000  # the matcher's lexer, roughly

    def matcher(self):
        return self._root.deep_copy()

    def allowed(self, m) -> torch.Tensor:
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

    def close_path(self, m, max_len: int, branch: int = 3, budget: int = 300) -> Optional[list[int]]:
        """A short token sequence after which the grammar accepts (at most `max_len` tokens), by
        iterative deepening over single-character tokens (closing punctuation first, `branch` per
        step, `budget` matcher steps in all); None if none is found. The matcher is left as it was."""
        if m.is_accepting():
            return []
        spent = 0
        for depth in range(1, max_len + 1):
            path: list[int] = []
            stack = [self._closing_options(m, branch)]
            while stack:
                if not stack[-1] or spent > budget:
                    stack.pop()
                    if path:
                        path.pop()
                        m.rollback(1)
                    continue
                t = stack[-1].pop(0)
                spent += 1
                if not m.consume_token(t):
                    continue
                path.append(t)
                if m.is_accepting():
                    m.rollback(len(path))
                    return path
                if len(path) < depth:
                    stack.append(self._closing_options(m, branch))
                else:
                    path.pop()
                    m.rollback(1)
            if spent > budget:
                return None
        return None

    def _closing_options(self, m, branch: int) -> list[int]:
        """Up to `branch` allowed punctuation characters, then one digit, one lower-case and one
        upper-case letter (a unit, a keyword's first letter): few options, of different kinds."""
        allowed = self.allowed(m)
        out, kinds = [], set()
        for t, kind in self.closing:
            if allowed[t] and (kind == "punct" and len(out) < branch or kind != "punct" and kind not in kinds):
                out.append(t)
                kinds.add(kind)
        return out

    def accepts(self, tokens: Sequence[int]) -> bool:
        m = self.matcher()
        for t in tokens:
            if t == self.eos_id:
                break
            if m.validate_tokens([t]) != 1 or not m.consume_token(t):
                return False
        return m.is_accepting()

    def _candidates(self, m, i: int, n: int, prefs, prior, width: int, close_window: int) -> list[int]:
        """The tokens to try at open slot i, best first: EOS where the grammar accepts and no
        scores are known (or near the end), then (in the last `close_window` slots) tokens after
        which the grammar accepts, then the best-scored allowed tokens. close_window < 0: the
        shortest way to an accepted output first (see _closing_first)."""
        if close_window < 0:
            return self._closing_first(m, prefs.get(i) if prefs.get(i) is not None else prior)
        allowed = self.allowed(m)
        accepting = m.is_accepting()
        score = prefs.get(i)
        left = n - i
        cands: list[int] = []
        if accepting and (score is None or left <= close_window):
            cands.append(self.eos_id)
        if left <= close_window:  # running out of room: first the tokens that close the output
            cands += [c for c in self._closers(m, allowed, score if score is not None else prior) if c not in cands]
            if not accepting and left <= 12:  # and the start of a short way to close it
                path = self.close_path(m, min(left, 6))
                if path:
                    cands += [path[0]] if path[0] not in cands else []
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
        return cands

    def _closing_first(self, m, ranked: Optional[torch.Tensor]) -> list[int]:
        """Candidates that head for the shortest accepted output, whatever the scores: EOS where
        the grammar accepts, the token the grammar forces (a required key), closing punctuation,
        a digit, a letter; the best-scored allowed token last."""
        cands = [self.eos_id] if m.is_accepting() else []
        ff = m.compute_ff_tokens()
        if ff:
            cands.append(ff[0])
        cands += [t for t in self._closing_options(m, 3) if t not in cands]
        if ranked is not None:
            s = ranked.double().masked_fill(~self.allowed(m), float("-inf"))
            best = int(s.argmax())
            if s[best] > float("-inf") and best not in cands:
                cands.append(best)
        return cands

    def _search(self, slots: Sequence[int], mask_id: int, prefs: dict[int, torch.Tensor],
                prior: Optional[torch.Tensor], budget: int, width: int, close_window: int) -> Optional[list[int]]:
        """A concrete valid completion of `slots` (MASK: one unknown token each), found by a
        depth-first search that tries `_candidates` in order at every open slot. None when no
        completion was found within `budget` slot visits.

        Iterative: `frames` holds one entry per slot on the current path, [slot, candidates (None:
        a fixed slot), next candidate, whether the slot's token is consumed]."""
        m = self.matcher()
        n, eos = len(slots), self.eos_id
        out: list[int] = []
        spent = 0
        frames: list[list] = []

        def rest_after_eos(i: int) -> list[int]:
            return [eos] + [t if t != mask_id else eos for t in slots[i + 1 :]]

        ret: object = None  # None: start visiting slot `i`; True / False: the last visit's result
        i = 0
        while True:
            if ret is None:  # visit slot i
                spent += 1
                if spent > budget:
                    ret = False
                elif i == n:
                    ret = m.is_accepting()
                elif slots[i] != mask_id:
                    t = slots[i]
                    if t == eos:
                        if m.is_accepting():
                            out.extend(rest_after_eos(i))
                            return out
                        ret = False
                    elif m.validate_tokens([t]) == 1:
                        m.consume_token(t)
                        out.append(t)
                        frames.append([i, None, 0, True])
                        i += 1
                        continue
                    else:
                        ret = False
                else:
                    frames.append([i, self._candidates(m, i, n, prefs, prior, width, close_window), 0, False])
                    ret = "next"
            if ret is True:
                return out  # every slot on the path holds its token: the completion is `out`
            if not frames:
                return None
            f = frames[-1]
            if ret is False:  # the visit after this frame's token failed: take the token back
                out.pop()
                m.rollback(1)
                f[3] = False
                if f[1] is None or spent > budget:
                    frames.pop()
                    continue  # ret stays False: this frame's slot failed too
            slot, cands, k = f[0], f[1], f[2]
            if k >= len(cands):
                frames.pop()
                ret = False
                continue
            c = cands[k]
            f[2] = k + 1
            if c == eos:
                out.extend(rest_after_eos(slot))
                return out
            m.consume_token(c)
            out.append(c)
            f[3] = True
            ret, i = None, slot + 1

    def witness(self, slots: Sequence[int], mask_id: int, prefs: dict[int, torch.Tensor],
                prior: Optional[torch.Tensor], budget: int = 3000, width: int = 3) -> Optional[list[int]]:
        """A concrete valid completion of `slots` (MASK: one unknown token each), or None.
        First a search that follows the model (closing only in the last slots); if that fails,
        one that heads for the shortest accepted output (short witnesses fit any budget)."""
        for window in (6, -1):
            w = self._search(slots, mask_id, prefs, prior, budget // 2, width, window)
            if w is not None:
                return w
        return None


class GrammarSession:
    """One request's use of a GrammarEngine over an answer region of `n` slots.

    forbidden(): exact at the first open slot after the decided prefix, open elsewhere;
    commit(): certify the policy's proposals against witnesses; fill(): a whole witness."""

    def __init__(self, engine: GrammarEngine, mask_id: int, n: int, describe: str):
        self.engine, self.mask_id, self.n, self.describe = engine, mask_id, n, describe
        self.witness: Optional[list[int]] = None

    def min_tokens(self) -> Optional[int]:
        return None

    def begin(self, slots: list[int]) -> None:
        """Nothing to check up front: the first witness is searched with the model's scores at
        the first commit (an unguided search fails on constraints a guided one meets easily); a
        constraint no output fits then fails its request alone."""

    def _unsatisfiable(self) -> str:
        return (f"no output of {self.n} tokens satisfies the constraint {self.describe} (or none was found "
                "within the search budget); raise max_tokens (--max-new-tokens) or simplify the constraint")

    def forbidden(self, slots: list[int], query: list[int]) -> torch.Tensor:
        eng, m_id = self.engine, self.mask_id
        out = torch.zeros(len(query), eng.vocab_size, dtype=torch.bool)
        f = slots.index(m_id) if m_id in slots else len(slots)
        if f in query and eng.eos_id not in slots[:f]:
            m = eng.matcher()
            if all(m.validate_tokens([t]) == 1 and m.consume_token(t) for t in slots[:f]):
                a = eng.allowed(m)
                if m.is_accepting():
                    a[eng.eos_id] = True
                if bool(a.any()):
                    out[query.index(f)] = ~a
        return out

    def commit(self, slots: list[int], scores: dict[int, torch.Tensor], proposals: dict[int, int],
               fill_all: bool) -> dict[int, int]:
        """Commit a proposal only if a witness contains it; when none can be, the witness's own
        token at the most wanted slot. `fill_all` (e.g. early commit): every proposed slot gets
        a token, the witness's where its proposal was not certified."""
        eng = self.engine
        prior = torch.stack(list(scores.values())).clamp(min=-1e4).mean(0) if scores else None
        w = self.witness
        if w is None or any(s != self.mask_id and s != wt for s, wt in zip(slots, w)):
            w = eng.witness(slots, self.mask_id, scores, prior)
            if w is None:
                raise ConstraintUnsatisfiable(self._unsatisfiable())
        order = sorted(proposals.items(), key=lambda x: -float(scores[x[0]][x[1]]))
        keep: dict[int, int] = {}
        slots = list(slots)
        for p, t in order:
            if w[p] != t:
                trial = list(slots)
                trial[p] = t
                nw = eng.witness(trial, self.mask_id, scores, prior, budget=400)
                if nw is None:
                    continue
                w = nw
            slots[p] = t
            keep[p] = t
        if not keep:  # nothing certified: the witness's own token at the most wanted position
            p = order[0][0]
            keep[p] = w[p]
        self.witness = w
        if fill_all:
            for p in proposals:
                keep.setdefault(p, w[p])
        return keep

    def fill(self, slots: list[int], scores: dict[int, torch.Tensor],
             prior: Optional[torch.Tensor] = None) -> Optional[dict[int, int]]:
        w = self.engine.witness(slots, self.mask_id, scores, prior)
        if w is None:
            return None
        self.witness = w
        return dict(enumerate(w))
