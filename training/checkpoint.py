"""Resumable checkpoints that never leave a half-written one in place of a good one.

Layout under OUTPUT_DIR/checkpoints:
    step-000500/         DeepSpeed states (model, optimizer, scheduler) + trainer_state.json (+ ema.pt)
    latest               the tag of the newest complete checkpoint

Every rank writes into `.tmp-step-000500`; after a barrier rank 0 renames it to `step-000500`
and only then replaces `latest` (write-to-temp + os.replace), so a crash at any point leaves the
previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from dlm.errors import DLMError

STATE_FILE = "trainer_state.json"


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise DLMError(
            f"{path} points at {tag!r}, which is missing; delete the file or restore the checkpoint folder"
        )
    return tag


def save(engine, ckpt_dir: str, step: int, trainer_state: dict, ema=None, keep: int = 2) -> str:
    """Write a complete checkpoint for `step` from every rank; returns its tag."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(os.path.join(ckpt_dir, tmp_tag), ignore_errors=True)
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"dlm_step": step}, save_latest=False)
    if rank == 0:
        tmp_dir = os.path.join(ckpt_dir, tmp_tag)
        if ema is not None:
            torch.save(ema.state_dict(), os.path.join(tmp_dir, "ema.pt"))
        atomic_write_text(os.path.join(tmp_dir, STATE_FILE), json.dumps(trainer_state, indent=1))
    _barrier()
    if rank == 0:
        final = os.path.join(ckpt_dir, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(os.path.join(ckpt_dir, tmp_tag), final)
        atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)
        _prune(ckpt_dir, keep)
    _barrier()
    return tag


def _prune(ckpt_dir: str, keep: int) -> None:
    tags = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-"))
    for old in tags[: max(0, len(tags) - keep)]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def load(engine, ckpt_dir: str, ema=None) -> tuple[int, dict]:
    """Restore the latest checkpoint into `engine` (and `ema`); returns (step, trainer_state)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise DLMError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start fresh")
    path = os.path.join(ckpt_dir, tag)
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        load_path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
        if load_path is None:
            raise RuntimeError("DeepSpeed found no model states")
        if ema is not None:
            ema_file = os.path.join(path, "ema.pt")
            if os.path.isfile(ema_file):
                ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=True))
    except DLMError:
        raise
    except Exception as e:
        raise DLMError(
            f"checkpoint {path} is corrupt or from another run ({type(e).__name__}: {str(e)[:200]}); "
            "delete it and point 'latest' at an earlier step, or start fresh without --resume"
        ) from None
    return int(state["step"]), state
