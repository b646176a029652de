"""Checkpoints are data, never code: a checkpoint whose pickle would run a command (create a file)
is refused by every entry point that reads checkpoints, with one line naming the file, and the
command never runs. Secrets in the environment never reach what a run, a submission or a
consolidation writes."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_helpers import REPO


class RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framework.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "WANDB_MODE": "offline", **(env or {})})


@pytest.fixture()
def evil(tmp_path):
    """A .ckpt file, an FSDP (DCP) directory and a DeepSpeed directory, each carrying the command."""
    marker = tmp_path / "pwned"
    file = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"config": {}}, "x": RunsCommand(marker)}, file)
    dcp = tmp_path / "fsdp-step"
    dcp.mkdir()
    torch.save({"hyper_parameters": {"config": {}}}, dcp / "meta.pt")
    (dcp / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    deepspeed = tmp_path / "ds-step"
    (deepspeed / "tag").mkdir(parents=True)
    (deepspeed / "latest").write_text("tag")
    torch.save({"module": {}, "x": RunsCommand(marker)}, deepspeed / "tag" / "mp_rank_00_model_states.pt")
    return {"marker": marker, "file": file, "dcp": dcp, "deepspeed": deepspeed}


def refused(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "refused" in lines[0] and "could run code" in lines[0], lines


def test_every_entry_point_refuses_a_checkpoint_that_runs_code(evil, text_corpus, tmp_path):
    from framework import load_backbone
    from framework.errors import ConfigError

    marker, file = evil["marker"], evil["file"]
    data = [f"data.train={text_corpus['train']}", f"data.val={text_corpus['val']}"]
    for kind in ("file", "dcp", "deepspeed"):
        refused(cli("consolidate", str(evil[kind]), str(tmp_path / "out.safetensors")),
                evil[kind] / ".metadata" if kind == "dcp" else evil[kind] if kind == "file" else
                evil[kind] / "tag" / "mp_rank_00_model_states.pt")
    for mode in ("linear", "knn", "finetune"):
        refused(cli("eval", mode, "--checkpoint", str(file), "--output", str(tmp_path / mode), *data), file)
    refused(cli("audio", "targets", "--shards", str(text_corpus["train"]), "--output", str(tmp_path / "targets"),
                "--features", str(file), "--layer", "1"), file)
    refused(cli("fit", "--config", "configs/experiments/gpt-tiny.yaml", *data, f"data.tokenizer={text_corpus['tokenizer']}",
                "trainer.devices=1", f"run.dir={tmp_path / 'run'}", f"run.resume={file}", "logging.wandb=disabled"), file)
    with pytest.raises(ConfigError, match="refused"):
        load_backbone(file)
    assert not marker.exists(), "the checkpoint's command ran"
    # the same pickle loaded the unsafe way does run it: the test's checkpoint is a real threat
    torch.load(file, weights_only=False)
    assert marker.exists()


def test_secrets_in_the_environment_are_written_nowhere(text_corpus, tmp_path):
    secrets = {"WANDB_API_KEY": "secret-wandb-7f3a9c", "HF_TOKEN": "secret-hf-2b8d1e",
               "AWS_SECRET_ACCESS_KEY": "secret-aws-5c0e4f"}
    run = tmp_path / "run"
    common = ["--config", "configs/experiments/gpt-tiny.yaml", f"data.train={text_corpus['train']}",
              f"data.val={text_corpus['val']}", f"data.tokenizer={text_corpus['tokenizer']}", "model.dim=32", "model.depth=1",
              "model.heads=2", "data.seq_len=32", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2",
              "trainer.val_every_steps=2", "trainer.checkpoint_every_steps=2", f"run.dir={run}", "logging.wandb=offline"]
    fit = cli("fit", *common, "trainer.devices=1", env=secrets)
    assert fit.returncode == 0, fit.stderr[-2000:]
    slurm = cli("launch", "slurm", *common, "--dry-run", env=secrets)
    assert slurm.returncode == 0, slurm.stderr[-2000:]
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    assert cli("consolidate", str(checkpoint), str(tmp_path / "weights.safetensors"), env=secrets).returncode == 0
    exported = cli("export", "--checkpoint", str(run), "--format", "hf", "--output", str(tmp_path / "hf"), env=secrets)
    assert exported.returncode == 0, exported.stderr[-2000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and any(p.name.endswith(".sbatch") or "sbatch" in p.name for p in written)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    for path in written:
        content = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    for value in secrets.values():
        assert value not in fit.stdout + fit.stderr + slurm.stdout + slurm.stderr
