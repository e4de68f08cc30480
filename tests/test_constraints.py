"""Grammar-constrained decoding: the DINGO dynamic program against brute force, the per-slot
allowed sets, and property tests (hypothesis) that every output of the decoder is in the
language, checked by independent oracles (re.fullmatch, jsonschema, lark).

    python -m pytest tests/test_constraints.py -q
"""

import itertools
import json
import os
import random
import re

import jsonschema
import lark
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dlm.constraints import Constraint, ConstraintCompiler, TokenDFA, make_constraint
from dlm.decoding import DecodeConfig, Decoder
from dlm.errors import DLMError
from dlm.model import DLMConfig, DLMModel
from dlm.tokenizer import train_tokenizer

# ------------------------------------------------------------------ the DP on tiny automata
EOS, MASK, NV = 1, 5, 6  # tokens 0..4 (1 = EOS), 5 = MASK


def random_dfa(rng: random.Random, n_states: int = 4) -> TokenDFA:
    trans = {}
    for s in range(n_states):
        trans[s] = {t: rng.randrange(n_states) for t in (0, 2, 3, 4) if rng.random() < 0.6}
    finals = [s for s in range(n_states) if rng.random() < 0.4] or [n_states - 1]
    return TokenDFA(trans, 0, finals, NV, EOS)


def valid(dfa: TokenDFA, seq) -> bool:
    """Slow reference: walk the sequence; EOS from an accepting state ends it (the rest is free)."""
    return valid_from(dfa, dfa.initial, seq)


def brute(dfa, slots, committed, scores, left_after):
    """Best total score over all completions (every MASK slot and the free tail enumerated)."""
    open_slots = [i for i, t in enumerate(slots) if t == MASK]
    best = None
    for fill in itertools.product(range(5), repeat=len(open_slots) + left_after):
        seq = list(slots)
        for i, t in zip(open_slots, fill):
            seq[i] = t
        seq += list(fill[len(open_slots):])
        if not valid(dfa, seq):
            continue
        total = sum(float(scores[i][seq[i]]) for i in committed)
        if best is None or total > best + 1e-12:
            best = total
    return best


def twin_dfa(rng: random.Random, n_states: int = 4) -> TokenDFA:
    """Like random_dfa, but tokens 2 and 4 often share their table column (one token class)."""
    trans = {}
    for s in range(n_states):
        trans[s] = {t: rng.randrange(n_states) for t in (0, 2, 3) if rng.random() < 0.6}
        if 2 in trans[s] and rng.random() < 0.8:
            trans[s][4] = trans[s][2]
    finals = [s for s in range(n_states) if rng.random() < 0.4] or [n_states - 1]
    return TokenDFA(trans, 0, finals, NV, EOS)


@pytest.fixture(params=["dense", "sparse"])
def reach(request, monkeypatch):
    """One-token reachability as a dense S x S matrix (small automata) or an edge list (large)."""
    import dlm.constraints.regular as regular

    if request.param == "sparse":
        monkeypatch.setattr(regular, "DENSE_SUCC_MAX_STATES", 0)
        monkeypatch.setattr(regular, "POW_MAX_STATES", 0)
    return request.param


@pytest.mark.parametrize("make", [random_dfa, twin_dfa])
@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force(seed, make, reach):
    rng = random.Random(seed)
    dfa = make(rng)
    assert (dfa.succ is None) == (reach == "sparse")
    n = rng.randint(1, 6)
    slots = [MASK if rng.random() < 0.7 else rng.choice([0, 2, 3, 4, EOS]) for _ in range(n)]
    open_slots = [i for i, t in enumerate(slots) if t == MASK]
    committed = [i for i in open_slots if rng.random() < 0.6]
    left_after = rng.randint(0, 2)
    g = torch.Generator().manual_seed(seed)
    scores = {i: torch.randn(NV, generator=g, dtype=torch.float64) for i in committed}
    for s in scores.values():
        s[MASK] = float("-inf")
    want = brute(dfa, slots, committed, scores, left_after)
    got = dfa.best_assignment(dfa.initial, slots, MASK, left_after, scores)
    sets = dfa.state_sets(dfa.initial, slots, MASK, left_after)  # what the chooser passes in
    assert dfa.best_assignment(dfa.initial, slots, MASK, left_after, scores, sets) == got
    if want is None:
        assert got is None
        return
    assert got is not None and set(got) == set(committed)
    assert sum(float(scores[i][t]) for i, t in got.items()) == pytest.approx(want)
    # and the assignment really is completable
    filled = [got.get(i, t) for i, t in enumerate(slots)]
    assert brute(dfa, filled, [], {}, left_after) is not None


