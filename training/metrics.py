"""What a training run reports: metrics.jsonl (and TensorBoard when installed), and a progress
bar with loss, tokens/s and ETA on a terminal (plain log lines otherwise). Rank 0 only."""

from __future__ import annotations

import json
import os
import sys
import time

from dlm.training import checkpoint


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard (when installed); rank 0 only.

    On resume, records after the resumed step are dropped so the file holds one clean curve.
    """

    def __init__(self, out_dir: str, start_step: int, active: bool, tensorboard: bool):
        self.active = active
        self.tb = None
        if not active:
            return
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.isfile(self.path):
            keep = [line for line in open(self.path) if line.strip() and json.loads(line)["step"] <= start_step]
            checkpoint.atomic_write_text(self.path, "".join(keep))
        self.f = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def write(self, rec: dict) -> None:
        if not self.active:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.active:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, active: bool):
        self.active = active
        self.bar = None
        if not active:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.bar.start()
        self.t = time.perf_counter()

    def update(self, step: int, tokens: int, loss: float = None) -> None:
        """Advance to `step` (`tokens` since the last update); the loss shown changes only when
        given (at logging steps: reading it every step would wait for the device)."""
        if self.bar is None:
            return
        now = time.perf_counter()
        tps = tokens / max(now - self.t, 1e-9)
        self.t = now
        extra = {} if loss is None else {"loss": loss}
        self.bar.update(self.task, completed=step, tps=tps, **extra)

    def note(self, rec: dict) -> None:
        if not self.active:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if v is not None)
        if self.bar is not None:
            self.bar.console.log(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
