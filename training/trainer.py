"""The DeepSpeed trainer behind `dlm train`.

    dlm train --objective mdlm --size tiny --max-steps 2000              # one process
    torchrun --nproc_per_node 2 -m dlm.cli train --micro-batch 8 ...     # two processes
    deepspeed --num_accelerators 2 --module dlm.cli train ...            # DeepSpeed launcher

Flow: corpus -> tokenizer (trained here unless given) -> packed dataset (cached) -> model +
objective -> DeepSpeed engine -> loop (validation, metrics, checkpoints) -> OUTPUT_DIR/model.

Determinism: the data order and the diffusion noise of step s are functions of (seed, s) over
the *global* batch; every rank takes its rows. Hence `--resume` continues the exact loss curve
and N processes x micro-batch b match one process x (N b) up to float reduction order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Optional

import torch
from dlm.training import checkpoint
from dlm.training import distributed as D
from dlm.training.config import TrainConfig, deepspeed_config, parse_noise_window

from dlm.errors import DLMError, MissingSplitError
from dlm.noise import effective_mask


class EMA:
    """Exponential moving average of the weights, kept in float32 on the model's device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, sd: dict) -> None:
        for n, t in sd.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the live weights and the EMA weights (call twice to restore)."""
        for n, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n].to(p.dtype))
            self.shadow[n].copy_(tmp.float())


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def global_rows(step: int, n_rows: int, global_batch: int, seed: int) -> torch.Tensor:
    """Dataset rows of optimizer step `step`: consecutive slices of per-epoch permutations."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.extend(perm[offset : offset + global_batch - len(out)].tolist())
    return torch.tensor(out)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 1_000_003 + step)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.dist = D.setup(cfg.threads)
        self.stop_requested = False
        self.stop_signal = signal.SIGINT
        self.out = cfg.output_dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")

    # ---------------------------------------------------------------- set-up
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    def has_checkpoint(self) -> bool:
        return os.path.isdir(self.ckpt_dir) and checkpoint.latest_tag(self.ckpt_dir) is not None

    def _check_output_dir(self) -> None:
        cfg = self.cfg
        if self.has_checkpoint() and not cfg.resume:
            raise DLMError(
                f"{self.ckpt_dir} already holds checkpoints; pass --resume to continue that run, "
                "or choose another --output-dir"
            )
        saved_path = os.path.join(self.out, "train_config.json")
        if cfg.resume and self.has_checkpoint() and os.path.isfile(saved_path):
            try:
                with open(saved_path) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = {}
            now = cfg.to_dict()
            changed = [k for k in RESUME_FIXED if k in saved and saved[k] != now.get(k)]
            if changed:
                diff = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in changed)
                raise DLMError(f"--resume with settings that define the run changed ({diff}); "
                               "keep them as they were, or start a new --output-dir")

    def setup_tokenizer(self):
        from dlm.tokenizer import check_tokenizer, load_tokenizer, train_tokenizer

        cfg = self.cfg
        tok_dir = os.path.join(self.out, "tokenizer")
        if cfg.tokenizer:
            tok = load_tokenizer(cfg.tokenizer)
            check_tokenizer(tok)
            if self.dist.is_main:
                tok.save_pretrained(tok_dir)
            return tok

        def make():  # on rank 0 only; every rank meets at the barrier inside rank0_first
            if self.dist.is_main and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
                from dlm.data import load_text_dataset

                self.log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {cfg.data}")
                texts = load_text_dataset(cfg.data, "train", cfg.text_field)["text"]
                train_tokenizer(texts, tok_dir, vocab_size=cfg.vocab_size)

        D.rank0_first(make)
        tok = load_tokenizer(tok_dir)
        check_tokenizer(tok)
        return tok

    def setup_data(self, tok):
        from dlm.data import build_lm_dataset

        cfg = self.cfg

        def build(split):
            return build_lm_dataset(cfg.data, tok, cfg.seq_len, split=split, mode=cfg.pack, text_field=cfg.text_field)

        # Rank 0 tokenizes and fills the cache; the others then read it. Every rank reaches the
        # barrier even when building fails, so an error never leaves a rank waiting.
        train = D.rank0_first(lambda: build("train"))
        try:
            val = D.rank0_first(lambda: build("validation"))
        except MissingSplitError:
            # No validation split: hold out the last 2% of the training chunks.
            n_val = max(1, len(train) // 50)
            if len(train) < 2:
                raise DLMError(f"{cfg.data} yields {len(train)} training sequence(s) of {cfg.seq_len} tokens; "
                               "give more text or a smaller --seq-len") from None
            val = train.select(range(len(train) - n_val, len(train)))
            train = train.select(range(len(train) - n_val))
            self.log(f"no validation split in {cfg.data}: holding out {n_val} training sequences")
        if len(train) == 0:
            raise DLMError(f"{cfg.data} yields no training sequence of {cfg.seq_len} tokens; "
                           "give more text or a smaller --seq-len")
        return train.with_format("torch"), val.with_format("torch")

    def build_model(self, tok):
        from dlm.model import PRESETS, DLMConfig, DLMModel, e2d2_layer_split, load_model
        from dlm.tokenizer import (
            check_tokenizer_for_model,
            model_vocab_size,
            special_token_ids,
        )

        cfg = self.cfg
        ids = special_token_ids(tok)
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            model = load_model(cfg.init_from)
            if bool(model.config.time_conditioning) != bool(cfg.time_conditioning):
                have = "with" if model.config.time_conditioning else "without"
                raise DLMError(f"--init-from {cfg.init_from} was trained {have} time conditioning; pass "
                               f"--{'' if model.config.time_conditioning else 'no-'}time-conditioning to match it")
            if model.config.objective != cfg.objective:
                _convert_objective(model, cfg)
                self.log(f"initialising a {cfg.objective} model from the weights of {cfg.init_from}")
            check_tokenizer_for_model(tok, model.config, where=f"--init-from {cfg.init_from}")
        else:
            extra = {}
            if cfg.objective in ("bd3lm", "e2d2"):
                extra["block_size"] = cfg.block_size
                extra["attention_backend"] = cfg.attention_backend
            if cfg.objective == "e2d2":
                # Same total depth as the other models: the decoder's layers come out of the preset's.
                if cfg.size in PRESETS:  # (an unknown size is reported by from_preset below)
                    enc, dec = e2d2_layer_split(PRESETS[cfg.size][1], cfg.decoder_layers)
                    extra.update(num_hidden_layers=enc, num_decoder_layers=dec)
            mcfg = DLMConfig.from_preset(
                cfg.size,
                **extra,
                vocab_size=model_vocab_size(tok),
                objective=cfg.objective,
                time_conditioning=cfg.time_conditioning,
                max_position_embeddings=cfg.max_positions or max(1024, cfg.seq_len),
                mask_token_id=ids["mask"],
                bos_token_id=ids["bos"],
                eos_token_id=ids["eos"],
                pad_token_id=ids["pad"],
            )
            model = DLMModel(mcfg)
        if cfg.seq_len > model.config.max_position_embeddings:
            raise DLMError(f"--seq-len {cfg.seq_len} exceeds the model's maximum of "
                           f"{model.config.max_position_embeddings}; lower --seq-len")
        return model

    # ---------------------------------------------------------------- loop
    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self.stop_requested:  # second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.stop_requested = True
            self.stop_signal = signum
            self.log("\nstop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self) -> str:
        """Train, checkpoint and export. A run that fails before its first checkpoint takes back
        what it wrote into the output directory (the settings file, a tokenizer it trained)."""
        self._check_output_dir()
        made = [p for p in (self.out, os.path.join(self.out, "train_config.json"), os.path.join(self.out, "tokenizer"))
                if not os.path.exists(p)]
        try:
            return self._run()
        except BaseException:
            if self.dist.is_main and not self.has_checkpoint():
                for p in reversed(made):
                    if os.path.isdir(p) and p != self.out:
                        shutil.rmtree(p, ignore_errors=True)
                    elif os.path.isfile(p):
                        os.remove(p)
                    elif p == self.out and os.path.isdir(p) and not os.listdir(p):
                        os.rmdir(p)
            raise

    def _run(self) -> str:
        import deepspeed

        from dlm.objectives import make_objective

        cfg = self.cfg
        if self.dist.is_main:
            os.makedirs(self.out, exist_ok=True)
            checkpoint.atomic_write_text(os.path.join(self.out, "train_config.json"), json.dumps(cfg.to_dict(), indent=1))
        tok = self.setup_tokenizer()
        train_ds, val_ds = self.setup_data(tok)
        model = self.build_model(tok)
        opts = {"loss_type": cfg.radd_loss} if cfg.objective == "radd" else {}
        self.search_windows = False
        if cfg.objective in ("bd3lm", "e2d2"):
            window = parse_noise_window(cfg.noise_window)
            self.search_windows = window is None
            opts["t_range"] = window or (0.0, 1.0)  # full range until the first search
        objective = make_objective(model.config, **opts)

        use_bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        )
        ds_cfg = deepspeed_config(cfg, self.dist.world_size, use_bf16)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
            config=ds_cfg,
        )
        ema = EMA(engine.module, cfg.ema) if cfg.ema > 0 else None

        step = 0
        if cfg.resume and self.has_checkpoint():
            step, state = checkpoint.load(engine, self.ckpt_dir, ema)
            if state.get("noise_window") and hasattr(objective, "t_range"):
                objective.t_range = tuple(state["noise_window"])
            self.log(f"resumed from step {step}")
        elif cfg.resume:
            self.log(f"--resume: no checkpoint in {self.ckpt_dir} yet, starting fresh")
        metrics = MetricsWriter(self.out, step, self.dist.is_main, cfg.tensorboard)

        W, mb, acc = self.dist.world_size, cfg.micro_batch, cfg.grad_accum
        G = W * mb * acc
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: partitioned
        self.log(
            f"{cfg.objective} | {n_params / 1e6:.2f}M params | {len(train_ds)} train / {len(val_ds)} val sequences "
            f"of {cfg.seq_len} | global batch {G} ({W} proc x {mb} x {acc} accum) | bf16={use_bf16} zero={ds_cfg['zero_optimization']['stage']}"
        )
        self._install_signal_handlers()
        progress = Progress(cfg.max_steps, step, self.dist.is_main)
        tokens_per_step = G * cfg.seq_len
        t_last, loss_acc, steps_acc = time.perf_counter(), 0.0, 0
        device = self.dist.device
        stop_at = step + cfg.stop_after_steps if cfg.stop_after_steps else None
        engine.train()
        try:
            while step < cfg.max_steps:
                rows = global_rows(step, len(train_ds), G, cfg.seed)
                noise = objective.draw_noise(G, cfg.seq_len, step_generator(cfg.seed, step))
                step_loss = 0.0
                logging_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                grad_norm = None
                for a in range(acc):
                    lo = a * W * mb + self.dist.rank * mb
                    batch = train_ds[rows[lo : lo + mb].tolist()]
                    ids = batch["input_ids"].to(device)
                    am = batch["attention_mask"].to(device)
                    am = effective_mask(am)
                    micro_noise = {k: v[lo : lo + mb] for k, v in noise.items()}
                    out = objective.loss(engine, ids, am, micro_noise)
                    engine.backward(out.loss)
                    if logging_step and a == acc - 1 and ds_cfg["zero_optimization"]["stage"] == 0:
                        grad_norm = _grad_norm(engine.module)  # DeepSpeed reports none at ZeRO 0
                    engine.step()
                    step_loss += out.loss.item() / acc
                step += 1
                if ema is not None:
                    ema.update(engine.module)
                # One small all-reduce per step: the mean loss and whether any rank was interrupted.
                flags = D.all_reduce_sum(torch.tensor([step_loss, float(self.stop_requested)], device=device))
                step_loss = flags[0].item() / W
                self.stop_requested = flags[1].item() > 0
                loss_acc += step_loss
                steps_acc += 1
                progress.update(step, step_loss, tokens_per_step)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    rec = {
                        "step": step,
                        "loss": loss_acc / steps_acc,
                        "lr": engine.get_lr()[0],
                        "grad_norm": _maybe_float(engine.get_global_grad_norm()) if grad_norm is None else grad_norm,
                        "tokens_per_s": steps_acc * tokens_per_step / (now - t_last),
                        "tokens_seen": step * tokens_per_step,
                    }
                    metrics.write(rec)
                    progress.note(rec)
                    t_last, loss_acc, steps_acc = now, 0.0, 0
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    val = self.evaluate(engine, objective, val_ds, ema)
                    metrics.write({"step": step, **val})
                    progress.note({"step": step, **val})
                pause = stop_at is not None and step >= stop_at and step < cfg.max_steps
                if step % cfg.save_every == 0 or self.stop_requested or pause:
                    checkpoint.save(engine, self.ckpt_dir, step, self._state(step, objective), ema,
                                    keep=cfg.keep_checkpoints)
                if self.stop_requested:
                    progress.close()
                    self.log(f"saved checkpoint at step {step}; continue with --resume")
                    raise SystemExit(128 + int(self.stop_signal))  # 130 on Ctrl-C, 143 on SIGTERM
                if pause:
                    self.log(f"stopped after {cfg.stop_after_steps} steps at step {step}; continue with --resume")
                    return None
        finally:
            progress.close()
            metrics.close()
        if step % cfg.save_every:
            checkpoint.save(engine, self.ckpt_dir, step, self._state(step, objective), ema,
                            keep=cfg.keep_checkpoints)
        return self.export(engine, tok, ema)

    @torch.no_grad()
    def _val_nll(self, engine, objective, val_ds, batches: range, seed: int) -> float:
        """Mean NELBO per token on validation global batches `batches` under noise seeded by `seed`.

        The evaluated rows and their noise depend only on the global batch size G, never on how
        it is split into ranks x accumulation steps, so every layout reports the same number.
        Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively)."""
        cfg = self.cfg
        W, mb, accum = self.dist.world_size, cfg.micro_batch, cfg.grad_accum
        G = W * mb * accum
        total = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for b in batches:
            gen = torch.Generator().manual_seed(seed + b)
            noise_all = objective.draw_noise(G, cfg.seq_len, gen)
            for a in range(accum):
                k0 = self.dist.rank * mb * accum + a * mb
                rows = [(b * G + k0 + j) % len(val_ds) for j in range(mb)]
                batch = val_ds[rows]
                ids = batch["input_ids"].to(self.dist.device)
                am = batch["attention_mask"].to(self.dist.device)
                noise = {k: v[k0 : k0 + mb] for k, v in noise_all.items()}
                out = objective.loss(engine, ids, effective_mask(am), noise)
                total[0] += out.nll_sum.to(total)
                total[1] += out.n_tokens.to(total)
        D.all_reduce_sum(total)
        return (total[0] / total[1]).item()

    def _state(self, step, objective) -> dict:
        state = {"step": step, "config": self.cfg.to_dict()}
        if hasattr(objective, "t_range"):
            state["noise_window"] = list(objective.t_range)
        return state

    @torch.no_grad()
    def evaluate(self, engine, objective, val_ds, ema: Optional[EMA] = None) -> dict:
        """NELBO (perplexity bound) on a fixed slice of validation data with fixed noise, always
        over the full time range; for block models also re-pick the clipped training window."""
        if ema is not None:
            ema.swap(engine.module)
        engine.eval()
        window = getattr(objective, "t_range", None)
        if window is not None:
            objective.t_range = (0.0, 1.0)
        nll = self._val_nll(engine, objective, val_ds, range(self.cfg.eval_batches), 10_000_019)
        extra = {}
        if window is not None:
            objective.t_range = window
            if self.search_windows:
                objective.t_range = self.search_window(engine, objective, val_ds)
                extra["noise_window"] = list(objective.t_range)
        engine.train()
        if ema is not None:
            ema.swap(engine.module)
        key = "val_ppl" if objective.name == "ar" else "val_ppl_bound"
        return {"val_nll": nll, key: math.exp(min(nll, 50.0)), **extra}

    def search_window(self, engine, objective, val_ds, draws: int = 4) -> tuple[float, float]:
        """BD3-LM's variance reduction: the clipped window [beta, omega] whose training loss has
        the lowest variance over noise draws on a validation batch (the paper's grid search)."""
        best, best_var = None, float("inf")
        for w in NOISE_WINDOWS:
            objective.t_range = w
            vals = [self._val_nll(engine, objective, val_ds, range(1), 20_000_003 + 7919 * d) for d in range(draws)]
            mean = sum(vals) / draws
            var = sum((v - mean) ** 2 for v in vals) / (draws - 1)
            if var < best_var:
                best, best_var = w, var
        return best

    def export(self, engine, tok, ema: Optional[EMA]) -> str:
        """Write OUTPUT_DIR/model (safetensors + config + tokenizer), atomically."""
        import deepspeed

        module = engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.zero_stage == 3):
            if self.dist.is_main:
                if ema is not None:
                    sd = {n: t.cpu() for n, t in ema.state_dict().items()}
                else:
                    sd = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
        final = os.path.join(self.out, "model")
        if self.dist.is_main:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            module.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            tok.save_pretrained(tmp)
            _readable(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.log(f"exported model to {final}")
        D.barrier()
        return final


# Objectives that share one backbone (the same parameters; only masks and losses differ), so
# weights carry over: BD3-LM from MDLM (the BD3-LM paper's recipe), MDLM / RADD from an AR model
# (DiffuLLaMA / Dream adapt AR models), or an MDLM from a BD3-LM.
_SHARED_BACKBONE = ("mdlm", "radd", "bd3lm", "ar")


def _convert_objective(model, cfg: TrainConfig) -> None:
    """--init-from with another objective: continue from the weights under cfg.objective."""
    src, mc = model.config.objective, model.config
    if src not in _SHARED_BACKBONE or cfg.objective not in _SHARED_BACKBONE:
        raise DLMError(f"--init-from {cfg.init_from} is a {src!r} model and --objective is {cfg.objective!r}: "
                       f"their weights do not carry over (only {', '.join(_SHARED_BACKBONE)} share a backbone); "
                       "pass the matching objective")
    mc.objective = cfg.objective
    mc.block_size = cfg.block_size if cfg.objective == "bd3lm" else None
    if cfg.objective == "bd3lm":
        mc.attention_backend = cfg.attention_backend
    mc.validate()


def _readable(folder: str) -> None:
    """Files as the umask says (safetensors writes its temporary files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def _grad_norm(module) -> float:
    """The global L2 norm of the gradients (before clipping), as DeepSpeed reports at ZeRO >= 1."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _maybe_float(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


# Candidate clipped windows for BD3-LM / E2D2 training (a small version of the paper's grid).
NOISE_WINDOWS = ((0.0, 1.0), (0.3, 0.8), (0.5, 1.0), (0.2, 0.7), (0.45, 0.95), (0.1, 0.6))

# Settings a resumed run must keep: they define the model, the data order or the noise.
RESUME_FIXED = ("objective", "size", "seq_len", "pack", "data", "text_field", "tokenizer", "vocab_size",
                "time_conditioning", "radd_loss", "seed", "init_from", "block_size", "decoder_layers",
                "max_positions")


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

    def update(self, step: int, loss: float, tokens: int) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        tps = tokens / max(now - self.t, 1e-9)
        self.t = now
        self.bar.update(self.task, completed=step, loss=loss, tps=tps)

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


def train(cfg: TrainConfig) -> str:
    """Run training and return the exported model directory."""
    return Trainer(cfg).run()
