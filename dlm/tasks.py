"""Procedurally generated tasks with checkable answers, used to score decoding quality.

A small diffusion model trained on the embedded corpus (see corpus.py) sees these examples as
ordinary documents; at evaluation time it gets the prompt and must fill in the answer, which
`Task.score` checks exactly. Prompts and answers are short and follow one strict format so that
a few-million-parameter model can learn them in minutes on a CPU.

Format (every task):

    text   = prompt + answer              (one line; the data pipeline appends EOS after it)
    prompt = "<task>: <input><sep>"        no trailing whitespace
    answer = " " + <result>                always exactly one leading space, no newline

The separator is "=" for arithmetic and " ->" for everything else:

    add      "add: 23+58="                          " 81"          two 1-3 digit ints
    sub      "sub: 58-23="                          " 35"          1-3 digit ints, never negative
    mul      "mul: 23*7="                           " 161"         1-2 digits times 1 digit
    copy     "copy: cat 7 sun ->"                   " cat 7 sun"   3-8 lowercase words or digits
    reverse  "reverse: cat 7 sun ->"                " sun 7 cat"   3-8 lowercase words or digits
    sort     "sort: 31 4 15 ->"                     " 4 15 31"     3-8 ints in 0..99, ascending
    lookup   "lookup: a=3 k=71 z=1 | k ->"          " 71"          3-6 distinct one-letter keys
    json     "json: name bob age 31 city oslo ->"   ' {"name": "bob", "age": 31, "city": "oslo"}'

Why the answer starts with a space: byte-level BPE pre-tokenizers (GPT-2 style) start a new
piece at a space, so the prompt/answer boundary is always a token boundary. Without it,
`->{"` in the json task would merge into one token during training and the prompt alone
would tokenize differently at evaluation time.

Scoring (`Task.score`): the prediction is normalised by dropping leading whitespace, cutting at
the first newline and stripping; it must then equal the stripped answer exactly (1.0, else 0.0).
`json` parses both sides and compares the objects (key order ignored, types strict); invalid
JSON scores 0.

Held-out splits: an example belongs to "train", "validation" or "test" by a stable SHA-256 hash
of its prompt (90/5/5), and generation rejects candidates that hash to another split, so a
prompt never appears in two splits whatever the seed. Tasks with small input spaces (mul has
1,000 distinct prompts) therefore repeat prompts within a split.

    from dlm.tasks import generate_examples, score_predictions
    exs = generate_examples(["add", "json"], n=1000, seed=0, split="validation")
    score_predictions(exs, [e.answer for e in exs])   # {"accuracy": 1.0, ...}

    python -m dlm.tasks            # prints a few examples of every task
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from dlm.errors import DLMError

SPLITS = ("train", "validation", "test")
# Percent of the hash space per split, in SPLITS order.
_SPLIT_PERCENT = (90, 5, 5)


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str  # begins with one space; see the module docstring

    @property
    def text(self) -> str:
        """The full training document (the data pipeline appends EOS)."""
        return self.prompt + self.answer


def split_of(key: str) -> str:
    """The split a prompt (or document) belongs to, by a stable hash: same on every machine/run."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    edge = 0
    for split, pct in zip(SPLITS, _SPLIT_PERCENT):
        edge += pct
        if bucket < edge:
            return split
    return SPLITS[-1]


def normalize_prediction(prediction: str) -> str:
    """Drop leading whitespace, keep the first line, strip it."""
    return prediction.lstrip().split("\n", 1)[0].strip()


