"""Training: the DeepSpeed trainer (`dlm train`), its configs and the throughput benchmark.

Installed as `dlm.training` (see pyproject's package-dir), so import it as `dlm.training.trainer`.
"""
