"""Test-wide settings: offline hubs, a private cache, quiet libraries, and shared tiny corpora."""

import json
import os
import random

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Datasets and the embedded corpus are cached per test session, never in the user's cache.
    cache = tmp_path_factory.mktemp("dlm-cache")
    os.environ["DLM_CACHE"] = str(cache)
    os.environ["HF_DATASETS_CACHE"] = str(cache / "hf")
    yield cache


WORDS = ("the cat sat on a mat while the dog ran in the park and a bird sang over the old red house "
         "near the river where children played with a ball every sunny day").split()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """A directory with train/validation jsonl of simple repetitive English (fast to learn)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for split, n in (("train", 600), ("validation", 40)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                f.write(json.dumps({"text": text}) + "\n")
    return str(d)