# ------------------------------------------------------------------ tasks
class Task:
    """One task: `make` draws (input, result); `generate` and `score` add the shared format."""

    name: str = ""
    sep: str = " ->"
    description: str = ""

    def make(self, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError

    def generate(self, rng: random.Random) -> Example:
        body, result = self.make(rng)
        return Example(self.name, f"{self.name}: {body}{self.sep}", " " + result)

    def score(self, prediction: str, example: Example) -> float:
        return float(normalize_prediction(prediction) == example.answer.strip())

    def __repr__(self) -> str:
        return f"<Task {self.name}: {self.description}>"


def _int_with_digits(rng: random.Random, max_digits: int) -> int:
    """A non-negative int whose digit count is uniform in 1..max_digits (so short numbers are common)."""
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


class AddTask(Task):
    name, sep, description = "add", "=", "sum of two 1-3 digit ints"

    def make(self, rng):
        a, b = _int_with_digits(rng, 3), _int_with_digits(rng, 3)
        return f"{a}+{b}", str(a + b)


class SubTask(Task):
    name, sep, description = "sub", "=", "difference of two 1-3 digit ints (larger first)"

    def make(self, rng):
        a, b = _int_with_digits(rng, 3), _int_with_digits(rng, 3)
        a, b = max(a, b), min(a, b)  # keeps answers non-negative: no sign to learn
        return f"{a}-{b}", str(a - b)


class MulTask(Task):
    name, sep, description = "mul", "=", "product of a 1-2 digit int and a 1 digit int"

    def make(self, rng):
        a, b = _int_with_digits(rng, 2), rng.randint(0, 9)
        return f"{a}*{b}", str(a * b)


# Short, common, single-token-ish words: the list tasks test copying, not spelling.
_WORDS = (
    "ant bed box cat cup dog egg fan fox hat ice jam key kid leg map net owl pen pig "
    "rat red sea sky sun tea toe van web zoo arm bag bus car cow ear eye fig gum hen ink"
).split()
_ITEMS = _WORDS + [str(d) for d in range(10)]


def _items(rng: random.Random) -> list[str]:
    return [rng.choice(_ITEMS) for _ in range(rng.randint(3, 8))]


class CopyTask(Task):
    name, description = "copy", "repeat a list of 3-8 words or digits"

    def make(self, rng):
        xs = _items(rng)
        return " ".join(xs), " ".join(xs)


class ReverseTask(Task):
    name, description = "reverse", "reverse a list of 3-8 words or digits"

    def make(self, rng):
        xs = _items(rng)
        return " ".join(xs), " ".join(reversed(xs))


class SortTask(Task):
    name, description = "sort", "sort 3-8 ints in 0..99 ascending"

    def make(self, rng):
        xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
        return " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


_KEYS = "abcdefghijklmnopqrstuvwxyz"


class LookupTask(Task):
    name, description = "lookup", "value of a key among 3-6 key=value pairs"

    def make(self, rng):
        keys = rng.sample(_KEYS, rng.randint(3, 6))
        values = [rng.randint(0, 99) for _ in keys]
        i = rng.randrange(len(keys))
        pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        return f"{pairs} | {keys[i]}", str(values[i])


# json record fields, in the (fixed) order they appear; values are drawn from these pools.
_JSON_FIELDS: tuple[tuple[str, object], ...] = (
    ("name", "ana bob cai dan eva finn gus ida jon kim leo mia ned olga pia sam tom uma".split()),
    ("age", (1, 99)),
    ("city", "oslo rome lima kyiv baku doha riga bern nice pune cork york".split()),
    ("pet", "cat dog fish bird frog none".split()),
    ("color", "red blue green black white gray pink".split()),
    ("score", (0, 100)),
)


class JsonTask(Task):
    name, description = "json", "2-4 fields as a compact JSON object (scored as parsed objects)"

    def make(self, rng):
        fields = sorted(rng.sample(range(len(_JSON_FIELDS)), rng.randint(2, 4)))
        record: dict[str, object] = {}
        for i in fields:
            key, pool = _JSON_FIELDS[i]
            record[key] = rng.randint(*pool) if isinstance(pool, tuple) else rng.choice(pool)
        body = " ".join(f"{k} {v}" for k, v in record.items())
        return body, json.dumps(record)  # default separators: {"k": v, "k2": v2}

    def score(self, prediction, example):
        try:
            got = json.loads(normalize_prediction(prediction))
        except ValueError:
            return 0.0
        want = json.loads(example.answer)
        # Canonical dumps: key order ignored, but 31 != 31.0 != true (plain == would equate them).
        return float(isinstance(got, dict) and json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True))


TASKS: dict[str, Task] = {t.name: t for t in (
    AddTask(), SubTask(), MulTask(), CopyTask(), ReverseTask(), SortTask(), LookupTask(), JsonTask())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DLMError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def _resolve(task_names: Optional[Sequence[str]]) -> list[Task]:
    if task_names is None:
        return list(TASKS.values())
    if isinstance(task_names, str):  # a lone name is an easy mistake: "add" would iterate letters
        task_names = [task_names]
    if not task_names:
        raise DLMError(f"no task names given; pass some of: {', '.join(TASKS)} (or None for all)")
    return [get_task(n) for n in task_names]


# ------------------------------------------------------------------ generation / scoring
# A task whose every prompt hashes elsewhere would loop forever; none of ours comes close.
_MAX_REJECTIONS = 10_000


def generate_examples(task_names: Optional[Sequence[str]], n: int, seed: int, split: str) -> list[Example]:
    """`n` examples of the given tasks (None = all), interleaved round-robin, all from `split`.

    Deterministic in (task_names, n, seed, split). Each task draws from its own generator seeded
    by (seed, split, task), so a task's examples do not change when other tasks are added.
    """
    if split not in SPLITS:
        raise DLMError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if n < 0:
        raise DLMError(f"number of examples must be >= 0, got {n}")
    tasks = _resolve(task_names)
    # random.Random(str) seeds via SHA-512 of the string: stable across runs and PYTHONHASHSEED.
    rngs = [random.Random(f"dlm.tasks:{seed}:{split}:{t.name}") for t in tasks]
    out = []
    for i in range(n):
        j = i % len(tasks)
        task, rng = tasks[j], rngs[j]
        for _ in range(_MAX_REJECTIONS):
            ex = task.generate(rng)
            if split_of(ex.prompt) == split:
                break
        else:
            raise DLMError(f"task {task.name!r} produced no {split} example in {_MAX_REJECTIONS} tries")
        out.append(ex)
    return out


def score_predictions(examples: Sequence[Example], predictions: Sequence[str]) -> dict:
    """Accuracy overall and per task: {"accuracy", "n", "per_task": {task: {"accuracy", "n"}}}."""
    if len(examples) != len(predictions):
        raise DLMError(f"got {len(predictions)} predictions for {len(examples)} examples; pass one per example")
    hits: dict[str, list[float]] = {}
    for ex, pred in zip(examples, predictions):
        hits.setdefault(ex.task, []).append(get_task(ex.task).score(pred, ex))
    total = [h for hs in hits.values() for h in hs]
    return {
        "accuracy": sum(total) / len(total) if total else 0.0,
        "n": len(total),
        "per_task": {t: {"accuracy": sum(hs) / len(hs), "n": len(hs)} for t, hs in hits.items()},
    }


if __name__ == "__main__":
    for _name in TASKS:
        for _ex in generate_examples([_name], 3, seed=0, split="train"):
            print(repr(_ex.text))
