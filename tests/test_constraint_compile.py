"""Constraint compilation under budgets, JSON Schema preparation, and the final check.

Real-world schemas must never hang a server or return an invalid output: large bounds go to the
grammar engine in well under a second, a token automaton that builds too long is stopped, the
schema rewrites only ever make a schema stricter, and what stays approximate is caught by the
final check against the original schema.

    python -m pytest tests/test_constraint_compile.py -q
"""

import json
import random
import sys

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from dlm.constraints import (
    CompileLimits,
    Constraint,
    ConstraintCompiler,
    ConstraintError,
    ConstraintUnsatisfiable,
    ConstraintViolation,
)
from dlm.constraints import schema as S
from dlm.constraints.compile import regex_size
from dlm.decoding import DecodeConfig, Decoder
from dlm.errors import DLMError
from dlm.model import DLMConfig, DLMModel
from dlm.tokenizer import train_tokenizer

WORDS = ('the cat sat on 12 mats ; {"name": "bob", "age": 42, "ok": true} [1, 2, 3] yes no maybe '
         "alice@example.com 2024-01-31T10:00:00Z http://a.org/x #ffaa00 hello world").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(300)]
    d = tmp_path_factory.mktemp("cctok")
    train_tokenizer(texts, d, vocab_size=300)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = DLMConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    m = DLMModel(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def compiler_for(tok, **limits):
    return ConstraintCompiler(tok, len(tok), limits=CompileLimits(**limits) if limits else None)


def decode(model, tok, compiled, n=48, seed=0, **kw):
    cfg = DecodeConfig(max_new_tokens=n, unmask="threshold", threshold=0.5, block_length=kw.pop("block_length", 16),
                       seed=seed, **kw)
    res = Decoder(model).generate([tok.encode("json:")], cfg, constraints=[compiled], raise_errors=False)[0]
    if res.error is not None and not isinstance(res.error, ConstraintViolation):
        raise res.error
    return res, tok.decode(res.tokens, skip_special_tokens=True)


def valid(text, schema):
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


# ------------------------------------------------------------------ budgets
@pytest.mark.timeout(120)  # it used to hang the server: a guard, not a speed test
def test_large_bounds_compile_fast_on_the_grammar_engine_and_decode_validly(tok, model):
    c = compiler_for(tok)
    for schema in ({"type": "object", "properties": {"a": {"type": "string", "maxLength": 32767}}, "required": ["a"]},
                   {"type": "array", "items": {"type": "integer"}, "maxItems": 5000},
                   {"type": "string", "minLength": 3, "maxLength": 3000}):
        compiled = c.compile(Constraint.json_schema(schema))  # no automaton over the bound is built
        assert compiled.route.startswith("grammar"), compiled.route
        res, text = decode(model, tok, compiled)
        assert valid(text, schema), (schema, text)


def test_a_bound_no_output_of_max_tokens_can_meet_fails_at_the_first_step(tok, model):
    compiled = compiler_for(tok).compile(Constraint.json_schema({"type": "array", "minItems": 100}))
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConstraintUnsatisfiable, match="no output of 48 tokens"):
            decode(model, tok, compiled)
    finally:
        hook.remove()
    assert len(calls) == 1  # refused at its first step, not after decoding into a dead end


def test_a_slow_automaton_build_is_stopped_at_its_budget(tok, model):
    """(a|b)*a(a|b){14}: a small regex whose token DFA has 2^15 states. With a 0.3 s budget the
    build is stopped (its child process killed) and the grammar engine takes the constraint; the
    next build gets a fresh child."""
    c = compiler_for(tok, timeout_s=0.3, max_dfa_mb=1024)
    regex = "(a|b)*a(a|b){14}"
    assert regex_size(regex) < 1000  # the size estimate does not see it coming
    compiled = c.compile(Constraint.regex(regex))
    assert compiled.route in ("grammar (timeout)", "grammar (too_large)"), compiled.route
    assert c.compile(Constraint.regex("[0-9]{2}")).route == "dfa"  # the builder still works


def test_dfa_state_budget_sends_large_automata_to_the_grammar_engine(tok):
    c = compiler_for(tok, max_dfa_mb=0.01)
    compiled = c.compile(Constraint.regex("[a-z]{1,40}"))
    assert compiled.route == "grammar (too_large)"
    assert compiled.accepts(tok.encode("abc"))


def test_compiles_are_shared_and_cached(tok):
    from concurrent.futures import ThreadPoolExecutor

    c = compiler_for(tok)
    con = Constraint.json_schema({"type": "object", "properties": {"q": {"enum": ["x", "y", "zz"]}}})
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda _: c.compile(con), range(8)))
    assert all(g is got[0] for g in got)


def test_regex_size_unrolls_counted_repetitions():
    assert regex_size("a{10}") == 10
    assert regex_size("(ab){3}c") == 7
    assert regex_size("(a|bc){2,5}") == 15
    assert regex_size("x" * 50, limit=20) == 50


