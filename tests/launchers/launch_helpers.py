"""Helpers of the launcher tests: tiny-model overrides, running the CLI, comparing final weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/gpt-tiny.yaml")
# A step takes ~0.02 s: 200 leave a signal or a kill seconds to land mid-run even when the
# machine is loaded (at 40 the whole run after the first steps took under a second).
STEPS = 200
EVERY = 20


def tiny(corpus: dict, run_dir: Path, steps: int = STEPS) -> List[str]:
    """A tiny model with a constant learning rate (warm-up 1, no decay): the schedule does not
    depend on when a run stopped, so a resumed run can be compared with an uninterrupted one."""
    return [
        f"data.train={corpus['train']}", f"data.val={corpus['val']}", f"data.tokenizer={corpus['tokenizer']}",
        "data.seq_len=32", "data.batch_size=4", "data.num_workers=0", "model.dim=32", "model.depth=1", "model.heads=2",
        "trainer.val_every_steps=1000", "trainer.val_batches=1", f"trainer.checkpoint_every_steps={EVERY}",
        "trainer.keep_last_checkpoints=-1", "trainer.log_every_steps=1", "optim.warmup_steps=1", "optim.min_lr_ratio=1.0",
        "logging.progress=false", f"trainer.max_steps={steps}", f"run.dir={run_dir}",
    ]


def env() -> dict:
    # One thread per rank everywhere: the float result of a matmul depends on the thread count,
    # and torchrun sets 1 only when it starts several processes per node.
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "framework.cli", *args], capture_output=True, text=True,
                            env=env(), timeout=timeout, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_weights(run_dir: Path, steps: int = STEPS) -> dict:
    path = Path(run_dir) / "checkpoints" / f"step-{steps:08d}.ckpt"
    assert path.exists(), f"{path} missing; have {sorted(p.name for p in path.parent.glob('*'))}"
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), f"{name} differs"


def metric_steps(run_dir: Path) -> List[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    # Polled while a run appends: a last line without its newline may be half-written.
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line)["step"] for line in complete if line.strip() and "train/loss" in line]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
