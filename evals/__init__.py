"""Evaluation scripts and committed results (installed as `dlm.evals`)."""
