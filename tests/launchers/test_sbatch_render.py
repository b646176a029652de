"""The sbatch script as text: the 16-node x 8-GPU form documented in slurm/README.md, and what
`pretrain launch slurm --dry-run` writes (layout overrides, array sweeps). No cluster needed."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from launchers.slurm import sbatch_script, sweep_tasks
from launch_helpers import CONFIG, REPO, cli, tiny


def documented_16x8() -> str:
    text = (REPO / "slurm" / "README.md").read_text()
    match = re.search(r"<!-- rendered-16x8 -->\n```bash\n(.*?)```\n<!-- /rendered-16x8 -->", text, re.S)
    assert match, "slurm/README.md documents the 16x8 script"
    return match.group(1)


def test_16_nodes_x_8_gpus_matches_the_documented_form():
    script = sbatch_script(
        config="/work/configs/experiments/gpt-tiny.yaml",
        tasks=[["model.dim=1024", "model.depth=24", "trainer.max_steps=100000", "trainer.devices=8", "trainer.num_nodes=16",
                "trainer.accelerator=gpu", "run.dir=/scratch/runs/gpt-16x8"]],
        run_dir=Path("/scratch/runs/gpt-16x8"), nodes=16, tasks_per_node=8, cpus_per_task=8, gpus_per_node=8, mem="480G",
        partition="gpu", account="myproject", time="48:00:00", signal_seconds=120, max_requeues=3, workdir=Path("/work"),
        python="/work/.venv/bin/python",
    )
    assert script == documented_16x8()
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=480G", "#SBATCH --time=48:00:00", "#SBATCH --requeue", "#SBATCH --signal=USR1@120",
                 "#SBATCH --output=/scratch/runs/gpt-16x8/slurm-%j.out"):
        assert line in lines
    assert not any("{{" in line or line.startswith("#|") for line in lines)
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert sbatch == list(range(sbatch[0], sbatch[-1] + 1)) and sbatch[0] == 2, "sbatch reads options only before the first command"
    assert lines[-1].startswith("srun --kill-on-bad-exit=1 /work/.venv/bin/python -m framework.cli fit")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_dry_run_writes_the_script_with_the_layout_and_an_array(text_corpus, tmp_path):
    run_dir = tmp_path / "sweep"
    out = cli("launch", "slurm", "--config", CONFIG, "--nodes", "2", "--ntasks-per-node", "3", "--dry-run",
              "--sweep", "optim.lr=1e-3,3e-4", "--sweep", "run.seed=1,2", *tiny(text_corpus, run_dir), "trainer.devices=7").stdout
    assert "not submitted" in out
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --ntasks-per-node=3" in script and "#SBATCH --nodes=2" in script
    assert f"#SBATCH --output={run_dir}/slurm-%A_%a.out" in script
    cases = re.findall(r"^    (\d)\) OVERRIDES=\((.*)\) ;;$", script, re.M)
    assert [c[0] for c in cases] == ["0", "1", "2", "3"]
    for index, overrides in cases:
        assert "trainer.devices=3 trainer.num_nodes=2 trainer.accelerator=cpu" in overrides and "trainer.devices=7" not in overrides
        assert overrides.count("run.dir=") == 1 and f"run.dir={run_dir}/{index}-" in overrides
    assert "optim.lr=3e-4 run.seed=2" in cases[3][1]
    assert sweep_tasks(["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]

    # A job restarted more often than --max-requeues (3) gives up before starting any rank.
    env = {"PATH": "/usr/bin:/bin", "SLURM_RESTART_COUNT": "4", "SLURM_JOB_ID": "9"}
    result = subprocess.run(["bash", str(run_dir / "job.sbatch")], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "giving up" in result.stderr
