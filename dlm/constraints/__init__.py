"""Grammar-constrained decoding for masked diffusion: regex, JSON Schema, choices, Lark grammars.

Left-to-right token masking (what grammar engines do for autoregressive models) breaks when a
diffusion decoder commits tokens in parallel and out of order, so dlm constrains the *whole
canvas* at every step:

    spec.py      Constraint (what the user asks for) and make_constraint
    schema.py    JSON Schema prepared for the engines; the final check of every output
    routing.py   which engine enforces a prepared schema exactly (token DFA or grammar)
    tokens.py    the bytes of each token id
    regular.py   token DFA + DINGO's dynamic program (regular constraints)
    grammar.py   llguidance + witnesses (context-free constraints, large bounds)
    worker.py    token DFAs built in a child process under a time / memory budget
    compile.py   ConstraintCompiler: routing, budgets, the cache
    chooser.py   ConstrainedChooser: the decoder's hook

    compiler = ConstraintCompiler(tokenizer, model.config.vocab_size, model.config.eos_token_id)
    c = compiler.compile(Constraint.json_schema({"type": "object", ...}))
    Decoder(model).generate([prompt_ids], config, constraints=[c])

Names are imported lazily, so `dlm.constraints.worker` starts a child process without torch.
"""

from __future__ import annotations

_NAMES = {
    "Constraint": "spec", "make_constraint": "spec", "KINDS": "spec",
    "ConstraintCompiler": "compile", "CompiledConstraint": "compile", "CompileLimits": "compile",
    "ConstraintError": "spec", "ConstraintViolation": "spec", "ConstraintUnsatisfiable": "spec",
    "GrammarEngine": "grammar",
    "TokenDFA": "regular", "ConstrainedChooser": "chooser", "token_bytes": "tokens",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"dlm.constraints.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'dlm.constraints' has no attribute {name!r}")
