"""JSON Schema, prepared for the engines, and the final check of every output.

Real-world schemas (JSONSchemaBench's GitHub, Kubernetes, API schemas) use more than either
engine enforces literally. `prepare` rewrites a schema into one the engines enforce *exactly or
more strictly*, so every output they produce is valid under the original:

* Annotations stay annotations: unknown keywords (`nullable`, `instanceof`, ...) and unknown
  `format`s are dropped (the JSON Schema spec says unknown formats annotate, they do not
  validate); formats the engines lack get a pattern that only accepts valid values
  (`uri-reference` -> a `uri`, `json-pointer` -> its grammar, ...).
* Keywords that cannot apply are dropped: under `"type": "array"`, `properties` says nothing
  (outlines-core would otherwise build an object).
* `not` is rewritten where it can be expressed: `not type`, `not required` (the property is
  left out), `not const / enum` over booleans, null or a sibling `enum`, and `not anyOf`
  (De Morgan). `uniqueItems` with at most one item required becomes "at most one item".

Whatever remains approximate (`not` of another shape, `uniqueItems` with two or more items,
`oneOf` with overlapping branches, keywords llguidance does not implement) is listed in
`Prepared.approximate`: decoding enforces the rest, and `check_json` validates the final output
against the *original* schema with format checking, so an output that misses is never returned
as valid (the request fails with the reason instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from dlm.errors import DLMError

# Every keyword of drafts 4 to 2020-12 (others are annotations, dropped before compiling).
KEYWORDS = {
    "$schema", "$id", "id", "$ref", "$defs", "definitions", "$comment", "$anchor", "$dynamicRef", "$dynamicAnchor",
    "$recursiveRef", "$recursiveAnchor", "$vocabulary", "type", "enum", "const", "properties", "required",
    "additionalProperties", "patternProperties", "minProperties", "maxProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties", "items", "prefixItems",
    "additionalItems", "minItems", "maxItems", "uniqueItems", "contains", "minContains", "maxContains",
    "unevaluatedItems", "minLength", "maxLength", "pattern", "format", "contentEncoding", "contentMediaType",
    "contentSchema", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "allOf", "anyOf",
    "oneOf", "not", "if", "then", "else", "title", "description", "default", "examples", "deprecated", "readOnly",
    "writeOnly",
}
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
SCHEMA_ONE = ("additionalProperties", "additionalItems", "contains", "propertyNames", "not", "if", "then", "else",
              "unevaluatedItems", "unevaluatedProperties", "contentSchema")
SCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
TYPE_KEYWORDS = {
    "object": {"properties", "additionalProperties", "required", "patternProperties", "minProperties",
               "maxProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
               "unevaluatedProperties"},
    "array": {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems", "contains",
              "minContains", "maxContains", "unevaluatedItems"},
    "string": {"minLength", "maxLength", "pattern", "format", "contentEncoding", "contentMediaType", "contentSchema"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}
TYPE_KEYWORDS["integer"] = TYPE_KEYWORDS["number"]
TYPED = set().union(*TYPE_KEYWORDS.values())
ALL_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")

# Formats: llguidance enforces these itself (its values pass jsonschema's format checker: tested);
# the others become a pattern or format whose values all pass the checker (ASCII digits, days
# 01-28, an explicit offset: the engines' own date formats admit Unicode digits and 2024-02-31).
ENGINE_FORMATS = {"email", "hostname", "ipv4", "ipv6", "uri", "duration"}
_DATE = "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
FORMAT_SUBSET = {
    "date": {"pattern": f"^{_DATE}$"},
    "time": {"pattern": f"^{_TIME}$"},
    "date-time": {"pattern": f"^{_DATE}T{_TIME}$"},
    "uuid": {"pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"},
    "idn-email": {"format": "email"},
    "idn-hostname": {"format": "hostname"},
    "uri-reference": {"format": "uri"},
    "iri": {"format": "uri"},
    "iri-reference": {"format": "uri"},
    "json-pointer": {"pattern": "^(/([A-Za-z0-9_.-]|~[01])*)*$"},
    "relative-json-pointer": {"pattern": "^(0|[1-9][0-9]*)(#|(/([A-Za-z0-9_.-]|~[01])*)*)$"},
    "uri-template": {"pattern": "^[A-Za-z0-9._~:/?#@!$&()*+,;=-]*$"},
    "regex": {"pattern": "^[A-Za-z0-9 ]*$"},
    "color": {"pattern": "^#[0-9a-f]{6}$"},
}


class _Unsatisfiable(Exception):
    """A subschema no value satisfies: it becomes `false` (fine where it is optional)."""


ANNOTATIONS = {"title", "description", "$comment", "default", "examples", "deprecated", "readOnly", "writeOnly"}


@dataclass
class Prepared:
    schema: object  # what the engines compile
    approximate: list[str] = field(default_factory=list)  # keywords decoding does not enforce exactly


@dataclass
class _Ctx:
    approx: list[str]
    old_refs: bool  # drafts 3 to 7: the siblings of $ref are ignored
    strict: bool  # conditionals and dependencies as stricter positive forms (else: approximate)


def prepare(schema: Optional[dict], strict: bool = True) -> Prepared:
    """The schema the engines compile (see the module docstring). `strict=False`: if / then /
    else and dependencies are left to the final check instead of made unconditional (for the
    schemas where the unconditional forms contradict each other)."""
    if not schema:
        return Prepared({"type": "object"})
    ctx = _Ctx([], any(f"draft-0{d}" in str(schema.get("$schema", "")) for d in (3, 4, 6, 7)), strict)
    out = _walk(relocate_refs(_nested_schema_keys_dropped(json.loads(json.dumps(schema)))), ctx)
    if out is False:
        raise DLMError("no value satisfies this JSON schema (a `not`, `const` or property count excludes everything)")
    return Prepared(out, sorted(set(ctx.approx)))


def _nested_schema_keys_dropped(schema: dict) -> dict:
    """`$schema` below the root (common in schemas assembled from files) says nothing there, and
    beside a $ref it would count as a sibling."""
    def drop(node, root=False):
        if isinstance(node, dict):
            if not root:
                node.pop("$schema", None)
            for v in node.values():
                drop(v)
        elif isinstance(node, list):
            for v in node:
                drop(v)
        return node

    return drop(schema, root=True)


def relocate_refs(schema: dict) -> dict:
    """Local $refs into the middle of the schema (`#/allOf/8/then/properties/x`) would break when
    the rewrites move things: their targets are copied to `$defs` (as they are) and the refs
    point there. Refs to `#`, `#/$defs/NAME` and `#/definitions/NAME` stay."""
    if not isinstance(schema, dict):
        return schema
    names: dict[str, str] = {}
    todo: list[str] = []

    def fix(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/") and not _stable_ref(ref):
                if ref not in names:
                    names[ref] = f"__dlm_ref_{len(names)}"
                    todo.append(ref)
                node["$ref"] = f"#/$defs/{names[ref]}"
            for v in node.values():
                fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    original = json.loads(json.dumps(schema))
    fix(schema)
    if not todo:
        return schema
    defs = schema.setdefault("$defs", {}) if isinstance(schema.get("$defs", {}), dict) else None
    while todo and defs is not None:
        ref = todo.pop()
        target = _resolve(original, ref)
        target = json.loads(json.dumps(target)) if target is not None else {}
        fix(target)
        defs[names[ref]] = target
    return schema


def _stable_ref(ref: str) -> bool:
    parts = ref[2:].split("/")
    return len(parts) == 2 and parts[0] in ("$defs", "definitions")


def _resolve(doc, ref: str):
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _walk(node, ctx: _Ctx):
    """Rewrite one subschema (bottom-up over its subschemas); False when nothing satisfies it."""
    try:
        return _rewrite(node, ctx)
    except _Unsatisfiable:
        return False


def _rewrite(node, ctx: _Ctx):
    if not isinstance(node, dict):
        return node  # true / false
    node = {k: v for k, v in node.items() if k in KEYWORDS}
    if "$ref" in node:  # annotations beside a $ref say nothing (and llguidance refuses siblings in cycles)
        node = {k: v for k, v in node.items() if k not in ANNOTATIONS}
    if "$ref" in node and set(node) - {"$ref", "$defs", "definitions", "$schema", "$id", "id"}:
        if ctx.old_refs:  # drafts 3 to 7: the siblings of $ref are ignored
            node = {k: v for k, v in node.items() if k in ("$ref", "$defs", "definitions", "$schema", "$id", "id")}
        else:  # 2019-09 on: they apply beside it
            rest = {k: v for k, v in node.items() if k not in ("$defs", "definitions", "$schema", "$id", "id")}
            node = {k: v for k, v in node.items() if k in ("$defs", "definitions", "$schema", "$id", "id")}
            ref = rest.pop("$ref") if "$ref" in rest else None
            node["allOf"] = [{"$ref": ref}, rest]
    walk = lambda sub: _walk(sub, ctx)  # noqa: E731
    approx = ctx.approx
    for k in SCHEMA_MAPS:
        if isinstance(node.get(k), dict):
            node[k] = {name: walk(sub) for name, sub in node[k].items()}
    for k in SCHEMA_ONE:
        if isinstance(node.get(k), (dict, bool)):
            node[k] = walk(node[k])
    for k in SCHEMA_LIST:
        if isinstance(node.get(k), list):
            node[k] = [walk(sub) for sub in node[k]]
    if isinstance(node.get("items"), (dict, bool)):
        node["items"] = walk(node["items"])
    elif isinstance(node.get("items"), list):
        node["items"] = [walk(sub) for sub in node["items"]]
    _prune_by_type(node)
    _formats(node)
    if isinstance(node.get("pattern"), str):
        node["pattern"] = anchored(node["pattern"])
    if "if" in node or "then" in node or "else" in node:
        if ctx.strict:
            _conditional(node)
        else:
            approx += [k for k in ("if", "then", "else") if node.pop(k, None) is not None]
    if "dependencies" in node or "dependentRequired" in node or "dependentSchemas" in node:
        if ctx.strict:
            _dependencies(node)
        else:
            approx += [k for k in ("dependencies", "dependentRequired", "dependentSchemas")
                       if node.pop(k, None) is not None]
    if isinstance(node.get("oneOf"), list):
        _one_of_with_any(node)
    if "not" in node:
        _rewrite_not(node, approx)
    if "minProperties" in node or "maxProperties" in node:
        _property_counts(node, approx)
    if node.get("uniqueItems") is True:
        del node["uniqueItems"]
        if node.get("minItems", 0) <= 1:
            node["maxItems"] = min(node.get("maxItems", 1), 1)  # arrays of at most one item are unique
        else:
            approx.append("uniqueItems")
    elif "uniqueItems" in node:
        del node["uniqueItems"]
    return node


def anchored(pattern: str) -> str:
    """A JSON Schema pattern matches anywhere in the string; the engines generate whole strings
    that match it (stricter: such a string contains a match), which they do far more directly
    than `.*p.*`. Patterns with anchors inside are left alone."""
    core = pattern[1:] if pattern.startswith("^") else pattern
    if core.endswith("$") and not core.endswith("\\$"):
        core = core[:-1]
    if "^" in core.replace("[^", "").replace("\\^", "") or "$" in core.replace("\\$", ""):
        return pattern
    return f"^(?:{core})$"


def _types(node) -> Optional[list[str]]:
    t = node.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list) and all(isinstance(x, str) for x in t):
        return list(t)
    return None


def _prune_by_type(node: dict) -> None:
    types = _types(node)
    if types is None:
        return
    allowed = set().union(*(TYPE_KEYWORDS.get(t, set()) for t in types))
    for k in [k for k in node if k in TYPED and k not in allowed]:
        del node[k]


def _formats(node: dict) -> None:
    f = node.get("format")
    if f is None or (isinstance(f, str) and f in ENGINE_FORMATS):
        return
    del node["format"]  # unknown: an annotation
    sub = FORMAT_SUBSET.get(f) if isinstance(f, str) else None
    if sub is None:
        return
    if "format" in sub:
        node["format"] = sub["format"]
    elif "pattern" not in node:
        node["pattern"] = sub["pattern"]
    else:  # both must hold
        node["allOf"] = [*node.get("allOf", []), {"pattern": sub["pattern"]}]


def _conditional(node: dict) -> None:
    """if / then / else -> allOf [if, then]: values that meet the condition and its consequence
    satisfy the whole (stricter: the else-branch is never taken)."""
    cond, then = node.pop("if", True), node.pop("then", True)
    node.pop("else", None)
    if cond is not True or then is not True:
        node["allOf"] = [*node.get("allOf", []), *[x for x in (cond, then) if x is not True]]


def _dependencies(node: dict) -> None:
    """Property dependencies -> always required; schema dependencies -> always applied. Both
    stricter than "when the property is present", never looser."""
    deps = {}
    for k in ("dependencies", "dependentRequired", "dependentSchemas"):
        if isinstance(node.get(k), dict):
            deps.update(node.pop(k))
        else:
            node.pop(k, None)
    required = list(node.get("required") or [])
    for name, sub in deps.items():
        if isinstance(sub, list):
            required += [r for r in sub if isinstance(r, str) and r not in required]
        elif sub is False:  # the property may not be present at all
            if name in required:
                raise _Unsatisfiable()
            node["properties"] = {**(node.get("properties") or {}), name: False}
        elif isinstance(sub, dict):
            node["allOf"] = [*node.get("allOf", []), sub]
    if required:
        node["required"] = required


def _one_of_with_any(node: dict) -> None:
    """oneOf with a branch every value satisfies (often one whose keywords were all unknown,
    like {"instanceof": "RegExp"}): exactly one branch holds iff no other branch does."""
    def anything(b):
        return b is True or (isinstance(b, dict) and not set(b) - ANNOTATIONS)

    branches = node["oneOf"]
    trivial = [b for b in branches if anything(b)]
    if not trivial:
        return
    if len(trivial) > 1:
        raise _Unsatisfiable()  # two branches always hold: never exactly one
    others = [b for b in branches if not anything(b)]
    trial = {k: v for k, v in node.items() if k != "oneOf"}
    if not others:
        node.pop("oneOf")
    elif all(isinstance(b, dict) for b in others) and _negate(trial, {"anyOf": others}):
        node.clear()
        node.update(trial)


def _rewrite_not(node: dict, approx: list[str]) -> None:
    """Replace node["not"] by an equivalent (or stricter) positive form, else mark it approximate."""
    neg = node.pop("not")
    if neg is True or neg == {}:
        raise _Unsatisfiable()  # not {}: nothing
    if neg is False:
        return  # not false: no restriction
    if not _negate(node, neg):
        approx.append("not")


def _negate(node: dict, neg: dict) -> bool:
    """Make `node` exclude what `neg` accepts; True when done exactly (or more strictly)."""
    keys = set(neg) - ANNOTATIONS
    if not keys:
        raise _Unsatisfiable()  # not {}: nothing
    if "type" in keys and _types(neg) is not None:
        banned = set(_types(neg))
        if "number" in banned:
            banned.add("integer")
        have = _types(node) or list(ALL_TYPES)
        rest = {k: v for k, v in neg.items() if k not in ANNOTATIONS and k != "type"}
        if rest and set(have) <= banned:  # every value has that type: not (T and R) = not R
            return _negate(node, rest)
        if "integer" in banned and "number" in have and "number" not in banned:
            return False  # numbers that are not integers: no positive form
        left = [t for t in have if t not in banned]
        if not left:
            raise _Unsatisfiable()
        # not (T and R) includes not T: leaving out T's types is exact for `type` alone, stricter otherwise
        node["type"] = left if len(left) > 1 else left[0]
        _prune_by_type(node)
        return True
    if keys == {"required"} and isinstance(neg["required"], list) and neg["required"]:
        need = set(node.get("required") or [])
        free = [n for n in neg["required"] if n not in need]
        if not free:
            raise _Unsatisfiable()  # requires them all and forbids having them all
        props = dict(node.get("properties") or {})
        props[free[0]] = False  # leave one of them out: the object then lacks one of the names
        node["properties"] = props
        return True
    if keys in ({"const"}, {"enum"}):
        bad = [neg["const"]] if "const" in neg else list(neg["enum"]) if isinstance(neg["enum"], list) else None
        if bad is None:
            return False
        if isinstance(node.get("enum"), list):
            node["enum"] = [v for v in node["enum"] if v not in bad]
        elif "const" in node:
            if node["const"] in bad:
                raise _Unsatisfiable()
            return True
        elif _types(node) and set(_types(node)) <= {"boolean", "null"}:
            node["enum"] = [v for v in ([True, False] if "boolean" in _types(node) else []) +
                            ([None] if "null" in _types(node) else []) if v not in bad]
        else:
            return False
        if not node["enum"]:
            raise _Unsatisfiable()
        return True
    if keys == {"anyOf"} and isinstance(neg["anyOf"], list):
        return all(isinstance(sub, dict) and _negate(node, sub) for sub in neg["anyOf"])  # not (a or b) = not a and not b
    return False


def _property_counts(node: dict, approx: list[str]) -> None:
    """minProperties / maxProperties as required properties and a closed object (the engines
    take those): the first optional properties become required up to the minimum; past the
    maximum, optional properties are left out and no others are allowed. Stricter, never looser."""
    lo, hi = node.pop("minProperties", None), node.pop("maxProperties", None)
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = [r for r in (node.get("required") or []) if isinstance(r, str)]
    optional = [p for p, sub in props.items() if p not in required and sub is not False]
    if isinstance(lo, int) and len(required) < lo:
        if len(required) + len(optional) >= lo:
            required += optional[: lo - len(required)]
            optional = [p for p in optional if p not in required]
            node["required"] = required
        else:
            approx.append("minProperties")
    if isinstance(hi, int):
        if len(set(required)) > hi:
            raise _Unsatisfiable()
        if node.get("patternProperties"):
            approx.append("maxProperties")
            return
        keep = set(required) | set(optional[: hi - len(set(required))])
        node["properties"] = {p: sub for p, sub in props.items() if p in keep}
        node["additionalProperties"] = False


# ------------------------------------------------------------------ the final check
def check_json(text: str, schema: Optional[dict]) -> Optional[str]:
    """None when `text` is JSON valid under `schema` (None: any JSON object), with format
    checking and no network ($refs to other documents do not resolve); else the reason."""
    import jsonschema
    from referencing import Registry

    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return f"the output is not JSON ({e})"
    if not schema:
        return None if isinstance(value, dict) else "the output is not a JSON object"

    def no_retrieval(uri):
        raise LookupError(f"dlm does not fetch schemas over the network ({uri})")

    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER, registry=Registry(retrieve=no_retrieval))
    try:
        err = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except Exception as e:  # an unresolvable $ref, a pathological schema: not checkable
        return f"the schema could not be checked ({type(e).__name__})"
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return f"at {where}: {err.message[:200]}"
