"""A real 2-process DDP run of `pretrain fit` (gloo on CPU), then a resumed run."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wandb_offline import history

REPO = Path(__file__).resolve().parents[2]


def run_fit(corpus, run_dir, *overrides, objective="gpt-tiny"):
    command = [
        sys.executable, "-m", "framework.cli", "fit", "--config", str(REPO / f"configs/experiments/{objective}.yaml"),
        f"data.train={corpus['train']}", f"data.val={corpus['val']}", f"data.tokenizer={corpus['tokenizer']}",
        "data.seq_len=32", "data.batch_size=4", "data.num_workers=1", "model.dim=32", "model.depth=1", "model.heads=2",
        "trainer.devices=2", "trainer.val_every_steps=3", "trainer.val_batches=2", "trainer.checkpoint_every_steps=3",
        "trainer.log_every_steps=1", f"run.dir={run_dir}", *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_ddp_fit_checkpoints_resumes_and_logs(text_corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_fit(text_corpus, run_dir, "trainer.max_steps=6")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["step-00000003.ckpt", "step-00000006.ckpt"]
    first = rows(run_dir)
    assert [r["step"] for r in first if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["val/ppl"] > 1 for r in first if "val/ppl" in r) and any("val/ppl" in r for r in first)
    checkpoint = torch.load(run_dir / "checkpoints/step-00000006.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"], "the data loader state is in the checkpoint"

    output = run_fit(text_corpus, run_dir, "trainer.max_steps=9")
    assert "resuming from step-00000006.ckpt" in output
    assert (run_dir / "checkpoints/step-00000009.ckpt").exists()
    steps = [r["step"] for r in rows(run_dir) if "train/loss" in r]
    assert steps == list(range(1, 10)), "the resumed run continues at step 7, with no step logged twice"

    # One W&B run id across both runs, read back from the offline run files.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2
    logged = [row for f in files for row in history(Path(f))]
    assert {row["trainer/global_step"] for row in logged if "train/loss" in row} == set(range(9))
    assert any("val/ppl" in row for row in logged)


@pytest.mark.timeout(300)
def test_mlm_fit_runs_and_learns_something(text_corpus, tmp_path):
    run_dir = tmp_path / "mlm"
    run_fit(text_corpus, run_dir, "trainer.max_steps=12", "trainer.devices=1", "optim.lr=3e-3", "optim.warmup_steps=2", "logging.wandb=disabled", objective="bert-tiny")
    losses = [r["train/loss"] for r in rows(run_dir) if "train/loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert not (run_dir / "wandb").exists()
