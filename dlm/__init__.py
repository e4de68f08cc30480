"""dlm: discrete (masked / absorbing) diffusion language models.

Library layout (one file per concern; see README for the tour):
  corpus.py      embedded default corpus (stdlib English text + checkable tasks), no network
  tasks.py       procedurally generated tasks with a scorer per task
  tokenizer.py   train / load tokenizers, ensure [MASK] and friends
  data.py        HF datasets loading, tokenization, wrap / pad, on-disk cache
  model.py       the transformer backbone (HF PreTrainedModel) and size presets
  noise.py       noise schedules and the absorbing (masking) forward process
  objectives.py  MDLM, RADD and AR losses behind one interface
  ppl.py         NELBO perplexity bound (diffusion) and exact perplexity (AR)
  sample.py      reference samplers used by `dlm sample`
  export.py      AR baseline -> standard HF LlamaForCausalLM
"""

__version__ = "0.1.0"
