"""dlm: discrete (masked / absorbing) diffusion language models.

Library layout (the README's Layout section has every file):
  families.py    what differs between model kinds (block-causal, caches, objective), in one place
  model.py       the transformer backbone (HF PreTrainedModel); layers.py its layers; presets.py sizes
  loading.py     load_model / save_model: dlm checkpoints and published families, dirs or hub ids
  formats/       the published families' config and tensor names (LLaDA, Dream, SDAR, ...)
  noise.py       the noise schedule (built from the model config) and the masking process
  objectives.py  MDLM, RADD, AR, BD3-LM and E2D2 losses behind one interface
  blocks.py      block-causal attention masks
  likelihood.py  perplexity, Monte Carlo ELBO, chain and exact AR scores
  decoding/      the decoder: config, unmask policies, caches, sampling, stopping, engine
  constraints/   regex / JSON Schema / choice / grammar constrained decoding
  sample.py      reference samplers used by `dlm sample`
  corpus.py, tasks.py, tokenizer.py, data.py   the embedded corpus, checkable tasks, data
  cli/           the `dlm` command
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load_model", "save_model", "load_tokenizer_for"):  # torch only when used
        import dlm.loading

        return getattr(dlm.loading, name)
    raise AttributeError(f"module 'dlm' has no attribute {name!r}")
