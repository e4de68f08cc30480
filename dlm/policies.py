"""Names of the decoder's policies (torch-free, so the CLI can list them without importing torch)."""

UNMASK_POLICIES = ("confidence", "margin", "entropy", "random", "threshold", "factor", "ancestral",
                   "first_hitting")
CACHE_KINDS = ("none", "prefix", "dual", "exact")
