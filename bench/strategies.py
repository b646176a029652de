"""One model under every strategy, side by side: per-rank state, peak memory, step time, and
the framework's overhead against a hand-written PyTorch loop doing the same step.

For each of ddp, fsdp and deepspeed ZeRO 1/2/3 it runs ``fit`` on 2 processes (the CLM
objective, a GPT of ``--dim`` x ``--depth``, the standard-library shards of ``make demo``) and
records, on every rank:

* **state/rank**: bytes of parameters + optimizer state this rank holds
  (``framework.distributed.memory``; each distinct buffer once);
* **peak RSS/rank**: peak resident memory of the process on CPU (includes the ~0.5 GB Python
  + torch runtime), or the CUDA allocator's peak on GPU;
* **step**: median wall time between consecutive optimizer steps after ``--warmup`` steps
  (forward, backward, gradient sync, clipping, optimizer and scheduler step, logging, data).

The reference is a plain ``torch.nn.parallel.DistributedDataParallel`` loop launched by
torchrun: same model, loss, AdamW parameter groups, clipping and schedule, one fixed batch
reused every step (so it pays nothing for data). Overhead = framework ddp step / plain step - 1.
The plain loop and the framework's ddp run alternate ``--repeats`` times and each keeps its
fastest run (the least disturbed by other load on the machine); the spread is printed.

    .venv/bin/python bench/strategies.py                    # about 5 minutes on 2 CPU cores
    .venv/bin/python bench/strategies.py --only ddp plain   # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {
    "plain": [],
    "ddp": ["trainer.strategy=ddp"],
    "fsdp": ["trainer.strategy=fsdp"],
    "zero1": ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=1"],
    "zero2": ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=2"],
    "zero3": ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"],
}
WORLD = 2


def peak_memory(device: Any) -> int:
    from framework.training.callbacks.throughput import peak_memory_bytes

    return peak_memory_bytes(device)


def gather_to_file(record: Dict[str, Any], out: Path) -> None:
    import torch.distributed as dist

    records: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(records))


# --- the framework's runs -------------------------------------------------------------------


def run_framework(args: argparse.Namespace) -> None:
    import torch
    from lightning.pytorch import Callback

    from framework.config.load import load_config
    from framework.distributed.memory import rank_state_bytes
    from framework.training.fit import fit

    class Recorder(Callback):
        def __init__(self) -> None:
            self.step_ends: List[float] = []
            self.inside: List[float] = []  # seconds in the optimizer step: forward, backward, clip, update
            self.record: Dict[str, Any] = {}

        def on_train_start(self, trainer, pl_module) -> None:
            # The rest of a step (data, callbacks, logging, Lightning's loop) is what the framework
            # adds; timed within one run, it does not depend on the machine's load as a
            # comparison of two runs does.
            optimizer_step = pl_module.optimizer_step

            def timed(*args_: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                result = optimizer_step(*args_, **kwargs)
                self.inside.append(time.perf_counter() - started)
                return result

            pl_module.optimizer_step = timed

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_ends.append(time.perf_counter())
            if trainer.global_step == args.steps:  # measured before the final checkpoint is written
                self.record = {
                    **rank_state_bytes(pl_module, trainer.optimizers[0]),
                    "peak_memory": peak_memory(pl_module.device),
                    "step_times": [b - a for a, b in zip(self.step_ends, self.step_ends[1:])][args.warmup - 1:],
                    "inside_times": self.inside[args.warmup:],
                    "parameters": sum(p.numel() for p in pl_module.parameters()) if args.worker != "zero3" else None,
                }
                gather_to_file(self.record, Path(args.out))

    overrides = RUNS[args.worker] + model_overrides(args) + [
        "trainer.devices=2", f"trainer.max_steps={args.steps}", "trainer.val_batches=0",
        "trainer.checkpoint_every_steps=1000000", "trainer.log_every_steps=5", "logging.wandb=disabled",
        "logging.progress=false", f"run.dir={args.workdir / 'runs' / args.worker}", "run.resume=never",
    ]
    torch.set_num_threads(1)
    fit(load_config(str(REPO / "configs/experiments/gpt-tiny.yaml"), overrides), extra_callbacks=[Recorder()])


def model_overrides(args: argparse.Namespace) -> List[str]:
    data = args.data
    return [
        f"data.train={data / 'shards' / 'train'}", f"data.val={data / 'shards' / 'val'}", f"data.tokenizer={data / 'tokenizer.json'}",
        f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
        f"model.dim={args.dim}", f"model.depth={args.depth}", f"model.heads={args.heads}", f"model.max_seq_len={args.seq_len}",
        "optim.grad_clip=1.0",
    ]


# --- the hand-written reference -------------------------------------------------------------


def run_plain(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from framework.config.load import load_config
    from framework.losses.language import next_token_loss
    from framework.models.transformer import Transformer
    from framework.objectives.text_common import tokenizer_facts
    from framework.training.optim import parameter_groups, warmup_cosine
    from framework.distributed.memory import rank_state_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(str(REPO / "configs/experiments/gpt-tiny.yaml"), model_overrides(args) + [f"trainer.max_steps={args.steps}"])
    vocab, _ = tokenizer_facts(cfg)
    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model, vocab, causal=True)

    class Step(nn.Module):  # the loss inside forward, so DDP sees the whole step
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return next_token_loss(self.model.logits(self.model(tokens)), tokens)

    step = nn.parallel.DistributedDataParallel(Step(), gradient_as_bucket_view=True)
    o = cfg.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, o.warmup_steps, args.steps, o.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
    ends = [time.perf_counter()]
    for _ in range(args.steps):
        loss = step(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    record = {
        **rank_state_bytes(model, optimizer),
        "peak_memory": peak_memory(torch.device("cpu")),
        "step_times": [b - a for a, b in zip(ends, ends[1:])][args.warmup:],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    gather_to_file(record, Path(args.out))
    dist.barrier()
    # Skip interpreter teardown: freeing DDP's reducer can deadlock with gloo's worker thread
    # (it waits for the GIL the main thread holds while joining it); the results are written.
    sys.stdout.flush()
    os._exit(0)


# --- orchestration --------------------------------------------------------------------------


def launch(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    out = args.workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    shutil.rmtree(args.workdir / "runs" / name, ignore_errors=True)  # a fresh run each time
    common = ["--workdir", str(args.workdir), "--data", str(args.data), "--out", str(out), "--dim", str(args.dim), "--depth", str(args.depth),
              "--heads", str(args.heads), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--num-workers", str(args.num_workers)]
    if name == "plain":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                   str(Path(__file__).resolve()), "--plain", *common]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0 or not out.exists():
        sys.exit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    print(f"  {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return {"ranks": json.loads(out.read_text())}


def _median_step(result: Dict[str, Any]) -> float:
    return statistics.median(t for r in result["ranks"] for t in r["step_times"])


def report(results: Dict[str, Dict[str, Any]], args: argparse.Namespace, spread: Dict[str, List[float]]) -> None:
    mib = 2**20
    parameters = next(r["ranks"][0]["parameters"] for r in results.values() if r["ranks"][0]["parameters"])
    print()
    print(f"model: GPT (clm) dim {args.dim}, depth {args.depth}, heads {args.heads}: {parameters / 1e6:.2f} M parameters; "
          f"batch {args.batch_size} x {args.seq_len} tokens per rank; {WORLD} ranks on CPU (gloo, 1 thread each), fp32, AdamW")
    print(f"step time: median over steps {args.warmup + 1}..{args.steps}; state = parameters + optimizer state held by one rank")
    print()
    header = (f"{'strategy':<14}{'params/rank':>13}{'optim/rank':>13}{'state/rank':>13}{'vs ddp':>9}{'peak RSS/rank':>15}"
              f"{'step (ms)':>11}{'vs plain':>10}{'outside (ms)':>14}")
    print(header)
    print("-" * len(header))
    ddp_state = None
    if "ddp" in results:
        r0 = results["ddp"]["ranks"][0]
        ddp_state = r0["params"] + r0["optimizer"]
    plain_step = statistics.median(t for r in results["plain"]["ranks"] for t in r["step_times"]) if "plain" in results else None
    for name, result in results.items():
        ranks = result["ranks"]
        params = max(r["params"] for r in ranks)
        optim = max(r["optimizer"] for r in ranks)
        state = max(r["params"] + r["optimizer"] for r in ranks)
        peak = max(r["peak_memory"] for r in ranks)
        step = statistics.median(t for r in ranks for t in r["step_times"])
        label = "plain DDP loop" if name == "plain" else name
        ratio = f"{state / ddp_state:.2f}" if ddp_state else "-"
        overhead = f"{(step / plain_step - 1) * 100:+.1f}%" if plain_step else "-"
        outside = "-"
        if ranks[0].get("inside_times"):
            extra = statistics.median(s - i for r in ranks for s, i in zip(r["step_times"], r["inside_times"]))
            outside = f"{extra * 1000:.1f} {extra / step * 100:.1f}%"
        print(f"{label:<14}{params / mib:>10.1f} MiB{optim / mib:>9.1f} MiB{state / mib:>9.1f} MiB{ratio:>9}"
              f"{peak / mib:>11.0f} MiB{step * 1000:>11.1f}{overhead:>10}{outside:>14}")
    print()
    print("vs ddp: this rank's state over ddp's (goal for full sharding: 1/world = 0.50). ZeRO 1/2 keep full")
    print("parameters and shard the optimizer side (moments + an fp32 master copy of the rank's partition).")
    print("vs plain: step time over the hand-written loop's (the ddp row is the framework's overhead; the")
    print("others add their strategy's communication on top).")
    print("outside: the median time of a step spent outside the optimizer step (forward, backward, clipping,")
    print("update): the data, callbacks, logging and loop the framework adds, timed inside each run.")
    for name, medians in spread.items():
        if len(medians) > 1:
            print(f"{name}: medians of {len(medians)} runs: {', '.join(f'{m * 1000:.0f}' for m in medians)} ms (fastest kept)")
    if len(spread.get("ddp", [])) > 1 and len(spread.get("plain", [])) > 1:
        # Each ddp run follows a plain one: a pair shares the machine's load of its moment.
        pairs = [d / p - 1 for p, d in zip(spread["plain"], spread["ddp"])]
        print(f"ddp vs plain per alternating pair: {', '.join(f'{r * 100:+.1f}%' for r in pairs)}; "
              f"median {statistics.median(pairs) * 100:+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to do (default: all)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of the plain loop and ddp")
    parser.add_argument("--num-workers", type=int, default=1, help="data loader workers per rank (framework runs)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-strategies")
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "demo" / "data", help="made as by `make demo` if missing")
    parser.add_argument("--worker", choices=[n for n in RUNS if n != "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir, args.data = args.workdir.resolve(), args.data.resolve()
    if args.plain:
        return run_plain(args)
    if args.worker:
        return run_framework(args)

    from framework.demo import prepare_data

    args.workdir.mkdir(parents=True, exist_ok=True)
    prepare_data(args.data)
    results = {}
    print(f"running {', '.join(args.only or RUNS)} ({WORLD} processes each):", flush=True)
    names = list(args.only or RUNS)
    pair = [n for n in ("plain", "ddp") if n in names]
    order = pair * args.repeats + [n for n in names if n not in pair]
    for name in order:
        result = launch(name, args)
        results.setdefault(name, []).append(result)
    report({n: min(runs, key=_median_step) for n, runs in results.items()}, args, spread={n: [_median_step(r) for r in runs] for n, runs in results.items()})


if __name__ == "__main__":
    main()
