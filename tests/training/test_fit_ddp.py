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


def run_fit(corpus, run_dir, *overrides, objective="gpt-tiny", launcher=("-m", "framework.cli")):
    command = [
        sys.executable, *launcher, "fit", "--config", str(REPO / f"configs/experiments/{objective}.yaml"),
        f"data.train={corpus['train']}", f"data.val={corpus['val']}", f"data.tokenizer={corpus['tokenizer']}",
        "data.seq_len=32", "data.batch_size=4", "data.num_workers=1", "model.dim=32", "model.depth=1", "model.heads=2",
        "trainer.devices=2", "trainer.val_every_steps=3", "trainer.val_batches=2", "trainer.checkpoint_every_steps=3",
        "trainer.log_every_steps=1", f"run.dir={run_dir}", *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, f"returncode {result.returncode}\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_ddp_fit_checkpoints_resumes_and_logs(text_corpus, tmp_path):
    run_dir = tmp_path / "run"
    # A constant learning rate after warm-up: the schedule does not depend on max_steps, so a
    # run stopped at 6 and resumed to 9 can be compared with one that went to 9 straight.
    constant_lr = ("optim.warmup_steps=1", "optim.min_lr_ratio=1.0")
    run_fit(text_corpus, run_dir, "trainer.max_steps=6", *constant_lr)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["step-00000003.ckpt", "step-00000006.ckpt"]
    first = rows(run_dir)
    assert [r["step"] for r in first if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["val/ppl"] > 1 for r in first if "val/ppl" in r) and any("val/ppl" in r for r in first)
    counted = [r for r in first if "data/read_samples" in r]
    assert counted and counted[-1]["data/read_samples"] > 0 and counted[-1]["data/skipped_samples"] == 0
    checkpoint = torch.load(run_dir / "checkpoints/step-00000006.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["world_size"] == 2 and "local" not in loader and "rank_states" not in checkpoint, "rank 0's file holds no rank's position"
    for rank in range(2):  # each rank wrote its own data position and RNG beside the checkpoint
        own = torch.load(run_dir / f"checkpoints/step-00000006.ranks/rank-{rank:05d}.pt", weights_only=True)
        assert own["data"][0]["_snapshot"] and own["rng"]["torch"] is not None
    folder = run_dir / "checkpoints"
    assert sorted(p.stem for p in folder.glob("*.ranks")) == sorted(p.stem for p in folder.glob("*.ckpt"))

    output = run_fit(text_corpus, run_dir, "trainer.max_steps=9", *constant_lr)
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

    # Exact resume on both ranks: the same weights as a run that was never stopped.
    straight = tmp_path / "straight"
    run_fit(text_corpus, straight, "trainer.max_steps=9", *constant_lr)
    resumed = torch.load(run_dir / "checkpoints/step-00000009.ckpt", weights_only=False)["state_dict"]
    uninterrupted = torch.load(straight / "checkpoints/step-00000009.ckpt", weights_only=False)["state_dict"]
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name


KILL_AFTER_COMMIT = """
import os, sys
import framework.training.checkpoint as checkpoint
from framework.cli import main

commit = checkpoint.commit
def commit_then_die(tmp, final):
    commit(tmp, final)
    if final.name == "step-00000003.ckpt":
        os._exit(9)  # as a kill -9 right after the checkpoint became visible
checkpoint.commit = commit_then_die
main(sys.argv[1:])
"""


@pytest.mark.timeout(300)
def test_a_process_killed_right_after_a_checkpoint_keeps_that_steps_metrics(text_corpus, tmp_path):
    run_dir, script = tmp_path / "run", tmp_path / "kill_after_commit.py"
    script.write_text(KILL_AFTER_COMMIT)
    overrides = ("trainer.devices=1", "logging.wandb=disabled")
    with pytest.raises(AssertionError, match="returncode"):
        run_fit(text_corpus, run_dir, "trainer.max_steps=6", *overrides, launcher=[str(script)])
    assert (run_dir / "checkpoints/step-00000003.ckpt").exists()
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == [1, 2, 3]
    run_fit(text_corpus, run_dir, "trainer.max_steps=6", *overrides)
    logged = [r for r in rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert all("perf/step_time_s" in r for r in logged), "a checkpoint step's row has every metric of its step"


@pytest.mark.timeout(300)
def test_mlm_fit_runs_and_learns_something(text_corpus, tmp_path):
    run_dir = tmp_path / "mlm"
    run_fit(text_corpus, run_dir, "trainer.max_steps=12", "trainer.devices=1", "optim.lr=3e-3", "optim.warmup_steps=2", "logging.wandb=disabled", objective="bert-tiny")
    losses = [r["train/loss"] for r in rows(run_dir) if "train/loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert not (run_dir / "wandb").exists()


@pytest.mark.timeout(300)
def test_epochs_over_tiny_uneven_shards_finish_without_hanging(text_corpus, tmp_path):
    """3 shards of 1, 2 and 5 documents on 2 ranks x 2 workers: many epochs, no hang."""
    shards = tmp_path / "tiny"
    sizes = [1, 2, 5]
    texts = [f"def f{i}(x):\n    return x * {i}\n" * (3 + i) for i in range(sum(sizes))]
    import io
    import tarfile

    shards.mkdir()
    n = 0
    for number, size in enumerate(sizes):
        with tarfile.open(shards / f"tiny-{number:06d}.tar", "w") as tar:
            for _ in range(size):
                data = texts[n].encode()
                info = tarfile.TarInfo(f"doc{n:04d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                n += 1
    run_dir = tmp_path / "epochs"
    run_fit(text_corpus, run_dir, f"data.train={shards}", "data.num_workers=2", "trainer.max_steps=12", "logging.wandb=disabled")
    state = torch.load(run_dir / "checkpoints/step-00000012.ckpt", weights_only=False)
    loader = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["world_size"] == 2 and loader["num_workers"] == 2
    ranks = [torch.load(run_dir / f"checkpoints/step-00000012.ranks/rank-{r:05d}.pt", weights_only=True)["data"][0] for r in range(2)]
    epochs = [w["dataset_state"]["epoch"] for rank in ranks for w in rank["_snapshot"]["_worker_snapshots"].values()]
    assert min(epochs) >= 2, f"the stream went through several epochs: {epochs}"


@pytest.mark.timeout(300)
def test_resume_on_another_world_size_continues(text_corpus, tmp_path):
    """2 ranks for 4 steps, then 1 rank to 6: the data position is re-planned (elastic)."""
    run_dir = tmp_path / "elastic"
    run_fit(text_corpus, run_dir, "trainer.max_steps=4", "logging.wandb=disabled", "data.num_workers=2")
    output = run_fit(text_corpus, run_dir, "trainer.max_steps=6", "trainer.devices=1", "logging.wandb=disabled")
    assert "resuming the data position with 1 rank(s) x 1 worker(s) instead of 2 x 2" in output
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
