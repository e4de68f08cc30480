"""Evaluation: lm-eval integration (lm_eval_model), offline tasks (tasks/), the perplexity table."""

import os
import subprocess

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def provenance() -> dict:
    """The commit a result is measured on (and whether the tree had uncommitted changes), for the
    results files; empty outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "uncommitted_changes": bool(dirty)} if commit else {}
