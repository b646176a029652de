"""The Preemption callback's pieces without a cluster: the handler only sets a flag, the
requeue is bounded, Lightning's own auto-requeue is off."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from framework.training.callbacks import preemption as p


def test_handler_only_sets_a_flag(tmp_path):
    callback = p.Preemption(tmp_path, max_requeues=1)
    callback._handler(signal.SIGUSR1, None)
    callback._handler(signal.SIGTERM, None)
    assert callback.received == signal.SIGUSR1 and not list(tmp_path.iterdir()), "nothing saved or written in the handler"


def test_requeue_is_bounded_by_max_requeues(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(p.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    callback = p.Preemption(tmp_path, max_requeues=2)
    callback.stopped_at = 5
    callback._requeue()
    callback._requeue()
    callback._requeue()  # the third is refused
    assert calls == [["scontrol", "requeue", "123"]] * 2
    rows = [json.loads(line) for line in (tmp_path / p.REQUEUE_FILE).read_text().splitlines()]
    assert [r["job"] for r in rows] == ["123", "123"] and p.requeue_count(tmp_path) == 2
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert p.slurm_job_id() == "77_3"


def test_outside_slurm_nothing_is_requeued(tmp_path, monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(p.subprocess, "run", lambda *a, **k: pytest.fail("scontrol called outside Slurm"))
    p.Preemption(tmp_path)._requeue()
    assert not (tmp_path / p.REQUEUE_FILE).exists()


def test_max_requeues_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(p.MAX_REQUEUES_ENV, "7")
    assert p.Preemption(tmp_path).max_requeues == 7


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
def test_lightning_auto_requeue_is_switched_off(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=1, plugins=[SLURMEnvironment(auto_requeue=True)], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    p.disable_lightning_auto_requeue(trainer)
    assert environment.auto_requeue is False


def test_sigusr1_wins_over_sigterm(tmp_path):
    callback = p.Preemption(tmp_path)
    callback._handler(signal.SIGTERM, None)
    callback._handler(signal.SIGUSR1, None)
    assert callback.received == signal.SIGUSR1


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_at_the_next_step_and_stops(text_corpus, tmp_path):
    import sys

    from launch_helpers import CONFIG, REPO, env, metric_steps, tiny, wait_for

    run_dir = tmp_path / "term"
    proc = subprocess.Popen(
        [sys.executable, "-m", "framework.cli", "fit", "--config", CONFIG, *tiny(text_corpus, run_dir, steps=400),
         "trainer.devices=1", "trainer.checkpoint_every_steps=1000", "logging.wandb=disabled"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO,
    )
    try:
        wait_for(lambda: len(metric_steps(run_dir)) >= 2, 240, "a few steps")
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    rows = [json.loads(line) for line in (run_dir / p.PREEMPTION_FILE).read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["signal"] == "SIGTERM"
    stopped = rows[0]["step"]
    assert 2 <= stopped < 400
    assert sorted(c.name for c in (run_dir / "checkpoints").iterdir()) == [f"step-{stopped:08d}.ckpt", f"step-{stopped:08d}.ranks"]
    assert not (run_dir / p.REQUEUE_FILE).exists()
