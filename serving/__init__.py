"""dlm serving: an OpenAI-compatible HTTP server over the dlm decoder (`dlm serve MODEL_DIR`).

* `scheduler.py`: a thread that runs the decoder's denoising steps for every live request in
  the same forward passes; requests join and leave between steps; bounded queue, timeouts,
  cancellation.
* `app.py`: the FastAPI application (completions, chat, tokenizer endpoints, health, metrics).
"""
