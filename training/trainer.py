"""The DeepSpeed trainer behind `dlm train`.

    dlm train --objective mdlm --size tiny --max-steps 2000              # one process
    torchrun --nproc_per_node 2 -m dlm.cli train --micro-batch 8 ...     # two processes
    deepspeed --num_accelerators 2 --module dlm.cli train ...            # DeepSpeed launcher

`Trainer.run` reads: setup (tokenizer, packed data, model, objective, DeepSpeed engine, resume)
-> for every step: train_step (the micro-batches of the global batch; the loss stays on the
device) -> log -> evaluate -> checkpoint -> export OUTPUT_DIR/model. The data order and noise
of every step come from training/schedule.py (exact resume; N processes match one), what is
reported from training/metrics.py, the model from training/model_init.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from dlm.training import checkpoint
from dlm.training import distributed as D
from dlm.training.config import TrainConfig, deepspeed_config, parse_noise_window
from dlm.training.metrics import MetricsWriter, Progress
from dlm.training.model_init import build_model
from dlm.training.schedule import EMA, global_rows, lr_lambda, step_generator

from dlm.errors import DLMError, MissingSplitError
from dlm.families import family
from dlm.noise import effective_mask


@dataclass
class Run:
    """What setup() builds and the loop uses."""

    tok: Any
    train_ds: Any
    val_ds: Any
    objective: Any
    engine: Any
    ema: Optional[EMA]
    zero_stage: int
    bf16: bool
    step: int  # the step to continue from (0, or the resumed checkpoint's)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.dist = D.setup(cfg.threads)
        self.stop_requested = False
        self.published = None  # the config of a published checkpoint this run fine-tunes
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
        if self.published is not None:  # fine-tuning a published model: its own tokenizer and ids
            from dlm.loading import load_tokenizer_for

            tok = load_tokenizer_for(cfg.init_from, self.published, tokenizer=cfg.tokenizer)
            if self.dist.is_main:
                tok.save_pretrained(tok_dir)
            return tok
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
        return build_model(self.cfg, tok, log=self.log)

    def setup(self) -> Run:
        """Output directory, tokenizer, data, model, objective, DeepSpeed engine; resume."""
        import deepspeed

        from dlm.objectives import make_objective

        cfg = self.cfg
        self.published = self._published_init()
        if self.dist.is_main:
            os.makedirs(self.out, exist_ok=True)
            checkpoint.atomic_write_text(os.path.join(self.out, "train_config.json"), json.dumps(cfg.to_dict(), indent=1))
        tok = self.setup_tokenizer()
        train_ds, val_ds = self.setup_data(tok)
        model = self.build_model(tok)
        opts = {"loss_type": cfg.radd_loss}  # (make_objective passes on only what the objective takes)
        self.search_windows = False
        if family(cfg.objective).block_causal:  # one noise level per block: the clipped schedule
            window = parse_noise_window(cfg.noise_window)
            self.search_windows = window is None
            opts["t_range"] = window or (0.0, 1.0)  # full range until the first search
        objective = make_objective(model.config, **opts)
        bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        ds_cfg = deepspeed_config(cfg, self.dist.world_size, bf16)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)), config=ds_cfg)
        ema = EMA(engine.module, cfg.ema) if cfg.ema > 0 else None
        step = 0
        if cfg.resume and self.has_checkpoint():
            step, state = checkpoint.load(engine, self.ckpt_dir, ema)
            if state.get("noise_window") and hasattr(objective, "t_range"):
                objective.t_range = tuple(state["noise_window"])
            self.log(f"resumed from step {step}")
        elif cfg.resume:
            self.log(f"--resume: no checkpoint in {self.ckpt_dir} yet, starting fresh")
        return Run(tok, train_ds, val_ds, objective, engine, ema, ds_cfg["zero_optimization"]["stage"], bf16, step)

    def _published_init(self):
        """--init-from a published checkpoint: its config (no weights yet), and the run trains it
        under its family's objective (a block-causal family with its own block size)."""
        from dlm.families import family_of
        from dlm.loading import published_config

        cfg = self.cfg
        pub = published_config(cfg.init_from) if cfg.init_from else None
        if pub is None:
            return None
        fam = family_of(pub)
        if cfg.objective != fam.objective:
            if cfg.objective != TrainConfig.objective:  # given explicitly: refuse, naming the right one
                raise DLMError(f"--init-from {cfg.init_from} is a {fam.name} model, trained as {fam.objective}; "
                               f"drop --objective {cfg.objective} (or pass --objective {fam.objective})")
            self.log(f"{cfg.init_from} is a {fam.name} model: training it as {fam.objective}")
            cfg.objective = fam.objective
        if fam.block_causal:
            cfg.block_size = pub.block_size
        return pub

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
        cfg, run = self.cfg, self.setup()
        engine, step = run.engine, run.step
        W, mb, acc = self.dist.world_size, cfg.micro_batch, cfg.grad_accum
        G = W * mb * acc
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: partitioned
        self.log(f"{cfg.objective} | {n_params / 1e6:.2f}M params | {len(run.train_ds)} train / {len(run.val_ds)} val "
                 f"sequences of {cfg.seq_len} | global batch {G} ({W} proc x {mb} x {acc} accum) | bf16={run.bf16} "
                 f"zero={run.zero_stage}")
        self._install_signal_handlers()
        metrics = MetricsWriter(self.out, step, self.dist.is_main, cfg.tensorboard)
        progress = Progress(cfg.max_steps, step, self.dist.is_main)
        tokens_per_step = G * cfg.seq_len
        window_loss = torch.zeros((), dtype=torch.float64, device=self.dist.device)  # summed until a log step
        t_last, steps_acc = time.perf_counter(), 0
        stop_at = step + cfg.stop_after_steps if cfg.stop_after_steps else None
        engine.train()
        try:
            while step < cfg.max_steps:
                logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                loss, grad_norm = self.train_step(run, step, want_grad_norm=logging)
                step += 1
                window_loss += loss
                steps_acc += 1
                self.stop_requested = D.any_rank(self.stop_requested)
                rec = None
                if logging:
                    now = time.perf_counter()
                    rec = {"step": step, "loss": D.all_reduce_sum(window_loss.clone()).item() / W / steps_acc,
                           "lr": engine.get_lr()[0],
                           "grad_norm": _maybe_float(engine.get_global_grad_norm()) if grad_norm is None else grad_norm,
                           "tokens_per_s": steps_acc * tokens_per_step / (now - t_last),
                           "tokens_seen": step * tokens_per_step}
                    metrics.write(rec)
                    progress.note(rec)
                    t_last, steps_acc = now, 0
                    window_loss.zero_()
                progress.update(step, tokens_per_step, None if rec is None else rec["loss"])
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    val = self.evaluate(engine, run.objective, run.val_ds, run.ema)
                    metrics.write({"step": step, **val})
                    progress.note({"step": step, **val})
                pause = stop_at is not None and stop_at <= step < cfg.max_steps
                if step % cfg.save_every == 0 or self.stop_requested or pause:
                    self.checkpoint(run, step)
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
            self.checkpoint(run, step)
        return self.export(engine, run.tok, run.ema)

    def train_step(self, run: Run, step: int, want_grad_norm: bool = False):
        """One optimizer step over the global batch of `step` (this rank's micro-batches). Returns
        this rank's mean loss as a device tensor (read at logging steps only) and, when asked and
        DeepSpeed reports none (ZeRO 0), the gradient norm."""
        cfg, engine, device = self.cfg, run.engine, self.dist.device
        W, mb, acc = self.dist.world_size, cfg.micro_batch, cfg.grad_accum
        G = W * mb * acc
        rows = global_rows(step, len(run.train_ds), G, cfg.seed)
        noise = run.objective.draw_noise(G, cfg.seq_len, step_generator(cfg.seed, step))
        loss, grad_norm = torch.zeros((), dtype=torch.float64, device=device), None
        for a in range(acc):
            lo = a * W * mb + self.dist.rank * mb
            batch = run.train_ds[rows[lo : lo + mb].tolist()]
            # host tensors: the objective decides on the host what the step needs (which positions
            # are noised and scored, padding) and copies it over without waiting (dlm/objectives.py)
            am = effective_mask(batch["attention_mask"])
            out = run.objective.loss(engine, batch["input_ids"], am, {k: v[lo : lo + mb] for k, v in noise.items()})
            engine.backward(out.loss)
            if want_grad_norm and a == acc - 1 and run.zero_stage == 0:
                grad_norm = _grad_norm(engine.module)
            engine.step()
            loss += out.loss.detach() / acc
        if run.ema is not None:
            run.ema.update(engine.module)
        return loss, grad_norm

    def checkpoint(self, run: Run, step: int) -> None:
        checkpoint.save(run.engine, self.ckpt_dir, step, self._state(step, run.objective), run.ema,
                        keep=self.cfg.keep_checkpoints)

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
                batch = val_ds[rows]  # host tensors, as in train_step
                noise = {k: v[k0 : k0 + mb] for k, v in noise_all.items()}
                out = objective.loss(engine, batch["input_ids"], effective_mask(batch["attention_mask"]), noise)
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
        key = "val_ppl" if family(self.cfg.objective).autoregressive else "val_ppl_bound"
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
            from dlm.loading import save_model

            save_model(module, tmp, state_dict=sd)  # a published family: in its own format
            tok.save_pretrained(tmp)
            _readable(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.log(f"exported model to {final}")
        D.barrier()
        return final


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


def train(cfg: TrainConfig) -> str:
    """Run training and return the exported model directory."""
    return Trainer(cfg).run()