# ------------------------------------------------------------------ schema preparation
def test_array_with_object_keywords_stays_an_array(tok, model):
    """The issue's case: {"type": "array", "properties": {}, "additionalProperties": false}
    produced `{ }`. Object keywords say nothing about an array."""
    schema = {"type": "array", "properties": {}, "additionalProperties": False}
    assert S.prepare(schema).schema == {"type": "array"}
    compiled = compiler_for(tok).compile(Constraint.json_schema(schema))
    for seed in range(3):
        _, text = decode(model, tok, compiled, seed=seed, temperature=1.0)
        assert isinstance(json.loads(text), list), text


def test_unknown_formats_are_annotations_and_others_get_valid_subsets():
    p = S.prepare({"type": "object", "properties": {"t": {"type": "string", "format": "topic"},
                                                    "u": {"type": "string", "format": "uri-reference"},
                                                    "j": {"type": "string", "format": "json-pointer"}},
                   "x-vendor": 1, "nullable": True})
    props = p.schema["properties"]
    assert props["t"] == {"type": "string"}
    assert props["u"] == {"type": "string", "format": "uri"}
    assert "pattern" in props["j"] and "format" not in props["j"]
    assert "x-vendor" not in p.schema and "nullable" not in p.schema and not p.approximate


@pytest.mark.parametrize("fmt", sorted(set(S.ENGINE_FORMATS) | set(S.FORMAT_SUBSET)))
def test_every_format_decodes_to_values_the_format_checker_accepts(tok, model, fmt):
    schema = {"type": "string", "format": fmt}
    compiled = compiler_for(tok).compile(Constraint.json_schema(schema))
    for seed in range(3):  # the engines' own formats and dlm's patterns: every value passes the checker
        res, text = decode(model, tok, compiled, n=64, seed=seed, temperature=1.0)
        assert res.error is None and valid(text, schema), (fmt, text, res.error)


def test_not_is_rewritten_where_it_can_be():
    p = S.prepare({"type": ["string", "null"], "not": {"type": "null"}})
    assert p.schema["type"] == "string" and not p.approximate
    p = S.prepare({"type": "object", "properties": {"a": {"type": "integer"}}, "not": {"required": ["a"]}})
    assert p.schema["properties"]["a"] is False and not p.approximate
    p = S.prepare({"enum": ["x", "y", "z"], "not": {"const": "y"}})
    assert p.schema["enum"] == ["x", "z"]
    p = S.prepare({"type": "boolean", "not": {"const": True}})
    assert p.schema["enum"] == [False]
    p = S.prepare({"type": ["string", "integer", "null"], "not": {"anyOf": [{"type": "null"}, {"type": "integer"}]}})
    assert p.schema["type"] == "string"
    p = S.prepare({"type": "string", "not": {"pattern": "^a"}})  # no positive form: checked at the end
    assert "not" not in json.dumps(p.schema) and p.approximate == ["not"]
    # oneOf with a branch that holds for every value: no other branch may hold
    p = S.prepare({"oneOf": [{"type": "string"}, {"instanceof": "RegExp"}], "type": ["string", "number"]})
    assert p.schema == {"type": "number"} and not p.approximate
    # not (type and more) with values of another type allowed: leaving the type out is stricter
    p = S.prepare({"type": ["string", "array"], "not": {"type": "array", "minItems": 1}})
    assert p.schema["type"] == "string" and not p.approximate
    # ... and with only that type allowed, the rest is what is negated
    p = S.prepare({"type": "object", "properties": {"a": {}}, "not": {"type": "object", "required": ["a"]}})
    assert p.schema["properties"]["a"] is False
    # a property whose schema nothing satisfies is a property that must be absent
    p = S.prepare({"type": "object", "properties": {"gone": {"not": {}}}})
    assert p.schema["properties"]["gone"] is False
    with pytest.raises(DLMError, match="no value satisfies"):
        S.prepare({"not": {}})


def test_property_counts_become_required_and_closed_objects():
    props = {k: {"type": "integer"} for k in "abcd"}
    p = S.prepare({"type": "object", "properties": props, "minProperties": 2})
    assert p.schema["required"] == ["a", "b"] and not p.approximate
    p = S.prepare({"type": "object", "properties": props, "required": ["c"], "maxProperties": 2})
    assert set(p.schema["properties"]) == {"a", "c"} and p.schema["additionalProperties"] is False
    # too many required properties: the subschema accepts nothing (false where it is optional)
    p = S.prepare({"type": "object", "properties": {"x": {"type": "object", "properties": props, "required": list("abc"),
                                                          "maxProperties": 2}}})
    assert p.schema["properties"]["x"] is False
    with pytest.raises(DLMError, match="no value satisfies"):
        S.prepare({"type": "object", "properties": props, "required": list("abc"), "maxProperties": 2})


