"""Draw the seeded JSONSchemaBench sample that `dlm bench schemas` measures (committed beside
this file as sample.jsonl.gz; re-create it with the command below to check it).

    git clone https://github.com/guidance-ai/jsonschemabench /tmp/jsb   # commit ba103c73
    python evals/jsonschemabench/make_sample.py /tmp/jsb --seed 0 --per-folder 32

Every folder of the benchmark's data/ (GitHub schemas of every difficulty, Glaive function-call
schemas, Kubernetes, Snowplow, JSON Schema Store, Washington Post) contributes `--per-folder`
schemas drawn with `random.Random(seed)` from its sorted file list. Each line of the output is
{"folder", "file", "schema"}; the schemas are the benchmark's data, unchanged.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo", help="a checkout of guidance-ai/jsonschemabench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-folder", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "sample.jsonl.gz"))
    args = p.parse_args()
    data = Path(args.repo) / "data"
    folders = sorted(d for d in data.iterdir() if d.is_dir())
    if not folders:
        raise SystemExit(f"no folders under {data}: pass a checkout of guidance-ai/jsonschemabench")
    rng = random.Random(args.seed)
    lines = []
    for folder in folders:
        files = sorted(f.name for f in folder.glob("*.json"))
        for name in rng.sample(files, min(args.per_folder, len(files))):
            schema = json.loads((folder / name).read_text())
            lines.append(json.dumps({"folder": folder.name, "file": name, "schema": schema}, sort_keys=True))
    # mtime 0: the same sample gives the same bytes
    with open(args.out, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode())
    print(f"{len(lines)} schemas from {len(folders)} folders -> {args.out}")


if __name__ == "__main__":
    main()
