"""From a `Constraint` to an engine for one tokenizer: bounded, cached, never on a serving path.

    compiler = ConstraintCompiler(tokenizer, vocab_size, eos_id, limits=CompileLimits(timeout_s=1))
    compiled = compiler.compile(Constraint.json_schema(schema))   # thread-safe; cached by content

Routing. Regular constraints (regex, choices, JSON Schemas that outlines-core translates exactly)
become a token DFA (regular.py), built in a child process under a time budget and a state budget
(worker.py). A JSON Schema that is not regular (recursion, numeric ranges, keywords the regex
translation ignores), or whose DFA would be too large or too slow to build (`maxLength: 32767`,
`minItems: 100`: the bound would be unrolled into states), goes to llguidance (grammar.py), which
handles large bounds natively. A constraint neither engine accepts is refused with the reason;
a budget that was hit says which limit and the flag that raises it.

Results are cached per (constraint, tokenizer, limits) in a process-wide LRU bounded by the
memory the automata hold, and concurrent compiles of the same constraint share one build.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional, Sequence

from dlm.constraints import routing as R
from dlm.constraints import schema as S
from dlm.constraints.grammar import GrammarEngine, GrammarSession
from dlm.constraints.regular import RegularSession, TokenDFA
from dlm.constraints.spec import Constraint, ConstraintError, escape_literal
from dlm.constraints.tokens import detokenize, token_bytes
from dlm.errors import DLMError


@dataclass(frozen=True)
class CompileLimits:
    """Budgets of one compile (`dlm serve --constraint-*` flags)."""

    timeout_s: float = 1.0  # building a token DFA; past it the grammar engine takes the constraint
    max_dfa_mb: float = 64.0  # a token DFA's dense table (states x vocabulary x 4 bytes)
    max_regex_size: int = 8_000  # expanded regex size above which no DFA is attempted (builds take seconds)
    cache_mb: float = 1024.0  # compiled constraints kept, in all


@dataclass
class CompiledConstraint:
    """A constraint compiled for one tokenizer. `session(mask_id, n)` gives one request's
    engine state; `check(tokens)` is the final check of an output."""

    constraint: Constraint
    dfa: Optional[TokenDFA] = None  # regular constraints
    engine: Optional[GrammarEngine] = None  # context-free (or beyond a DFA's budget)
    compile_s: float = 0.0
    approximate: list[str] = field(default_factory=list)  # JSON Schema keywords checked at the end only
    route: str = ""  # why this engine (for benchmarks and logs)
    table: Optional[Sequence[Optional[bytes]]] = None  # token bytes, for the final check's text
    eos_id: int = -1

    @property
    def nbytes(self) -> int:
        return (self.dfa or self.engine).nbytes

    def session(self, mask_id: int, n: int):
        if self.dfa is not None:
            return RegularSession(self.dfa, mask_id, n, self.constraint.describe())
        return GrammarSession(self.engine, mask_id, n, self.constraint.describe())

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether generated tokens (cut at EOS) are in the engine's language."""
        if self.dfa is not None:
            return self.dfa.accepts(list(tokens) + [self.dfa.eos_id])
        return self.engine.accepts(tokens)

    def min_tokens(self) -> Optional[int]:
        """Fewest tokens of a valid output (regular constraints; None when unknown)."""
        return self.dfa.min_tokens() if self.dfa is not None else None

    def check(self, tokens: Sequence[int]) -> Optional[str]:
        """None when the output (cut at EOS) satisfies the constraint; else why not. JSON
        Schemas are validated against the original schema (formats included)."""
        if not self.accepts(tokens):
            return "the output left the constraint's language"
        if self.constraint.kind == "json" and self.table is not None:
            return S.check_json(detokenize(self.table, tokens, self.eos_id), self.constraint.schema)
        return None


class _Cache:
    """Process-wide LRU of compiled constraints, bounded by their memory."""

    def __init__(self):
        self.items: "OrderedDict[tuple, CompiledConstraint]" = OrderedDict()
        self.pending: dict[tuple, Future] = {}
        self.lock = threading.Lock()

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_CACHE = _Cache()
_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