def test_conditionals_and_dependencies_become_stricter_positive_forms():
    p = S.prepare({"type": "object", "if": {"properties": {"k": {"const": "x"}}}, "then": {"required": ["v"]},
                   "else": {"required": ["w"]}})
    assert p.schema["allOf"] == [{"properties": {"k": {"const": "x"}}}, {"required": ["v"]}] and not p.approximate
    p = S.prepare({"type": "object", "properties": {"a": {}, "b": {}, "c": {}, "d": {}}, "required": ["a"],
                   "dependencies": {"a": ["b"], "c": {"required": ["a"]}}, "dependentSchemas": {"d": False}})
    assert p.schema["required"] == ["a", "b"] and p.schema["allOf"] == [{"required": ["a"]}]
    assert p.schema["properties"]["d"] is False and not p.approximate
    with pytest.raises(DLMError, match="no value satisfies"):  # d required, and forbidden by its dependency
        S.prepare({"type": "object", "required": ["d"], "dependentSchemas": {"d": False}})


def test_refs_into_rewritten_places_keep_their_targets(tok):
    """A $ref to `#/allOf/0/then/...` must survive the rewriting of if / then (the target is
    copied to $defs first); contradicting conditionals fall back to the final check."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#/allOf/0/then/properties/v"}},
              "allOf": [{"if": {"properties": {"k": {"const": "x"}}}, "then": {"properties": {"v": {"type": "integer"}}}}]}
    p = S.prepare(schema)
    assert p.schema["properties"]["a"] == {"$ref": "#/$defs/__dlm_ref_0"}
    assert p.schema["$defs"]["__dlm_ref_0"] == {"type": "integer"}
    compiled = compiler_for(tok).compile(Constraint.json_schema(schema))
    assert compiled.check(tok.encode('{"a":5}')) is None and compiled.check(tok.encode('{"a":"s"}')) is not None
    union = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}}, "required": ["kind"],
             "allOf": [{"if": {"properties": {"kind": {"const": "a"}}}, "then": {"required": ["x"]}},
                       {"if": {"properties": {"kind": {"const": "b"}}}, "then": {"required": ["y"]}}]}
    compiled = compiler_for(tok).compile(Constraint.json_schema(union))  # kind = a and kind = b: no
    assert set(compiled.approximate) >= {"if", "then"}


def test_ref_siblings_follow_the_draft():
    defs = {"definitions": {"n": {"type": "integer"}}}
    old = S.prepare({"$schema": "http://json-schema.org/draft-07/schema#", **defs, "$ref": "#/definitions/n",
                     "minimum": 3})
    assert "minimum" not in json.dumps(old.schema)  # draft 7: siblings of $ref are ignored
    new = S.prepare({**defs, "$ref": "#/definitions/n", "minimum": 3})
    assert new.schema["allOf"] == [{"$ref": "#/definitions/n"}, {"minimum": 3}]


def test_overlapping_one_of_is_approximate_and_the_final_check_guards_it(tok, model):
    schema = {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}  # 5 matches both
    compiled = compiler_for(tok).compile(Constraint.json_schema(schema))
    assert "oneOf" in compiled.approximate
    assert compiled.check(tok.encode("5")) is not None  # valid under both branches: not oneOf
    assert compiled.check(tok.encode("-5")) is None


def test_an_output_that_misses_an_approximate_keyword_fails_its_request_alone(tok, model):
    """uniqueItems with two or more items is not enforced while decoding: items that can only
    be 1 give [1,1], which the final check refuses; the request beside it is unaffected."""
    schema = {"type": "array", "items": {"const": 1}, "minItems": 2, "maxItems": 2, "uniqueItems": True}
    c = compiler_for(tok)
    bad = c.compile(Constraint.json_schema(schema))
    good = c.compile(Constraint.regex("(yes|no)"))
    cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.5)
    prompts = [tok.encode("a"), tok.encode("b")]
    res = Decoder(model).generate(prompts, cfg, constraints=[bad, good], raise_errors=False)
    assert res[0].finish_reason == "error" and isinstance(res[0].error, ConstraintViolation)
    assert "uniqueItems" in str(res[0].error) and res[0].tokens == []
    assert tok.decode(res[1].tokens) in ("yes", "no") and res[1].error is None
    with pytest.raises(ConstraintViolation):
        Decoder(model).generate(prompts[:1], cfg, constraints=[bad])


def test_unsupported_constructs_are_refused_with_their_reason(tok):
    c = compiler_for(tok)
    with pytest.raises(ConstraintError, match="unsupported JSON schema"):
        c.compile(Constraint.json_schema({"$ref": "#/definitions/missing"}))
    with pytest.raises(DLMError, match="invalid JSON schema"):
        Constraint.json_schema({"type": 5})


def test_witness_search_is_iterative_on_long_canvases(tok, model):
    """A 1,500-slot canvas: no recursion limit hit, and the process-wide limit is untouched."""
    limit = sys.getrecursionlimit()
    compiled = compiler_for(tok).compile(Constraint.grammar('start: "[" ITEM ("," ITEM)* "]"\nITEM: /[a-z]/\n'))
    w = compiled.engine.witness([model.config.mask_token_id] * 1500, model.config.mask_token_id, {}, None)
    assert w is not None and len(w) == 1500 and compiled.accepts(w)
    assert sys.getrecursionlimit() == limit
