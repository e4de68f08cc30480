"""What the user asks for: a constraint on the output (regex, JSON Schema, choices, Lark grammar).

    Constraint.regex("[0-9]{3}")
    Constraint.json_schema({"type": "object", ...})     # None or {} = any JSON object
    Constraint.choice(["yes", "no"])
    Constraint.grammar('start: "[" NUM "]"\\nNUM: /[0-9]+/\\n')
    make_constraint(regex=..., json_schema=..., ...)    # at most one, from option names

A constraint is plain data (hashable: the compile cache is keyed on it); `dlm.constraints.compile`
turns it into an engine for one tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from dlm.errors import DLMError

KINDS = ("regex", "json", "choice", "grammar")


class ConstraintError(DLMError):
    """A constraint that cannot be compiled (unsupported, or over a budget): the client's 400."""


class ConstraintUnsatisfiable(DLMError):
    """No output of the request's length satisfies its constraint (or none was found in budget)."""


class ConstraintViolation(DLMError):
    """A finished output failed the final check (an approximately enforced keyword missed)."""


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
        """A JSON Schema (dict, boolean or JSON text); None or {} means any JSON object."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise DLMError(f"the JSON schema is not valid JSON: {e}") from None
        if schema in (None, {}):
            return cls("json", "")
        if schema is True:
            return cls("json", "")
        if schema is False:
            raise DLMError("the JSON schema `false` accepts no value at all")
        if not isinstance(schema, dict):
            raise DLMError(f"a JSON schema must be an object, got {type(schema).__name__}")
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise DLMError(f"invalid JSON schema: {e.message}") from None
        except (RecursionError, ValueError, TypeError) as e:  # e.g. an unresolvable $schema
            raise DLMError(f"invalid JSON schema: {type(e).__name__}: {e}") from None
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

    def describe(self) -> str:
        """A short name for messages (never the whole spec: it may be large, or private)."""
        text = self.spec if len(self.spec) < 60 else self.spec[:57] + "..."
        return f"{self.kind} {text!r}" if self.spec else "any JSON object"


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


def escape_literal(text: str) -> str:
    """Escape a literal for the Rust regex dialect (Python's re.escape escapes spaces, Rust rejects that)."""
    return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$#&-~" else ch for ch in text)