class ConstraintCompiler:
    """Compiles constraints for one tokenizer, within `limits`; results are cached."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: Optional[int] = None,
                 limits: Optional[CompileLimits] = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        self.limits = limits or CompileLimits()
        self.bytes = token_bytes(tokenizer, vocab_size)
        self.key = (vocab_size, self.eos_id, hash(tuple(self.bytes)))
        self._lltok = None
        self._lltok_lock = threading.Lock()

    # ---------------------------------------------------------- public
    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The compiled constraint (cached). Raises ConstraintError with the reason."""
        key = (constraint, self.key, self.limits)
        with _CACHE.lock:
            hit = _CACHE.items.get(key)
            if hit is not None:
                _CACHE.items.move_to_end(key)
                return hit
            fut = _CACHE.pending.get(key)
            owner = fut is None
            if owner:
                fut = _CACHE.pending[key] = Future()
        if not owner:
            return fut.result()  # the same constraint is being compiled for another request
        try:
            compiled = self._compile(constraint)
        except BaseException as e:
            with _CACHE.lock:
                del _CACHE.pending[key]
            fut.set_exception(e)
            raise
        with _CACHE.lock:
            del _CACHE.pending[key]
            _CACHE.items[key] = compiled
            budget = self.limits.cache_mb * 2**20
            while len(_CACHE.items) > 1 and sum(c.nbytes for c in _CACHE.items.values()) > budget:
                _CACHE.items.popitem(last=False)
        fut.set_result(compiled)
        return compiled

    def warm(self) -> None:
        """Start the automaton builders now (servers call this at start-up)."""
        self._pool().warm()

    # ---------------------------------------------------------- routing
    def _compile(self, constraint: Constraint) -> CompiledConstraint:
        t0 = time.perf_counter()
        if constraint.kind == "grammar":
            from llguidance import LLMatcher

            engine = self._engine(LLMatcher.grammar_from_lark(constraint.spec), constraint)
            compiled = CompiledConstraint(constraint, engine=engine, route="grammar")
        elif constraint.kind == "json":
            compiled = self._compile_json(constraint)
        else:
            source = constraint.spec if constraint.kind == "regex" else \
                "(" + "|".join(escape_literal(c) for c in json.loads(constraint.spec)) + ")"
            compiled = self._compile_regular(constraint, source)
        compiled.compile_s = time.perf_counter() - t0
        compiled.table, compiled.eos_id = self.bytes, self.eos_id
        return compiled

    def _compile_regular(self, constraint: Constraint, source: str) -> CompiledConstraint:
        """A regex or choice: a token DFA, or llguidance's regex engine past the DFA budgets."""
        from llguidance import LLMatcher

        from dlm.constraints.worker import BuildFailed

        size = regex_size(source, self.limits.max_regex_size)
        if size is not None and size > self.limits.max_regex_size:
            route = "grammar (large bounds)"
        else:
            try:
                return CompiledConstraint(constraint, dfa=self._dfa(source), route="dfa")
            except BuildFailed as e:
                if e.reason == "error":
                    raise ConstraintError(f"cannot compile the {constraint.kind} constraint "
                                          f"{constraint.describe()}: {_short(e.detail)}") from None
                route = f"grammar ({e.reason})"
        try:
            engine = self._engine(LLMatcher.grammar_from_regex(source), constraint)
        except ConstraintError as e:
            raise ConstraintError(f"{e}{self._budget_note(route)}") from None
        return CompiledConstraint(constraint, engine=engine, route=route)

    def _budget_note(self, route: str) -> str:
        """What a budget did before the grammar engine refused, and the flag that raises it."""
        if "timeout" in route:
            return (f"; its token automaton also took longer than the {self.limits.timeout_s:g} s budget "
                    "(dlm serve --constraint-compile-timeout)")
        if "too_large" in route:
            return (f"; its token automaton is also larger than the {self.limits.max_dfa_mb:g} MB budget "
                    "(dlm serve --constraint-max-dfa-mb)")
        if "memory" in route:
            return "; its token automaton also ran out of the builder's memory"
        return ""

    def _compile_json(self, constraint: Constraint) -> CompiledConstraint:
        from llguidance import LLMatcher

        from dlm.constraints.worker import BuildFailed

        prepared = S.prepare(constraint.schema)
        route = "grammar (not regular)"
        schema = R.small_ranges_as_enums(prepared.schema)
        if not prepared.approximate and R.regular_candidate(schema):
            if not R.numeric_bounds(schema):
                from outlines_core.json_schema import build_regex_from_schema

                try:
                    source = build_regex_from_schema(json.dumps(schema), S_WHITESPACE)
                except Exception as e:  # outlines-core refuses some shapes: the grammar engine may not
                    source, route = None, f"grammar (regex translation: {type(e).__name__})"
                if source is not None:
                    size = regex_size(source, self.limits.max_regex_size)
                    if size is not None and size > self.limits.max_regex_size:
                        route = "grammar (large bounds)"
                    else:
                        try:
                            return CompiledConstraint(constraint, dfa=self._dfa(source), route="dfa")
                        except BuildFailed as e:
                            route = f"grammar ({e.reason})"
        try:
            try:
                grammar, approx = self._json_grammar(prepared)
            except ConstraintError as e:
                if "nsatisfiable" not in str(e):
                    raise
                # the unconditional forms of if / then / else or dependencies contradict each other:
                # leave those to the final check
                grammar, approx = self._json_grammar(S.prepare(constraint.schema, strict=False))
            engine = self._engine(grammar, constraint, prefix="unsupported JSON schema")
        except ConstraintError as e:
            raise ConstraintError(f"{e}{self._budget_note(route)}") from None
        return CompiledConstraint(constraint, engine=engine, approximate=sorted(set(approx)), route=route)

    def _json_grammar(self, prepared) -> tuple[str, list[str]]:
        """llguidance's grammar for a prepared schema, and what it enforces only approximately
        (overlapping oneOf branches as anyOf; keywords it does not implement)."""
        from llguidance import LLMatcher

        approx = list(prepared.approximate)
        options = {"whitespace_flexible": False}
        for _ in range(3):
            grammar = LLMatcher.grammar_from_json_schema(prepared.schema, defaults=options)
            is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, self._lltokenizer(), limits=_limits())
            if not is_error:
                return grammar, approx
            err = msgs[0] if msgs else "unknown error"
            if "oneOf" in err and "coerce_one_of" in err and not options.get("coerce_one_of"):
                options["coerce_one_of"] = True  # overlapping branches: anyOf, then the final check
                approx.append("oneOf")
                continue
            keys = re.search(r"Unimplemented keys: \[(.*?)\]", err)
            if keys and not options.get("lenient"):
                options["lenient"] = True  # enforce the rest; the final check covers these
                approx += [k.strip().strip('"') for k in keys.group(1).split(",")]
                continue
            raise ConstraintError(f"unsupported JSON schema: {_short(err)}")
        raise ConstraintError("unsupported JSON schema")

    # ---------------------------------------------------------- engines
    def _pool(self):
        from dlm.constraints.worker import AutomatonPool

        with _POOLS_LOCK:
            pool = _POOLS.get(self.key)
            if pool is None:
                pool = _POOLS[self.key] = AutomatonPool(self.eos_id, self.bytes)
            return pool

    def _dfa(self, source: str) -> TokenDFA:
        max_states = max(2, int(self.limits.max_dfa_mb * 2**20 / (4 * self.vocab_size)))
        a = self._pool().build(source, self.limits.timeout_s, max_states)
        return TokenDFA.from_arrays(a.src, a.tok, a.dst, a.initial, a.finals, self.vocab_size, self.eos_id)

    def _lltokenizer(self):
        with self._lltok_lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=len(self.tokenizer),
                                                           eos_token=self.eos_id)
            return self._lltok

    def _engine(self, grammar: str, constraint: Constraint, prefix: str = "") -> GrammarEngine:
        try:
            return GrammarEngine(grammar, self._lltokenizer(), self.vocab_size, self.eos_id, constraint.describe(),
                                 closing_tokens(self.bytes))
        except DLMError as e:
            raise ConstraintError(f"{prefix}: {_short(str(e))}" if prefix else _short(str(e))) from None


