"""`pretrain launch torchrun`: command lines, two c10d "nodes" on one host, and a worker killed
with -9 under --max-restarts 1 (the group restarts, resumes and ends with the uninterrupted weights)."""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from framework.config.load import load_config
from framework.errors import ConfigError
from framework.training.environment import check_launch_environment
from launch_helpers import CONFIG, EVERY, REPO, STEPS, assert_same_weights, cli, env, final_weights, metric_steps, tiny, wait_for


def test_dry_run_one_box_is_standalone(text_corpus, tmp_path):
    out = cli("launch", "torchrun", "--config", CONFIG, "--nproc-per-node", "2", "--max-restarts", "2", "--dry-run",
              *tiny(text_corpus, tmp_path / "r")).stdout.strip()
    env_line, *command = shlex.split(out)
    assert env_line == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:7] == ["--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=2"]
    assert command[7:12] == ["-m", "framework.cli", "fit", "--config", CONFIG]
    assert command[-2:] == ["trainer.devices=2", "trainer.num_nodes=1"]
    assert not any("rdzv" in c for c in command)


def test_dry_run_multi_node_uses_c10d(text_corpus, tmp_path):
    args = ["launch", "torchrun", "--config", CONFIG, "--nnodes", "16", "--nproc-per-node", "8",
            "--rdzv-endpoint", "node001:29500", "--dry-run", *tiny(text_corpus, tmp_path / "r"), "trainer.devices=3"]
    first = shlex.split(cli(*args, "--node-rank", "0").stdout.strip())[1:]
    other = shlex.split(cli(*args, "--node-rank", "5").stdout.strip())[1:]
    for flag in ("--nnodes=16", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29500", "--max-restarts=0"):
        assert flag in first and flag in other
    assert "--node-rank=0" in first and "--rdzv-conf=is_host=1" in first
    assert "--node-rank=5" in other and "--rdzv-conf=is_host=0" in other
    rdzv_ids = {c for c in first + other if c.startswith("--rdzv-id=")}
    assert len(rdzv_ids) == 1, "every node joins the same rendezvous"
    assert "--standalone" not in first
    assert first[-2:] == ["trainer.devices=8", "trainer.num_nodes=16"] and "trainer.devices=3" not in first


def test_bad_config_fails_before_launching(text_corpus, tmp_path):
    result = cli("launch", "torchrun", "--config", CONFIG, "--dry-run", *tiny(text_corpus, tmp_path / "r"),
                 "trainer.max_step=5", check=False)
    assert result.returncode == 2 and "trainer.max_step" in result.stderr and "torch.distributed.run" not in result.stdout
    result = cli("launch", "torchrun", "--config", CONFIG, "--nnodes", "2", "--dry-run", *tiny(text_corpus, tmp_path / "r"), check=False)
    assert result.returncode == 2 and "--rdzv-endpoint" in result.stderr


def test_world_size_mismatch_is_a_clear_error(text_corpus, tmp_path):
    cfg = load_config(CONFIG, [*tiny(text_corpus, tmp_path / "r"), "trainer.devices=2", "trainer.num_nodes=1"])
    check_launch_environment(cfg, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4.*2 x 1 = 2"):
        check_launch_environment(cfg, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="--nproc-per-node"):
        check_launch_environment(cfg, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"})
    with pytest.raises(ConfigError, match="SLURM_NTASKS"):
        check_launch_environment(cfg, {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "3", "SLURM_JOB_NAME": "x"})
    # torchrun itself: 2 workers while the config says 1 device -> exit with the message, no hang
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "framework.cli", "fit",
         "--config", CONFIG, *tiny(text_corpus, tmp_path / "mismatch"), "trainer.devices=1"],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=240,
    )
    assert result.returncode != 0 and "WORLD_SIZE=2" in result.stdout + result.stderr
    assert time.time() - started < 200


def test_two_torchrun_nodes_train_together(reference_run):
    outputs = reference_run["outputs"]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in "".join(outputs) and "GLOBAL_RANK: 1, MEMBER: 2/2" in "".join(outputs)
    assert metric_steps(reference_run["dir"]) == list(range(1, STEPS + 1))


@pytest.mark.timeout(400)
def test_kill_9_of_a_worker_restarts_the_group_and_resumes_exactly(text_corpus, tmp_path, reference_run):
    run_dir = tmp_path / "killed"
    agent = subprocess.Popen(
        [sys.executable, "-m", "framework.cli", "launch", "torchrun", "--config", CONFIG, "--nproc-per-node", "2",
         "--max-restarts", "1", *tiny(text_corpus, run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO,
    )
    try:
        wait_for(lambda: (run_dir / "checkpoints" / f"step-{EVERY:08d}.ckpt").exists(), 240, "the first checkpoint")
        workers = [p for p in psutil.Process(agent.pid).children() if "framework.cli" in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        workers[-1].send_signal(signal.SIGKILL)
        killed_at = max(metric_steps(run_dir) or [0])
        output = agent.communicate(timeout=300)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, output[-4000:]
    assert killed_at < STEPS, "the kill landed before the end"
    assert "resuming from step-" in output, output[-4000:]
    assert metric_steps(run_dir) == list(range(1, STEPS + 1)), "every step logged once"
    assert_same_weights(final_weights(run_dir), reference_run["weights"])