def test_token_classes_pick_each_class_best_token():
    """Tokens with equal table columns form a class; the DP's candidates are each class's best
    token (the lowest id among ties), classes with only forbidden tokens left out."""
    rng = random.Random(3)
    for _ in range(30):
        dfa = twin_dfa(rng)
        k = dfa._classes()
        t = np.asarray(dfa.table)
        for a in range(NV):
            for b in range(NV):
                assert (k.cls_of[a] == k.cls_of[b]) == bool((t[:, a] == t[:, b]).all())
        v = np.array([rng.choice([0.0, 1.0, -np.inf]) for _ in range(NV)])
        toks, best = dfa._class_best(v)
        want = {}
        for tok in range(NV):
            c = k.cls_of[tok]
            if np.isfinite(v[tok]) and (c not in want or v[tok] > v[want[c]]):
                want[c] = tok
        assert sorted(want.values()) == toks.tolist() and best.tolist() == [v[x] for x in toks]


@pytest.mark.parametrize("make", [random_dfa, twin_dfa])
@pytest.mark.parametrize("seed", range(25))
def test_allowed_sets_equal_brute_force(seed, make, reach):
    rng = random.Random(100 + seed)
    dfa = make(rng)
    n = rng.randint(1, 6)
    slots = [MASK if rng.random() < 0.7 else rng.choice([0, 2, 3, 4]) for _ in range(n)]
    left_after = rng.randint(0, 2)
    query = [i for i, t in enumerate(slots) if t == MASK]
    got = dfa.allowed(dfa.initial, slots, MASK, left_after, query)
    for j, i in enumerate(query):
        for v in range(5):
            trial = list(slots)
            trial[i] = v
            assert bool(got[j, v]) == (brute(dfa, trial, [], {}, left_after) is not None), (slots, i, v)


def test_distances_are_shortest_paths_to_acceptance():
    rng = random.Random(7)
    for _ in range(10):
        dfa = random_dfa(rng)
        for k in range(4):
            for q in range(dfa.num_states - 2):
                reach = any(valid_from(dfa, q, seq) for seq in itertools.product(range(5), repeat=k))
                assert (int(dfa.dist[q]) <= k) == reach


def valid_from(dfa, q, seq):
    for t in seq:
        if q == dfa.done:
            continue
        q = int(dfa.table[q, t])
        if q == dfa.dead:
            return False
    return bool(dfa.accepting[q])


# ------------------------------------------------------------------ a real tokenizer and models
WORDS = ('the cat sat on 12 mats ; {"name": "bob", "age": 42, "ok": true} [1, 2, 3] yes no maybe '
         "alice@example.com (1+2)*3 hello world").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(300)]
    d = tmp_path_factory.mktemp("ctok")
    train_tokenizer(texts, d, vocab_size=300)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def compiler(tok):
    return ConstraintCompiler(tok, len(tok))


def tiny_model(tok, objective="mdlm", block_size=None, seed=0):
    torch.manual_seed(seed)
    cfg = DLMConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=256,
                    objective=objective, block_size=block_size or 0,
                    num_decoder_layers=1 if objective == "e2d2" else 0)
    model = DLMModel(cfg)
    with torch.no_grad():  # sharper random logits: the unconstrained model would rarely be valid
        model.lm_head.weight.mul_(20) if hasattr(model, "lm_head") else None
    return model


