"""Names the command line lists without importing torch: objectives and model size presets.

    OBJECTIVES   the training objectives (and model types) of dlm's own models
    PRESETS      named sizes: (hidden, layers, heads); "debug" trains in seconds on a CPU, and
                 "gpt2-small" is the 12 x 768 scale of the papers' tables. The one dial is the name.
"""

OBJECTIVES = ("mdlm", "radd", "ar", "bd3lm", "e2d2")

PRESETS: dict[str, tuple[int, int, int]] = {
    "debug": (64, 2, 2),
    "tiny": (128, 4, 4),
    "small": (256, 6, 4),
    "medium": (512, 8, 8),
    "gpt2-small": (768, 12, 12),
}
