"""`pretrain eval linear|knn` on a vision checkpoint (a 2-step MAE run on digit shards): the label
efficiency table and its splits; kNN and the probe beat chance twice over even here. (Subgroup
reports and bad inputs: tests/audio/test_speech_runs.py.)"""
from __future__ import annotations

import json

import pytest

from vision_helpers import run_cli, tiny_overrides


@pytest.mark.timeout(400)
def test_eval_linear_and_knn_on_a_vision_checkpoint(digit_shards, tmp_path):
    run = tmp_path / "mae"
    run_cli(["fit", *tiny_overrides("mae", digit_shards), "data.batch_size=16", "data.num_workers=0",
             "trainer.devices=1", "trainer.max_steps=2", "trainer.val_every_steps=2", "trainer.checkpoint_every_steps=2",
             "logging.wandb=disabled", "logging.progress=false", f"run.dir={run}"])
    data = [f"data.train={digit_shards['train']}", f"data.val={digit_shards['val']}"]
    for mode in ("knn", "linear"):
        out = tmp_path / mode
        text = run_cli(["eval", mode, "--checkpoint", str(run), "--label-fraction", "0.5,1.0", "--seeds", "2",
                        "--output", str(out), *data])
        assert "50% of labels" in text and "100% of labels" in text
        results = json.loads((out / "results.json").read_text())
        # without data.test, data.val is the test set and a fifth of data.train (by key hash) is left out of the
        # label subsets to choose the linear probe's grid: the subsets draw from the other 4/5
        pool = {r["labels"] for r in results["rows"] if r["fraction"] == 1.0}
        half = {r["labels"] for r in results["rows"] if r["fraction"] == 0.5}
        assert results["test_samples"] == 64 and len(pool) == 1 and 120 < min(pool) < 192
        assert all(abs(h - min(pool) / 2) <= 5 for h in half)
        full = [r["accuracy"] for r in results["rows"] if r["fraction"] == 1.0]
        assert min(full) > 0.2, full  # 10 classes: chance is 0.1; even a 2-step encoder keeps the pixels apart
        if mode == "linear":
            assert {"lr", "weight_decay"} <= set(results["rows"][0])
