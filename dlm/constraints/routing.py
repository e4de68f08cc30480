"""Routing a prepared JSON Schema: whether outlines-core's regex translation enforces it exactly
(then it compiles to a token DFA), or it goes to llguidance's grammar engine.

The token DFA is the fast path (a table lookup per token, exact witness search), but outlines-core
ignores some keywords (numeric bounds, most formats) and writes patterns into the JSON string as
they are. `regular_candidate` admits only what it writes exactly; `small_ranges_as_enums` turns
small integer ranges into enums first so that they stay on the fast path.
"""

from __future__ import annotations

from dlm.constraints.schema import TYPE_KEYWORDS

# formats outlines-core's regex translation writes exactly: none (its date / time classes admit
# Unicode digits), so a schema with a format left goes to llguidance
REGULAR_FORMATS: set = set()
# keywords outlines-core's regex translation enforces exactly (others send a schema to llguidance)
# (`pattern` only when it cannot produce a quote, backslash or control character: outlines-core
# writes it into the JSON string as it is, where `.` or `[^a]` would break the JSON; llguidance
# confines any pattern to valid string content)
REGULAR_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "pattern",
                    "format", "title", "description", "default", "examples", "$schema", "$id", "id", "$comment",
                    "deprecated", "readOnly", "writeOnly"}
MAX_ENUM_RANGE = 1000


def regular_candidate(schema) -> bool:
    """Whether outlines-core's regex translation enforces this (prepared) schema exactly: only
    keywords it writes into the regex, no recursion, no boolean subschemas but
    `additionalProperties: false`, every required property declared, small integer ranges."""
    defs = {}
    if isinstance(schema, dict):
        for k in ("$defs", "definitions"):
            if isinstance(schema.get(k), dict):
                defs.update({f"#/{k}/{name}": sub for name, sub in schema[k].items()})
    return _regular(schema, defs, ())


def _regular(node, defs: dict, path: tuple) -> bool:
    if not isinstance(node, dict):
        return False
    if set(node) - REGULAR_KEYWORDS:
        return False
    if "format" in node and node["format"] not in REGULAR_FORMATS:
        return False
    if "pattern" in node and not json_safe_pattern(node["pattern"]):
        return False
    if "$ref" in node:
        ref = node["$ref"]
        if ref == "#":
            return False  # the root: recursive
        if ref not in defs or ref in path or len(node) > 1:
            return False
        if not _regular(defs[ref], defs, path + (ref,)):
            return False
    if "additionalProperties" in node and node["additionalProperties"] not in (False, True):
        return False
    props = node.get("properties") or {}
    if not isinstance(props, dict) or any(not _regular(s, defs, path) for s in props.values()):
        return False
    if any(r not in props for r in node.get("required") or []):
        return False
    if "items" in node and not _regular(node["items"], defs, path):
        return False
    if "anyOf" in node and not all(_regular(s, defs, path) for s in node["anyOf"]):
        return False
    for k in ("$defs", "definitions"):
        if k in node and not path and not all(_regular(s, defs, (f"#/{k}/{n}",)) for n, s in node[k].items()):
            return False
    return True


def json_safe_pattern(pattern) -> bool:
    """Whether every string the regex matches is JSON string content as it stands: no quote,
    backslash or control character can come out of it (explicit literals and ranges, \\d, \\w)."""
    import re._constants as C  # noqa: PLC2701 - the standard library's own regex parser
    import re._parser as sre  # noqa: PLC2701

    if not isinstance(pattern, str):
        return False
    try:
        tree = sre.parse(pattern)
    except Exception:
        return False

    def ok_char(c: int) -> bool:
        return c >= 0x20 and c not in (0x22, 0x5C, 0x7F)

    def ok(items) -> bool:
        for op, av in items:
            if op is C.LITERAL:
                if not ok_char(av):
                    return False
            elif op is C.IN:
                for iop, iav in av:
                    if iop is C.NEGATE:
                        return False
                    if iop is C.LITERAL and not ok_char(iav):
                        return False
                    if iop is C.RANGE and not (iav[0] >= 0x20 and not iav[0] <= 0x22 <= iav[1]
                                               and not iav[0] <= 0x5C <= iav[1] and iav[1] < 0x7F):
                        return False
                    if iop is C.CATEGORY and iav not in (C.CATEGORY_DIGIT, C.CATEGORY_WORD):
                        return False
            elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
                if not ok(av[2]):
                    return False
            elif op is C.SUBPATTERN:
                if not ok(av[-1]):
                    return False
            elif op is C.BRANCH:
                if not all(ok(b) for b in av[1]):
                    return False
            elif op is C.AT:
                continue
            else:  # ANY, NOT_LITERAL, lookarounds, back-references, ...
                return False
        return True

    return ok(tree)


def small_ranges_as_enums(node):
    """{"type": "integer", "minimum": a, "maximum": b} with b - a <= MAX_ENUM_RANGE -> an enum, which
    the token DFA enforces exactly (outlines-core ignores numeric bounds)."""
    if isinstance(node, list):
        return [small_ranges_as_enums(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: (v if k in ("enum", "const", "required", "examples", "default") else small_ranges_as_enums(v))
            for k, v in node.items()}
    if node.get("type") == "integer" and "multipleOf" not in node:
        lo = node.get("minimum", node["exclusiveMinimum"] + 1 if isinstance(node.get("exclusiveMinimum"), int) else None)
        hi = node.get("maximum", node["exclusiveMaximum"] - 1 if isinstance(node.get("exclusiveMaximum"), int) else None)
        if isinstance(lo, int) and isinstance(hi, int) and 0 <= hi - lo <= MAX_ENUM_RANGE:
            rest = {k: v for k, v in node.items() if k not in ("type", "minimum", "maximum", "exclusiveMinimum",
                                                                  "exclusiveMaximum")}
            return {**rest, "enum": list(range(lo, hi + 1))}
    return node


def numeric_bounds(node) -> bool:
    """Whether any numeric bound is left (outlines-core would ignore it)."""
    if isinstance(node, list):
        return any(numeric_bounds(v) for v in node)
    if not isinstance(node, dict):
        return False
    if set(node) & TYPE_KEYWORDS["number"]:
        return True
    return any(numeric_bounds(v) for k, v in node.items() if k not in ("enum", "const", "examples", "default"))
