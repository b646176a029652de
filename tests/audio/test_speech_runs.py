"""Speech runs end to end: a 2-process fit with length bucketing that resumes exactly mid-epoch and
probes online, load_backbone's audio encoder, the strategies' losses, the targets command
(deterministic, resumable after kill -9, iteration 2 from a run) and bad audio named clearly."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from audio_helpers import DATA, HUBERT, QUIET, TINY_MODEL, fit_args, metric_rows, run_cli
from run_helpers import REPO

STEPS, HALF = 6, 3


@pytest.fixture(scope="module")
def speech_run(speech_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("speech-run")
    run_cli(fit_args(speech_shards, root / "straight"))
    return root / "straight"


@pytest.mark.timeout(400)
def test_fit_with_buckets_resumes_exactly_and_probes_online(speech_run, speech_shards, tmp_path):
    rows = metric_rows(speech_run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    for key in ("train/code_perplexity", "train/prob_perplexity", "train/accuracy", "train/quantizer_temperature",
                "probe/knn_acc", "probe/linear_acc", "val/loss"):
        assert any(key in r for r in rows), key
    temperatures = [r["train/quantizer_temperature"] for r in rows if "train/quantizer_temperature" in r]
    assert temperatures[0] > temperatures[-1]  # the anneal runs over this short run's max_steps
    resumed = tmp_path / "resumed"
    output = run_cli(fit_args(speech_shards, resumed, f"run.resume={speech_run}/checkpoints/step-{HALF:08d}.ckpt"))
    assert "resuming from" in output
    end_a = torch.load(speech_run / f"checkpoints/step-{STEPS:08d}.ckpt", weights_only=False)
    end_b = torch.load(resumed / f"checkpoints/step-{STEPS:08d}.ckpt", weights_only=False)
    for key, value in end_a["state_dict"].items():
        torch.testing.assert_close(end_b["state_dict"][key], value, msg=lambda m, key=key: f"{key}: {m}")
    tail_a = [r["train/loss"] for r in rows if "train/loss" in r][HALF:]
    tail_b = [r["train/loss"] for r in metric_rows(resumed) if "train/loss" in r]
    assert tail_b[-len(tail_a):] == pytest.approx(tail_a, abs=1e-6)


def test_length_buckets_cut_padding(speech_shards):
    """Batches drawn with bucketing hold clips of similar lengths: far less padding than without."""
    from framework.config.load import load_config
    from framework.objectives.audio_common import audio_datamodule

    def padding(bucket: bool) -> float:
        cfg = load_config(None, [*TINY_MODEL, *DATA, "objective.name=wav2vec2", f"data.train={speech_shards['train']}",
                                 f"data.bucket={str(bucket).lower()}", "data.num_workers=0", "data.batch_size=4"])
        module = audio_datamodule(cfg)
        module.setup("fit")
        total = pad = 0
        for index, batch in enumerate(module.train_dataloader()):
            total += batch["wave"].numel()
            pad += batch["wave"].numel() - int(batch["length"].sum())
            if index == 23:
                break
        return pad / total

    assert padding(True) < 0.5 * padding(False)


def test_load_backbone_gives_the_audio_encoder(speech_run):
    from framework import load_backbone

    encoder = load_backbone(speech_run)
    assert encoder.sample_rate == 16000 and not encoder.training
    wave = torch.randn(3, 12000)
    lengths = torch.tensor([12000, 9000, 4000])
    features = encoder(wave, lengths)
    assert features.shape == (3, 16) and torch.isfinite(features).all()
    alone = encoder(wave[2:, :4000], lengths[2:])  # padding never reaches the pooled feature
    torch.testing.assert_close(features[2:], alone, rtol=1e-4, atol=1e-5)


def targets_cmd(shards, out, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "framework.cli", "audio", "targets", "--shards", str(shards), "--output", str(out),
            "--clusters", "6", "--workers", "2", *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def mfcc_targets(speech_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "mfcc"
    config = tmp_path_factory.mktemp("cfg") / "run.yaml"
    config.write_text("objective:\n  name: hubert\nmodel:\n  name: audio_encoder\n  conv_layers: [[16,10,5],[16,4,4],[16,4,4]]\n")
    result = targets_cmd(speech_shards["train"], out, "--features", "mfcc", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "purity" in result.stdout and "PNMI" in result.stdout
    return out, config


@pytest.mark.timeout(400)
def test_targets_are_deterministic_and_resume_after_kill(speech_shards, mfcc_targets, tmp_path):
    out, config = mfcc_targets
    meta = json.loads((out / "meta.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert meta["clips"] == 48 == len(index) and meta["clusters"] == 6 and meta["quality"]["pnmi"] > 0.1  # random labels: ~0.01
    targets = np.load(out / "targets.npy")
    frames = torch.tensor([length for _, length in index.values()])
    assert len(targets) == int(frames.sum()) and targets.min() >= 0 and targets.max() < 6
    # the process of the second shard's features killed, then run again: the same bytes as the straight run
    killed = tmp_path / "killed"
    args = ("--features", "mfcc", "--config", str(config))
    died = targets_cmd(speech_shards["train"], killed, *args, env={"FRAMEWORK_TARGETS_KILL_AT": "1"})
    assert died.returncode != 0 and "run the same command again" in died.stderr
    assert not (killed / "meta.json").exists() and (killed / ".targets-state" / "features-000001.npz").exists()
    again = targets_cmd(speech_shards["train"], killed, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("targets.npy", "index.json"):
        assert (killed / name).read_bytes() == (out / name).read_bytes(), name
    other = targets_cmd(speech_shards["train"], killed, "--features", "mfcc", "--config", str(config), "--seed", "1")
    assert other.returncode != 0 and "seed" in other.stderr and "--overwrite" in other.stderr


@pytest.mark.timeout(600)
def test_hubert_on_mfcc_targets_then_iteration_two(speech_shards, mfcc_targets, tmp_path):
    out, _ = mfcc_targets
    run = tmp_path / "hubert"
    # Named validation sets: the training shards have frame targets (a loss), the held-out ones
    # have none (no loss, but the probes still embed them).
    run_cli(fit_args(speech_shards, run, f"objective.targets={out}", "trainer.devices=1", "trainer.max_steps=4",
                     "trainer.val_every_steps=4", f"data.val={{held_out: {speech_shards['val']}, seen: {speech_shards['train']}}}",
                     objective=HUBERT))
    rows = metric_rows(run)
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    keys = {k for r in rows for k in r}
    assert "train/masked_accuracy" in keys and {"probe/held_out/linear_acc", "probe/seen/linear_acc"} <= keys
    assert "val/seen/loss" in keys and "val/held_out/loss" not in keys and "val/loss" not in keys, sorted(keys)
    second = tmp_path / "it2"
    bad_layer = targets_cmd(speech_shards["train"], second, "--features", str(run), "--layer", "7")
    assert bad_layer.returncode != 0 and "--layer 7" in bad_layer.stderr
    result = targets_cmd(speech_shards["train"], second, "--features", str(run), "--layer", "1", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((second / "meta.json").read_text())
    assert meta["layer"] == 1 and meta["clips"] == 48 and meta["conv_layers"] == [[16, 10, 5], [16, 4, 4], [16, 4, 4]]
    # targets for another frame rate are refused, naming both geometries
    wrong = subprocess.run([sys.executable, "-m", "framework.cli", *fit_args(
        speech_shards, tmp_path / "wrong", f"objective.targets={second}", "model.conv_layers=[[16,10,5],[16,8,8]]",
        objective=HUBERT)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert wrong.returncode != 0 and "would not line up" in wrong.stderr


@pytest.mark.timeout(900)
def test_strategies_give_the_ddp_losses(speech_shards, mfcc_targets, tmp_path):
    out, _ = mfcc_targets
    quiet = ["trainer.max_steps=3", "trainer.val_every_steps=3", "trainer.checkpoint_every_steps=3",
             "objective.probe.linear=false", "objective.probe.knn=false"]
    runs = {("wav2vec2", "ddp"): [], ("wav2vec2", "fsdp"): ["trainer.strategy=fsdp"],
            ("wav2vec2", "zero2"): ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=2"],
            ("hubert", "ddp"): [], ("hubert", "zero3"): ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"]}
    losses = {}
    for (name, strategy), extra in runs.items():
        run_dir = tmp_path / f"{name}-{strategy}"
        spec = HUBERT + [f"objective.targets={out}"] if name == "hubert" else None
        kwargs = {"objective": spec} if spec else {}
        run_cli(fit_args(speech_shards, run_dir, *quiet, *extra, **kwargs), timeout=400)
        losses[name, strategy] = [r["train/loss"] for r in metric_rows(run_dir) if "train/loss" in r]
    for (name, strategy), got in losses.items():
        assert len(got) == 3 and got == pytest.approx(losses[name, "ddp"], abs=1e-4), (name, strategy, losses)


# ------------------------------------------------------------------ bad audio


def wav_bytes(samples: int, rate: int = 16000) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, np.zeros(samples, np.float32) + 0.1, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.mark.parametrize("name, data, message", [
    ("truncated", wav_bytes(8000)[:300], "does not decode"),
    ("empty", wav_bytes(0), "contains no audio frames"),
    ("wrong rate", wav_bytes(8000, rate=8000), "sample rate 8000 Hz"),
])
def test_bad_audio_is_named_with_its_shard_and_key(tmp_path, name, data, message):
    """Written straight into a shard (the audio writer would refuse them): the loader names the
    shard, the key and what is wrong, under data.on_error=raise; skip counts it."""
    from framework.config.load import load_config
    from framework.data.writers.shard_writer import ShardWriter
    from framework.errors import DataError
    from framework.objectives.audio_common import audio_datamodule

    with ShardWriter(tmp_path / "shards", modality="audio", max_samples=8) as writer:
        for i in range(4):
            clip = data if i == 2 else wav_bytes(6000)
            writer.write(f"clip{i}", {"wav": clip, "cls": b"0"})
    base = [*TINY_MODEL, *DATA, *QUIET, "objective.name=wav2vec2", f"data.train={tmp_path / 'shards'}",
            "data.resample=false", "data.num_workers=0", "data.batch_size=2", "data.bucket=false", "data.shuffle_buffer=1"]
    module = audio_datamodule(load_config(None, [*base, "data.on_error=raise"]))
    module.setup("fit")
    with pytest.raises(DataError) as caught:
        for _ in zip(range(3), module.train_dataloader()):
            pass
    text = str(caught.value)
    assert message in text and "clip2" in text and "shards" in text, text
    module = audio_datamodule(load_config(None, [*base, "data.on_error=skip"]))
    module.setup("fit")
    loader = module.train_dataloader()
    batches = [batch for _, batch in zip(range(2), loader)]
    assert all(batch["wave"].shape[0] == 2 for batch in batches)


def test_short_clips_are_filtered_and_counted(speech_shards):
    from framework.config.load import load_config
    from framework.objectives.audio_common import audio_datamodule

    cfg = load_config(None, [*TINY_MODEL, *DATA, "objective.name=wav2vec2", f"data.train={speech_shards['train']}",
                             "data.min_seconds=0.8", "data.num_workers=0"])
    module = audio_datamodule(cfg)
    module.setup("fit")
    loader = module.train_dataloader()
    lengths = torch.cat([batch["length"] for _, batch in zip(range(12), loader)])
    assert (lengths >= 0.8 * 16000).all()
    assert loader.counters()["filtered_samples"] > 0


def test_config_mistakes_are_one_clear_line(speech_shards, tmp_path):
    def fails(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "framework.cli", *args], capture_output=True, text=True,
                                cwd=REPO, timeout=120)
        assert result.returncode != 0
        return result.stderr

    assert "objective.targets is not set" in fails(*fit_args(speech_shards, tmp_path / "a", objective=HUBERT))
    assert "model.name=audio_encoder" in fails("fit", "objective.name=wav2vec2", "model.name=vit", *QUIET,
                                               f"data.train={speech_shards['train']}", f"run.dir={tmp_path / 'b'}")
    assert "holds no meta.json" in fails(*fit_args(speech_shards, tmp_path / "c", f"objective.targets={tmp_path}",
                                                   objective=HUBERT))


# ------------------------------------------------------------------ downstream evaluation of a speech run


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framework.cli", "eval", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(400)
def test_eval_linear_and_knn_with_subgroups(speech_run, speech_shards, tmp_path):
    data = [f"data.train={speech_shards['train']}", f"data.val={speech_shards['val']}"]
    for mode in ("linear", "knn"):
        out = tmp_path / mode
        result = eval_cli(mode, "--checkpoint", str(speech_run), "--label-fraction", "0.25,1.0", "--seeds", "2",
                          "--group-key", "label", "--output", str(out), *data)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "25% of labels" in result.stdout and "worst label group" in result.stdout
        results = json.loads((out / "results.json").read_text())
        assert results["test_samples"] == 16 and len(results["rows"]) == 4
        assert all(0.0 <= row["accuracy"] <= 1.0 for row in results["rows"])
        report = json.loads((out / "subgroups" / mode / "subgroups.json").read_text())
        assert set(report["groups"]) == {"c0", "c1", "c2", "c3"} and sum(g["count"] for g in report["groups"].values()) == 16
        for name in ("report.md", "confusion_overall.png", "confusion_worst.png"):
            assert (out / "subgroups" / mode / name).stat().st_size > 100
    # features are cached: a second run embeds nothing (the cache files are left as they were)
    cached = sorted((tmp_path / "knn" / "features").glob("*.npz"))
    assert len(cached) == 2


def test_eval_bad_inputs_are_one_clear_line(speech_run, speech_shards, tmp_path):
    from framework.data.writers.shard_writer import ShardWriter
    from run_helpers import png

    with ShardWriter(tmp_path / "images", modality="image", max_samples=8) as writer:
        for i in range(4):
            writer.write(f"img{i}", {"png": png(np.zeros((8, 8), np.uint8)), "cls": b"1"})
    with ShardWriter(tmp_path / "unlabelled", modality="audio", max_samples=8) as writer:
        for i in range(4):
            writer.write(f"clip{i}", {"wav": wav_bytes(6000)})
    base = ["linear", "--checkpoint", str(speech_run), "--output", str(tmp_path / "out"), f"data.val={speech_shards['val']}"]
    images = eval_cli(*base, f"data.train={tmp_path / 'images'}")
    assert images.returncode != 0 and "no sample decoded as audio" in images.stderr
    unlabelled = eval_cli(*base, f"data.train={tmp_path / 'unlabelled'}")
    assert unlabelled.returncode != 0 and "have no label" in unlabelled.stderr
    group = eval_cli(*base, f"data.train={speech_shards['train']}", "--group-key", "speaker")
    assert group.returncode != 0 and "--group-key speaker: no sample" in group.stderr and "duration" in group.stderr
    fraction = eval_cli(*base, f"data.train={speech_shards['train']}", "--label-fraction", "0.01")
    assert fraction.returncode != 0 and "leaves class" in fraction.stderr
    assert len(group.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(600)
def test_eval_finetune_a_speech_checkpoint(speech_run, speech_shards, tmp_path):
    out = tmp_path / "ft"
    result = eval_cli("finetune", "--checkpoint", str(speech_run), "--label-fraction", "0.5", "--from-scratch",
                      "--group-key", "label", "--output", str(out), f"data.train={speech_shards['train']}",
                      f"data.val={speech_shards['val']}", "trainer.max_steps=3", "trainer.val_every_steps=3",
                      "data.num_workers=0", "data.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [row["mode"] for row in results["rows"]] == ["finetune", "scratch"] and results["test_samples"] == 16
    # half of the pool (the 48 clips less the selection fifth by key hash), the same subset for both
    assert all(row["best_step"] == 3 and 16 <= row["labels"] <= 24 for row in results["rows"])
    assert results["rows"][0]["labels"] == results["rows"][1]["labels"]
    for mode in ("finetune", "scratch"):
        report = json.loads((out / "subgroups" / mode / "subgroups.json").read_text())
        assert set(report["groups"]) == {"c0", "c1", "c2", "c3"}
    config = (out / "runs" / "finetune-0.5-seed0" / "config.yaml").read_text()
    assert "pretrained_objective: wav2vec2" in config or "pretrained_objective: hubert" in config
    assert "sample_rate: 16000" in config and "batch_size: 8" in config
