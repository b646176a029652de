from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import CONFIG, REPO, STEPS, env, final_weights, tiny


def two_node_torchrun(corpus: dict, run_dir: Path, port: int, steps: int = STEPS):
    """Two torchrun processes on 127.0.0.1 (node rank 0 and 1), one worker each, c10d rendezvous."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "framework.cli", "launch", "torchrun", "--config", CONFIG, "--nnodes", "2",
             "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
             *tiny(corpus, run_dir, steps)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.fixture(scope="session")
def reference_run(text_corpus, tmp_path_factory) -> dict:
    """An uninterrupted 2-rank run (2 torchrun nodes x 1 process): the weights every
    interrupted-and-resumed run must end with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    outputs = two_node_torchrun(text_corpus, run_dir, port=29561)
    return {"dir": run_dir, "weights": final_weights(run_dir), "outputs": outputs}
