"""Datasets of dlm's offline lm-eval tasks, generated in memory (no network, no files).

Each task YAML points `custom_dataset` here; lm-eval passes the YAML's `dataset_kwargs`.
Everything is deterministic: the checkable tasks come from dlm.tasks with a fixed seed, the
held-out text from the embedded corpus's validation split.
"""

import random

import datasets

N_DEFAULT = 100


def checkable(task: str, n: int = N_DEFAULT, seed: int = 0, **_):
    """Prompt / answer pairs of one checkable task (validation and test splits)."""
    from dlm.tasks import generate_examples

    out = {}
    for split in ("validation", "test"):
        exs = generate_examples([task], int(n), seed=int(seed), split=split)
        out[split] = datasets.Dataset.from_list([{"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in exs])
    return datasets.DatasetDict(out)


def multiple_choice(task: str, n: int = N_DEFAULT, seed: int = 0, n_choices: int = 4, **_):
    """The checkable task as multiple choice: the right answer among answers to other prompts."""
    base = checkable(task, n=int(n) * 2, seed=seed)
    out = {}
    for split, ds in base.items():
        rng = random.Random(f"dlm.mc:{task}:{seed}:{split}")
        answers = sorted(set(ds["answer"]))
        rows = []
        for ex in list(ds)[: int(n)]:
            others = [a for a in answers if a != ex["answer"]]
            choices = rng.sample(others, min(int(n_choices) - 1, len(others))) + [ex["answer"]]
            rng.shuffle(choices)
            rows.append({"prompt": ex["prompt"], "choices": choices, "label": choices.index(ex["answer"])})
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


def heldout_text(n: int = 50, **_):
    """Held-out English documents of the embedded corpus (its validation / test split)."""
    from dlm.corpus import natural_text_documents
    from dlm.tasks import split_of

    docs = natural_text_documents()
    out = {}
    for split in ("validation", "test"):
        picked = [d for d in docs if split_of(d) == split][: int(n)]
        out[split] = datasets.Dataset.from_list([{"text": d} for d in picked])
    return datasets.DatasetDict(out)


def process_generation(doc, results):
    """Exact match with the task's own scorer (dlm.tasks), which knows each answer's format."""
    from dlm.tasks import Example, get_task

    ex = Example(task=doc["task"], prompt=doc["prompt"], answer=doc["answer"])
    return {"exact_match": float(get_task(doc["task"]).score(results[0], ex))}
