"""Evaluation: lm-eval integration (lm_eval_model), offline tasks (tasks/), the perplexity table."""

import os

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