S_WHITESPACE = r"[ ]?"  # between JSON tokens: compact output, a small DFA


# Single characters in the order a closing search tries them: what ends strings, objects, lists
# and calls first, then separators, digits (a short value), letters, the rest.
_CLOSE_ORDER = '"}])>\'.,:;0123456789' + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ -_/+#@!?*&%$=^|~`<({["


def closing_tokens(table: Sequence[Optional[bytes]]) -> list[tuple[int, str]]:
    """(token id, character) of single printable characters, in _CLOSE_ORDER (for
    GrammarEngine.close_path)."""
    ids = {b.decode(): i for i, b in enumerate(table) if b is not None and len(b) == 1 and 32 <= b[0] < 127}
    return [(ids[c], c) for c in _CLOSE_ORDER if c in ids]


def _limits():
    from dlm.constraints.grammar import parser_limits

    return parser_limits()


def _short(msg: str, n: int = 300) -> str:
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def regex_size(source: str, limit: int = 10**9) -> Optional[int]:
    """Symbols of the regex with every counted repetition unrolled (a proxy for its automaton's
    size; at least its length, which is returned as is past `limit`); None when Python's parser
    does not read this regex dialect."""
    import re._parser as sre  # noqa: PLC2701 - the standard library's own regex parser

    if len(source) > limit:
        return len(source)
    try:
        tree = sre.parse(source)
    except Exception:
        return None

    def size(items) -> int:
        total = 0
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, sub = av
                reps = lo + 1 if hi == sre.MAXREPEAT else hi
                total += max(1, reps) * size(sub)
            elif name == "SUBPATTERN":
                total += size(av[-1])
            elif name == "BRANCH":
                total += sum(size(b) for b in av[1])
            elif name in ("ATOMIC_GROUP",):
                total += size(av)
            else:
                total += 1
            if total > limit:
                return total
        return total

    return size(tree)
