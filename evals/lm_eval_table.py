"""Collect lm-eval outputs (one folder per model, as written by `dlm eval --output_path DIR/MODEL`)
into one markdown table.

    python -m dlm.evals.lm_eval_table evals/results/lm_eval --out evals/results/lm_eval_table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("exact_match,none", "acc,none", "bits_per_byte,none")


def collect(root: Path) -> dict[str, dict[str, tuple[str, float]]]:
    """model -> task -> (metric, value), from the newest results file of each model folder."""
    table: dict[str, dict[str, tuple[str, float]]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(model_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        merged: dict = {}
        for f in files:  # later runs override earlier ones task by task
            merged.update(json.loads(f.read_text())["results"])
        for task, res in merged.items():
            for m in METRICS:
                if m in res:
                    table.setdefault(model_dir.name, {})[task] = (m.split(",")[0], float(res[m]))
                    break
    return table


def render(table: dict, header: str = "") -> str:
    models = list(table)
    tasks = sorted({t for m in table.values() for t in m})
    lines = [header, "", "| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for t in tasks:
        metric = next(table[m][t][0] for m in models if t in table[m])
        cells = [f"{table[m][t][1]:.2f}" if t in table[m] else "-" for m in models]
        lines.append(f"| {t} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dlm.evals.lm_eval_table", description=__doc__)
    p.add_argument("root", help="folder with one lm-eval output folder per model")
    p.add_argument("--out", help="markdown file (default: print)")
    p.add_argument("--header", default="", help="text above the table")
    args = p.parse_args(argv)
    text = render(collect(Path(args.root)), args.header)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
