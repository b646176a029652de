"""Downstream evaluation of text checkpoints (a 2-step GPT and BERT on standard-library files):
package classification from shards the text writer labelled with a metadata file, in every mode,
with a per-group report by file length."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from run_helpers import REPO, run_cli

TINY = ["model.dim=32", "model.depth=1", "model.heads=2", "data.seq_len=32", "data.batch_size=4", "data.num_workers=0",
        "trainer.devices=1", "trainer.max_steps=2", "trainer.val_every_steps=2", "trainer.checkpoint_every_steps=2",
        "logging.wandb=disabled", "logging.progress=false"]


@pytest.fixture(scope="module")
def labelled_text(text_corpus, tmp_path_factory):
    """json/ and email/ files labelled by package, split by file, with a length group."""
    import sysconfig
    from pathlib import Path

    from framework.data.writers.text import write_text_shards

    root, stdlib = tmp_path_factory.mktemp("labelled-text"), Path(sysconfig.get_paths()["stdlib"])
    files = [p for package in ("json", "email") for p in sorted((stdlib / package).rglob("*.py")) if p.stat().st_size]
    rows = [{"path": str(p), "label": p.relative_to(stdlib).parts[0], "length": "long" if p.stat().st_size > 6000 else "short"}
            for p in files]
    (root / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_text_shards([str(p) for p in files], str(root / "shards"), metadata=str(root / "meta.jsonl"), val_fraction=0.3,
                      seed=0, max_chars_per_sample=10**6, workers=1)
    return {"train": root / "shards" / "train", "val": root / "shards" / "val"}


@pytest.fixture(scope="module")
def text_runs(text_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("text-runs")
    for config in ("gpt-tiny", "bert-tiny"):
        run_cli(["fit", "--config", f"configs/experiments/{config}.yaml", f"data.train={text_corpus['train']}",
                 f"data.val={text_corpus['val']}", f"data.tokenizer={text_corpus['tokenizer']}", *TINY,
                 f"run.dir={root / config}"])
    return {"clm": root / "gpt-tiny", "mlm": root / "bert-tiny"}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective,frozen,scratch", [("clm", "linear", True), ("mlm", "knn", False)])
def test_text_checkpoints_in_every_mode(text_runs, labelled_text, objective, frozen, scratch, tmp_path):
    data = [f"data.train={labelled_text['train']}", f"data.val={labelled_text['val']}"]
    common = ["--checkpoint", str(text_runs[objective]), "--group-key", "length", "--label-fraction", "0.5,1.0"]
    run_cli(["eval", frozen, *common, "--output", str(tmp_path / frozen), *data, "data.seq_len=64"])
    run_cli(["eval", "finetune", *common, *(["--from-scratch"] if scratch else []), "--output", str(tmp_path / "ft"), *data,
             "trainer.max_steps=2", "trainer.val_every_steps=2", "data.num_workers=0", "data.seq_len=64"])
    for mode, modes in ((frozen, [frozen]), ("ft", ["finetune", "scratch"] if scratch else ["finetune"])):
        results = json.loads((tmp_path / mode / "results.json").read_text())
        assert [s["mode"] for s in results["summary"]] == [m for m in modes for _ in (0.5, 1.0)]
        assert all(0 <= row["accuracy"] <= 1 for row in results["rows"]) and results["test_samples"] > 5
        for name in modes:
            report = json.loads((tmp_path / mode / "subgroups" / name / "subgroups.json").read_text())
            assert set(report["groups"]) <= {"long", "short"} and report["worst_group"] in report["groups"]
    config = (tmp_path / "ft" / "runs" / "finetune-1-seed0" / "config.yaml").read_text()
    assert f"pretrained_objective: {objective}" in config and "seq_len: 64" in config
    assert "pooling: mean" in config


def test_mixup_is_refused_for_text(text_runs, labelled_text, tmp_path):
    result = subprocess.run([sys.executable, "-m", "framework.cli", "eval", "finetune", "--checkpoint", str(text_runs["clm"]),
                             "--output", str(tmp_path), f"data.train={labelled_text['train']}",
                             f"data.val={labelled_text['val']}", "objective.mixup=0.5"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "objective.mixup mixes images; this checkpoint's encoder is a text one" in result.stderr