# (\d, \w, \s follow the Rust regex crate's Unicode tables, newer than Python's: U+1E5F2 is a digit
# there and not in Python 3.11's re, so the oracle comparison uses ASCII classes.)
REGEXES = [r"[0-9]{3}-[a-z]+", r"(yes|no)", r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5})*", r"-?[0-9]+(\.[0-9]+)?",
           r'"[a-z ]{0,10}"', r"[a-z]+@[a-z]+\.(com|org)"]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b", "c"]}},
     "required": ["ok"]},
    {"type": "string", "pattern": "^[a-z]{2,4}$"},
]
GRAMMARS = [
    'start: expr\nexpr: NUM | "(" expr "+" expr ")"\nNUM: /[0-9]+/\n',
    'start: "[" item ("," item)* "]"\nitem: WORD | NUM\nWORD: /[a-z]+/\nNUM: /[0-9]+/\n',
]
CHOICES = [["yes", "no", "maybe so"], ["alice@example.com", "bob"]]


def oracle(kind, spec):
    if kind == "regex":
        return lambda text: re.fullmatch(spec, text) is not None
    if kind == "choice":
        return lambda text: text in spec
    if kind == "json":
        def check(text):
            try:
                jsonschema.validate(json.loads(text), spec)
                return True
            except (json.JSONDecodeError, jsonschema.ValidationError):
                return False
        return check
    parser = lark.Lark(spec, start="start")

    def parses(text):
        try:
            parser.parse(text)
            return True
        except lark.exceptions.LarkError:
            return False
    return parses


def constraint_of(kind, spec):
    return {"regex": Constraint.regex, "json": Constraint.json_schema, "choice": Constraint.choice,
            "grammar": Constraint.grammar}[kind](spec)


SUITE = [("regex", r) for r in REGEXES] + [("json", s) for s in SCHEMAS] + \
        [("grammar", g) for g in GRAMMARS] + [("choice", c) for c in CHOICES]


# CI runs a fixed set of examples; DLM_PROPERTY_EXAMPLES=500 DLM_PROPERTY_RANDOM=1 hunts for more.
@settings(max_examples=int(os.environ.get("DLM_PROPERTY_EXAMPLES", "30")), deadline=None,
          derandomize=not os.environ.get("DLM_PROPERTY_RANDOM"), database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(SUITE), unmask=st.sampled_from(["confidence", "threshold", "random", "margin",
                                                             "entropy", "factor", "ancestral",
                                                             "first_hitting"]),
       block=st.sampled_from([None, 4, 8]), seed=st.integers(0, 10_000), temperature=st.sampled_from([0.0, 1.0]),
       model_seed=st.integers(0, 3))
def test_every_output_is_in_the_language(tok, compiler, case, unmask, block, seed, temperature, model_seed):
    kind, spec = case
    compiled = compiler.compile(constraint_of(kind, spec))
    model = tiny_model(tok, seed=model_seed)
    cfg = DecodeConfig(max_new_tokens=24, block_length=block, unmask=unmask, threshold=0.6, temperature=temperature,
                       seed=seed)
    prompts = [tok.encode("the cat"), tok.encode("hello world ; [1, 2")]
    results = Decoder(model).generate(prompts, cfg, constraints=[compiled, compiled])
    check = oracle(kind, spec)
    for r in results:
        text = tok.decode(r.tokens)
        assert r.finish_reason == "stop" or r.tokens, r
        assert check(text), (kind, spec, text)
        assert compiled.accepts(r.tokens)


@pytest.mark.parametrize("objective,block_size,cache", [("mdlm", None, "prefix"), ("mdlm", None, "dual"),
                                                         ("bd3lm", 8, "exact"), ("e2d2", 8, "exact"),
                                                         ("bd3lm", 8, "none")])
@pytest.mark.parametrize("kind,spec", [SUITE[0], SUITE[len(REGEXES)], ("grammar", GRAMMARS[1])])
def test_constraints_compose_with_caches_and_block_models(tok, compiler, objective, block_size, cache, kind, spec):
    model = tiny_model(tok, objective, block_size)
    compiled = compiler.compile(constraint_of(kind, spec))
    cfg = DecodeConfig(max_new_tokens=24, block_length=8 if objective == "mdlm" else None, unmask="threshold",
                       threshold=0.5, cache=cache)
    prompts = [tok.encode("the cat sat"), tok.encode("the cat sat")]
    results = Decoder(model).generate(prompts, cfg, constraints=[compiled, None])
    assert oracle(kind, spec)(tok.decode(results[0].tokens))
    assert results[0].stats["constraint_s"] > 0


