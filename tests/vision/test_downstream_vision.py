"""`pretrain eval linear|knn|finetune` on a vision checkpoint (a 2-step MAE run on digit shards):
the label efficiency table and its splits; kNN and the probe beat chance twice over even here;
fine-tuning and its from-scratch baseline through fit, on 1 and 2 processes alike. (Subgroup
reports and bad inputs of the frozen modes: tests/audio/test_speech_runs.py.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vision_helpers import REPO, metric_rows, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def mae_run(digit_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("mae") / "run"
    run_cli(["fit", *tiny_overrides("mae", digit_shards), "model.depth=2", "data.batch_size=16", "data.num_workers=0",
             "trainer.devices=1", "trainer.max_steps=2", "trainer.val_every_steps=2", "trainer.checkpoint_every_steps=2",
             "logging.wandb=disabled", "logging.progress=false", f"run.dir={run}",
             "run.seed=7"])  # not the fine-tuning seeds: a from-scratch run must not start where this one did
    return run


@pytest.mark.timeout(400)
def test_eval_linear_and_knn_on_a_vision_checkpoint(mae_run, digit_shards, tmp_path):
    run = mae_run
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


FINETUNE_STEPS = ["trainer.max_steps=4", "trainer.val_every_steps=2", "data.num_workers=0"]


@pytest.mark.timeout(600)
def test_finetune_and_from_scratch_through_fit(mae_run, digit_shards, tmp_path):
    from framework.evaluate.downstream.finetune import scan_labels

    out = tmp_path / "ft"
    command = ["eval", "finetune", "--checkpoint", str(mae_run), "--label-fraction", "0.5,1.0", "--from-scratch",
               "--output", str(out), f"data.train={digit_shards['train']}", f"data.val={digit_shards['val']}",
               *FINETUNE_STEPS, "objective.mixup=0.4", "objective.layer_decay=0.6"]
    text = run_cli(command)
    assert "| finetune |" in text and "| scratch |" in text
    results = json.loads((out / "results.json").read_text())
    assert [(r["mode"], r["fraction"]) for r in results["rows"]] == [
        ("finetune", 0.5), ("scratch", 0.5), ("finetune", 1.0), ("scratch", 1.0)]
    assert results["test_samples"] == 64 and all(r["best_step"] in (2, 4) for r in results["rows"])
    # the selection set (a fifth of data.train by key hash) is what fit validates on: never the test set,
    # and no label subset draws from it; each subset is class-balanced
    train = scan_labels(str(digit_shards["train"]), "data.train")
    selection = scan_labels(str(out / "subsets" / "selection"), "data.val")
    half = scan_labels(str(out / "subsets" / "0.5-seed0"), "data.train")
    full = scan_labels(str(out / "subsets" / "1-seed0"), "data.train")
    assert set(selection.ids) | set(full.ids) == set(train.ids) and not set(selection.ids) & set(full.ids)
    assert set(half.ids) < set(full.ids) and abs(len(half.ids) - len(full.ids) / 2) <= 5
    counts_half, counts_full = (torch.bincount(torch.from_numpy(x.labels), minlength=10) for x in (half, full))
    assert ((counts_half - counts_full / 2).abs() <= 0.5).all()
    run_dir = out / "runs" / "finetune-1-seed0"
    config = (run_dir / "config.yaml").read_text()
    assert f"val: {out / 'subsets' / 'selection'}" in config and "from_scratch: false" in config and "mixup: 0.4" in config
    assert any("val/accuracy" in row for row in metric_rows(run_dir)) and (run_dir / "best.ckpt").exists()
    # the pretrained weights are where fine-tuning started; from scratch they are not
    pretrained = torch.load(next((mae_run / "checkpoints").glob("*.ckpt")), weights_only=False)["state_dict"]
    key = "blocks.0.attn.qkv.weight"
    for mode, near in (("finetune", True), ("scratch", False)):
        tuned = torch.load(out / "runs" / f"{mode}-1-seed0" / "best.ckpt", weights_only=False)["state_dict"]
        change = (tuned[f"encoder.core.{key}"] - pretrained[f"backbone.{key}"]).abs().max()
        assert (change < 0.05) == near, (mode, change)
    # run again: every run is found finished, only evaluated: the same figures
    rows_before = len(metric_rows(run_dir))
    run_cli(command)
    again = json.loads((out / "results.json").read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in results["rows"]]
    assert len(metric_rows(run_dir)) == rows_before
    # another configuration in the same output is refused, never overwritten
    changed = subprocess.run([sys.executable, "-m", "framework.cli", *command[:-1], "objective.layer_decay=0.5"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert changed.returncode == 2 and "objective.layer_decay: 0.6 there, 0.5 now" in changed.stderr, changed.stderr[-2000:]


@pytest.mark.timeout(600)
def test_finetune_on_two_processes_equals_one_with_the_global_batch_kept(mae_run, digit_shards, tmp_path):
    """One shard of 32 samples: a global batch of 32 is the whole (re-shuffled) epoch on 1 process
    (32 a step) and on 2 (16 each), so the runs must agree step for step."""
    weights = []
    for devices in (1, 2):
        out = tmp_path / f"devices-{devices}"
        run_cli(["eval", "finetune", "--checkpoint", str(mae_run), "--output", str(out),
                 f"data.train={digit_shards['train'] / 'shard-000000.tar'}", f"data.val={digit_shards['val']}",
                 f"data.test={digit_shards['val']}", *FINETUNE_STEPS, f"data.batch_size={32 // devices}",
                 f"trainer.devices={devices}"])
        weights.append(torch.load(out / "runs" / "finetune-1-seed0" / "checkpoints" / "step-00000004.ckpt",
                                  weights_only=False)["state_dict"])
    start = torch.load(next((mae_run / "checkpoints").glob("*.ckpt")), weights_only=False)["state_dict"]
    moved = (weights[0]["encoder.core.blocks.0.attn.qkv.weight"] - start["backbone.blocks.0.attn.qkv.weight"]).abs().max()
    assert moved > 1e-4, "four steps changed the weights"
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-6), name


def test_finetune_bad_inputs_are_one_clear_line(mae_run, digit_shards, text_corpus, tmp_path):
    def fails(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "framework.cli", "eval", "finetune", "--checkpoint", str(mae_run),
                                 "--output", str(tmp_path / "out"), *args], capture_output=True, text=True, cwd=REPO,
                                timeout=300)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        return result.stderr

    data = [f"data.train={digit_shards['train']}", f"data.val={digit_shards['val']}"]
    assert "does not decode as image" in fails(f"data.train={text_corpus['train']}", f"data.val={digit_shards['val']}")
    assert "run.dir is set by `pretrain eval finetune` itself" in fails(*data, "run.dir=/tmp/x")
    assert "unknown key 'objective.mixupp'" in fails(*data, "objective.mixupp=0.2")
    assert "leaves class" in fails(*data, "--label-fraction", "0.01")
    assert "--group-key writer: no sample" in fails(*data, "--group-key", "writer")


def test_finetune_stops_early_when_validation_stops_improving(mae_run, digit_shards, tmp_path):
    out = tmp_path / "ft"
    run_cli(["eval", "finetune", "--checkpoint", str(mae_run), "--output", str(out), f"data.train={digit_shards['train']}",
             f"data.val={digit_shards['val']}", "trainer.max_steps=40", "trainer.val_every_steps=2", "data.num_workers=0",
             "optim.lr=1e-12", "objective.patience=2"])  # no learning: val/accuracy never beats its first value
    steps = [row["step"] for row in metric_rows(out / "runs" / "finetune-1-seed0") if "val/accuracy" in row]
    assert steps == [2, 4, 6], steps
    assert json.loads((out / "runs" / "finetune-1-seed0" / "best.json").read_text())["step"] == 2


@pytest.mark.timeout(300)
def test_finetune_with_named_validation_sets_selects_on_the_first(mae_run, digit_shards, tmp_path):
    run = tmp_path / "ft"
    run_cli(["fit", "objective.name=finetune", f"objective.checkpoint={mae_run}", "objective.num_classes=10",
             f"data.train={digit_shards['train']}", f"data.val={{held_out: {digit_shards['val']}, seen: {digit_shards['train']}}}",
             *FINETUNE_STEPS, "trainer.checkpoint_every_steps=4", "logging.wandb=disabled", "logging.progress=false",
             f"run.dir={run}"])
    validated = [r for r in metric_rows(run) if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in validated] == [2, 4]
    for row in validated:
        assert {"val/held_out/accuracy", "val/held_out/loss", "val/seen/accuracy", "val/seen/loss"} <= set(row)
        assert "val/accuracy" not in row
    best = json.loads((run / "best.json").read_text())
    assert set(best) == {"step", "val/held_out/accuracy"}, "the first named set selects the best weights"
