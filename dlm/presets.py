"""Model size presets, torch-free (the command line lists them): (hidden, layers, heads).
"debug" trains in seconds on a CPU; "gpt2-small" is the 12 x 768 scale of the papers' tables.
The one dial is the name; everything else follows."""

PRESETS: dict[str, tuple[int, int, int]] = {
    "debug": (64, 2, 2),
    "tiny": (128, 4, 4),
    "small": (256, 6, 4),
    "medium": (512, 8, 8),
    "gpt2-small": (768, 12, 12),
}
