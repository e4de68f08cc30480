"""The decoder's hook for constraints: a token chooser that keeps the canvas completable.

The decoder gives each constrained request a `ConstrainedChooser` around its plain chooser
(dlm.decoding.sampling.TokenChooser). Both engines are driven through one session interface
(regular.RegularSession, grammar.GrammarSession):

    session.begin(slots)                                  # fail now if no output fits
    session.forbidden(slots, query) -> (len(query), V)    # tokens each open slot cannot take
    session.commit(slots, scores, proposals, fill_all)    # {slot: token} actually committed
    session.fill(slots, scores, prior)                    # every open slot at once, or None

`slots` is the answer region (MASK = undecided), `scores` the chooser's per-slot scores.
"""

from __future__ import annotations

import time
from typing import Optional

from dlm.constraints.compile import CompiledConstraint


class ConstrainedChooser:
    """Wraps one request's token chooser and keeps its canvas completable in the language.

    choose(): masks every slot's logits to the tokens it can take in a valid completion of the
    whole canvas (regular: exact for every open slot; grammars: exact at the first open slot), so
    the unmask policy ranks positions by constrained confidences (a slot only one token can fill
    has confidence 1). assign(): the session decides the committed tokens (regular: DINGO's best
    joint assignment; grammars: certified tokens, or the witness's own). fill(): early commit,
    the same way over every open slot, or None (then early commit does not fire). check(): the
    final check of a finished output."""

    def __init__(self, base, constraint: CompiledConstraint, eos_id: int):
        self.base = base
        self.config = base.config
        self.mask_id = base.mask_id
        self.eos_id = eos_id
        self.c = constraint
        self.session = None
        self.elapsed = 0.0
        self._last = None

    def begin(self, answer_start: int, answer_len: int, canvas) -> None:
        self.P, self.N = answer_start, answer_len
        t0 = time.perf_counter()
        self.session = self.c.session(self.mask_id, answer_len)
        self.session.begin(self._answer(canvas))
        self.elapsed += time.perf_counter() - t0
        self.base.begin(answer_start, answer_len, canvas)

    def choose(self, logits, rows, positions, canvas, generators):
        t0 = time.perf_counter()
        rel = [p - self.P for p in positions.tolist()]
        inside = [j for j, p in enumerate(rel) if p < self.N]  # block models run past the answer: free there
        if len(inside) == len(rel):  # (the base chooser's scores work on a float64 copy)
            logits = logits.masked_fill(self.session.forbidden(self._answer(canvas), rel).to(logits.device),
                                        float("-inf"))
        elif inside:
            logits = logits.clone()
            forbidden = self.session.forbidden(self._answer(canvas), [rel[j] for j in inside])
            logits[inside] = logits[inside].masked_fill(forbidden.to(logits.device), float("-inf"))
        scores, probs = self.base.scores(logits, rows, generators)
        tokens = scores.argmax(-1)
        conf = probs.gather(-1, tokens[:, None])[:, 0]
        self._last = scores
        self.elapsed += time.perf_counter() - t0
        return tokens, conf, probs

    def assign(self, rows, positions, commit, tokens, canvas):
        t0 = time.perf_counter()
        rel = [p - self.P for p in positions.tolist()]
        sel = [j for j, (on, p) in enumerate(zip(commit.tolist(), rel)) if on and p < self.N]
        commit, tokens = commit.clone(), tokens.clone()
        if sel:
            entries = [j for j, p in enumerate(rel) if p < self.N]
            rows_cpu = self._last[entries].cpu()
            scores = {rel[j]: rows_cpu[k] for k, j in enumerate(entries)}
            proposals = {rel[j]: int(tokens[j]) for j in sel}
            keep = self.session.commit(self._answer(canvas), scores, proposals, fill_all=len(sel) == len(entries))
            for j in sel:
                if rel[j] in keep:
                    tokens[j] = keep[rel[j]]
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
            filled = self.session.fill(self._answer(canvas), {rel[i]: lp[i] for i in inside}, prior=lp.mean(0))
            if filled is None:
                return None
            for i in inside:
                out[i] = filled[rel[i]]
            return out
        finally:
            self.elapsed += time.perf_counter() - t0

    def scores(self, logits, rows, generators):
        return self.base.scores(logits, rows, generators)

    def check(self, tokens: list[int]) -> Optional[str]:
        """The final check of the finished output: None, or why it does not satisfy the constraint."""
        t0 = time.perf_counter()
        try:
            return self.c.check(tokens)
        finally:
            self.elapsed += time.perf_counter() - t0

    def _answer(self, canvas) -> list[int]:
        return canvas[0, self.P : self.P + self.N].tolist()