@pytest.mark.parametrize("scope", ["block", "answer"])
@pytest.mark.parametrize("kind,spec", [("regex", REGEXES[0]), ("json", SCHEMAS[0]), ("grammar", GRAMMARS[0])])
def test_early_commit_fills_validly(tok, compiler, scope, kind, spec):
    model = tiny_model(tok)
    compiled = compiler.compile(constraint_of(kind, spec))
    cfg = DecodeConfig(max_new_tokens=24, block_length=8, early_commit=True, early_commit_scope=scope,
                       early_commit_gaps=(0.0, 0.0, 0.0))  # always fires
    res = Decoder(model).generate([tok.encode("the cat")], cfg, constraints=[compiled])[0]
    assert oracle(kind, spec)(tok.decode(res.tokens))
    assert res.stats["nfe"] <= 3  # one forward per block: early commit did fire


def test_unconstrained_rows_are_untouched(tok, compiler):
    model = tiny_model(tok)
    cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.5)
    p = [tok.encode("the cat")]
    alone = Decoder(model).generate(p, cfg)[0].tokens
    mixed = Decoder(model).generate(p + p, cfg, constraints=[None, compiler.compile(Constraint.regex("(yes|no)"))])
    assert mixed[0].tokens == alone
    assert tok.decode(mixed[1].tokens) in ("yes", "no")


def test_constrained_outputs_are_reproducible_per_seed(tok, compiler):
    model = tiny_model(tok)
    c = compiler.compile(Constraint.json_schema(SCHEMAS[0]))
    cfg = DecodeConfig(max_new_tokens=24, temperature=1.0, unmask="threshold", threshold=0.5)
    a = Decoder(model).generate([tok.encode("x")] * 2, cfg, seeds=[5, 6], constraints=[c, c])
    b = Decoder(model).generate([tok.encode("x")], cfg, seeds=[6], constraints=[c])
    assert a[1].tokens == b[0].tokens


def test_compile_results_are_cached(tok, compiler):
    c = Constraint.regex(r"[0-9]{2,5}x")
    first = compiler.compile(c)
    assert compiler.compile(Constraint.regex(r"[0-9]{2,5}x")) is first
    assert ConstraintCompiler(tok, len(tok)).compile(c) is first  # same tokenizer, new compiler


def test_bad_constraints_get_clear_errors(tok, compiler):
    with pytest.raises(DLMError, match="invalid regex"):
        Constraint.regex("[a-z")
    with pytest.raises(DLMError, match="invalid JSON schema"):
        Constraint.json_schema({"type": "strin"})
    with pytest.raises(DLMError, match="not valid JSON"):
        Constraint.json_schema("{nope")
    with pytest.raises(DLMError, match="does not compile"):
        compiler.compile(Constraint.grammar("start: foo bar ::: ("))
    with pytest.raises(DLMError, match="list of non-empty strings"):
        Constraint.choice([])
    with pytest.raises(DLMError, match="at most one constraint"):
        make_constraint(regex="a", choice=["b"])
    model = tiny_model(tok)
    c = compiler.compile(Constraint.regex("[a-z]{40}"))
    with pytest.raises(DLMError, match="cannot be satisfied within 4 tokens: its shortest valid output has 6"):
        Decoder(model).generate([tok.encode("x")], DecodeConfig(max_new_tokens=4), constraints=[c])
    g = compiler.compile(Constraint.grammar('start: "((((x))))"\n'))
    with pytest.raises(DLMError, match="satisfies the constraint"):
        Decoder(model).generate([tok.encode("x")], DecodeConfig(max_new_tokens=2), constraints=[g])
    with pytest.raises(DLMError, match="one per prompt"):
        Decoder(model).generate([tok.encode("x")], DecodeConfig(max_new_tokens=4), constraints=[c, c])


def test_unsupported_schema_is_refused_with_the_reason(compiler):
    with pytest.raises(DLMError, match="unsupported JSON schema"):  # lookahead: no regular engine has it
        compiler.compile(Constraint.json_schema({"type": "string", "pattern": "^(?=a)[a-z]+$"}))
