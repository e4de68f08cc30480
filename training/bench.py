"""`dlm bench train`: training throughput of AR vs MDLM vs RADD, and what DeepSpeed costs.

    dlm bench train --size small --seq-len 256 --micro-batch 8 --steps 20

Measures, in one run and on the same backbone, batch and data:
  1. tokens/s of an optimizer step for AR, MDLM and RADD under DeepSpeed (1 process);
  2. the same steps in a plain PyTorch loop (torch AdamW + clipping + LambdaLR), for each;
  3. 2 processes (torchrun, gloo): DeepSpeed vs plain torch DDP at the same global batch.
Configurations are interleaved over `--repeats` rounds and the median is reported, since this
machine is shared and noisy. Method after gpt-fast: warm-up steps first, then timed steps.
Data are random token ids: step cost does not depend on their content.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from dlm.runtime import free_port

OBJECTIVES = ("ar", "mdlm", "radd")


def _model(objective: str, size: str, seq_len: int, vocab: int = 4096, block_size: int = 4):
    from dlm.families import family
    from dlm.model import PRESETS, DLMConfig, DLMModel, e2d2_layer_split

    torch.manual_seed(0)
    extra = {}
    fam = family(objective)
    if fam.block_causal:
        extra["block_size"] = block_size
    if fam.encoder_decoder:  # equal total layers: the decoder's come out of the preset's
        enc, dec = e2d2_layer_split(PRESETS[size][1])
        extra.update(num_hidden_layers=enc, num_decoder_layers=dec)
    cfg = DLMConfig.from_preset(size, vocab_size=vocab, objective=objective, mask_token_id=vocab - 1,
                                bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                max_position_embeddings=max(1024, seq_len), **extra)
    return DLMModel(cfg)


class Runner:
    """One configuration: `step()` runs one optimizer step on a fixed random batch."""

    def __init__(self, objective, engine_kind, size, seq_len, micro_batch, world=1, rank=0, block_size=4):
        from dlm.training.config import TrainConfig, deepspeed_config
        from dlm.training.trainer import lr_lambda

        from dlm.objectives import make_objective

        model = _model(objective, size, seq_len, block_size=block_size)
        self.obj = make_objective(model.config)
        self.B, self.L, self.rank, self.world = micro_batch, seq_len, rank, world
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(3, model.config.vocab_size - 1, (micro_batch * world, seq_len), generator=g)
        self.x[:, 0] = 0
        cfg = TrainConfig(micro_batch=micro_batch, lr=3e-4, warmup_steps=10, max_steps=10_000)
        self.kind = engine_kind
        if engine_kind == "deepspeed":
            import deepspeed

            self.engine, *_ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg, world, False),
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
            self.model = self.engine
        else:
            if world > 1:
                model = torch.nn.parallel.DistributedDataParallel(model)
            self.model = model
            self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.n = 0

    def step(self):
        noise = self.obj.draw_noise(self.B * self.world, self.L, torch.Generator().manual_seed(self.n))
        lo = self.rank * self.B
        noise = {k: v[lo : lo + self.B] for k, v in noise.items()}
        x = self.x[lo : lo + self.B]
        self.n += 1
        if self.kind == "deepspeed":
            loss = self.obj.loss(self.model, x, None, noise).loss
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss = self.obj.loss(self.model, x, None, noise).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)

    def time(self, warmup: int, steps: int) -> float:
        """Seconds per step after `warmup` untimed steps (synchronised where it matters)."""
        for _ in range(warmup):
            self.step()
        _sync(self.world)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.world)
        return (time.perf_counter() - t0) / steps


def _sync(world: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if world > 1:
        torch.distributed.barrier()


def measure(objectives, kinds, size, seq_len, micro_batch, warmup, steps, repeats, world=1, rank=0,
            block_size=4) -> dict:
    runners = {(o, k): Runner(o, k, size, seq_len, micro_batch, world, rank, block_size)
               for o in objectives for k in kinds}
    times = {key: [] for key in runners}
    for _ in range(repeats):  # interleave so drifts in machine load hit every configuration alike
        for key, r in runners.items():
            times[key].append(r.time(warmup, steps))
    tokens = micro_batch * world * seq_len
    return {f"{o}/{k}": {"s_per_step": statistics.median(times[(o, k)]),
                         "tokens_per_s": tokens / statistics.median(times[(o, k)]),
                         "all_s_per_step": times[(o, k)]} for (o, k) in runners}


def worker_main() -> None:
    """Entry for the 2-process measurement (run under torchrun by `main`)."""
    import argparse

    from dlm.training import distributed as D

    p = argparse.ArgumentParser()
    for a in ("--size", "--objective"):
        p.add_argument(a)
    for a in ("--seq-len", "--micro-batch", "--warmup", "--steps", "--repeats"):
        p.add_argument(a, type=int)
    a = p.parse_args()
    info = D.setup()
    res = measure([a.objective], ["deepspeed", "torch"], a.size, a.seq_len, a.micro_batch, a.warmup, a.steps,
                  a.repeats, world=info.world_size, rank=info.rank)
    if info.is_main:
        print("RESULT " + json.dumps(res), flush=True)


def main(args) -> dict:
    from dlm.training import distributed as D

    D.setup()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.blocks:
        return blocks_main(args)
    print(f"measuring AR / MDLM / RADD x DeepSpeed / torch: size {args.size}, seq {args.seq_len}, "
          f"batch {args.micro_batch}, {args.repeats} rounds of {args.steps} steps", file=sys.stderr)
    one = measure(OBJECTIVES, ["deepspeed", "torch"], args.size, args.seq_len, args.micro_batch,
                  args.warmup, args.steps, args.repeats)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("func",)},
              "device": "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
              "one_process": one}
    ar = one["ar/deepspeed"]["s_per_step"]
    report["ratios"] = {
        "mdlm_step_over_ar": one["mdlm/deepspeed"]["s_per_step"] / ar,
        "radd_step_over_ar": one["radd/deepspeed"]["s_per_step"] / ar,
        **{f"deepspeed_over_torch_{o}_1proc": one[f"{o}/deepspeed"]["s_per_step"] / one[f"{o}/torch"]["s_per_step"]
           for o in OBJECTIVES},
    }
    if not args.skip_multiproc:
        # Same global batch on 2 processes: each takes half of it.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "dlm.training.bench", "--size", args.size, "--objective", "mdlm",
               "--seq-len", str(args.seq_len), "--micro-batch", str(max(1, args.micro_batch // 2)),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"2-process benchmark failed:\n{proc.stderr[-3000:]}")
        two = json.loads(line[0][len("RESULT "):])
        report["two_processes"] = two
        report["ratios"]["deepspeed_over_torch_ddp_2proc"] = (
            two["mdlm/deepspeed"]["s_per_step"] / two["mdlm/torch"]["s_per_step"])
        report["ratios"]["deepspeed_2proc_over_1proc_time"] = (
            two["mdlm/deepspeed"]["s_per_step"] / one["mdlm/deepspeed"]["s_per_step"])
    _print_table(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return report


def blocks_main(args) -> dict:
    """`dlm bench train --blocks`: step cost per token of MDLM vs BD3-LM vs E2D2 (equal total
    layers, DeepSpeed, 1 process), one interleaved run. Target: E2D2 <= 0.6 x BD3-LM."""
    objs = ("mdlm", "bd3lm", "e2d2")
    print(f"measuring MDLM / BD3-LM / E2D2 (block {args.block_size}): size {args.size}, seq {args.seq_len}, "
          f"batch {args.micro_batch}, {args.repeats} rounds of {args.steps} steps", file=sys.stderr)
    one = measure(objs, ["deepspeed"], args.size, args.seq_len, args.micro_batch, args.warmup, args.steps,
                  args.repeats, block_size=args.block_size)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("func",)},
              "device": "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
              "one_process": one}
    s = {o: one[f"{o}/deepspeed"]["s_per_step"] for o in objs}
    report["ratios"] = {"e2d2_step_over_bd3lm": s["e2d2"] / s["bd3lm"], "bd3lm_step_over_mdlm": s["bd3lm"] / s["mdlm"],
                        "e2d2_step_over_mdlm": s["e2d2"] / s["mdlm"]}
    _print_table(report, title="ratios (target: E2D2 <= 0.6 x BD3-LM)")
    out = args.out if args.out != DEFAULT_OUT else "runs/bench/block_step_cost.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)
    return report


DEFAULT_OUT = "runs/bench/train_throughput.json"  # (the committed results live in evals/results/)


def _print_table(report: dict, title: str = "ratios (targets: MDLM/RADD <= 1.15 x AR; DeepSpeed <= 1.10 x torch)") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="training throughput (median over rounds)")
    for col in ("configuration", "processes", "s / step", "tokens / s"):
        t.add_column(col)
    for procs, key in ((1, "one_process"), (2, "two_processes")):
        for name, r in report.get(key, {}).items():
            t.add_row(name, str(procs), f"{r['s_per_step']:.4f}", f"{r['tokens_per_s']:,.0f}")
    Console().print(t)
    r = Table(title=title)
    r.add_column("ratio")
    r.add_column("value")
    for k, v in report["ratios"].items():
        r.add_row(k, f"{v:.3f}")
    Console().print(r)


if __name__ == "__main__":
    worker_main()
