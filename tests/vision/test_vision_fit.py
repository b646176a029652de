"""Every vision objective under DDP with 2 processes (gloo) from image shards, through `pretrain fit`:
finite loss, online probes logged, a stopped-and-resumed run ending with exactly the weights (EMA
teacher, centre, codebook included) of an uninterrupted one, and ``load_backbone`` on the checkpoint.
(That the losses decrease is checked in-process, on longer runs, in test_learning.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from vision_helpers import metric_rows, run_cli, tiny_overrides

METHODS = ["simclr", "moco_v3", "byol", "dino", "mae", "beit"]
STEPS, HALF = 6, 3


def fit_args(method: str, shards: dict, run_dir, *extra: str) -> list[str]:
    return [
        "fit", *tiny_overrides(method, shards), "data.batch_size=16", "data.num_workers=0", "trainer.devices=2",
        f"trainer.max_steps={STEPS}", f"trainer.val_every_steps={HALF}", "trainer.val_batches=2",
        f"trainer.checkpoint_every_steps={HALF}", "trainer.log_every_steps=1", "optim.lr=3e-3", "optim.warmup_steps=2",
        "logging.wandb=disabled", "logging.progress=false", f"run.dir={run_dir}", *extra,
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
def test_ddp_fit_exact_resume_and_load_backbone(method, digit_shards, tmp_path):
    from framework import load_backbone
    from framework.training.consolidate import consolidate

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(fit_args(method, digit_shards, straight))
    rows = metric_rows(straight)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert any("probe/knn_acc" in r and "probe/linear_acc" in r for r in rows), "online probes ran on the val shards"
    assert any("val/loss" in r for r in rows)
    health = next(r for r in rows if "health/rankme" in r)  # representation health at every validation
    assert 1 <= health["health/rankme"] and 0 <= health["health/feature_std"]
    assert ("health/teacher_entropy" in health) == (method == "dino")

    # Stop at step 3 (its checkpoint) and resume in another directory: same end state, bit for bit.
    output = run_cli(fit_args(method, digit_shards, resumed, f"run.resume={straight}/checkpoints/step-{HALF:08d}.ckpt"))
    assert "resuming from" in output
    end_a = torch.load(straight / f"checkpoints/step-{STEPS:08d}.ckpt", weights_only=False)
    end_b = torch.load(resumed / f"checkpoints/step-{STEPS:08d}.ckpt", weights_only=False)
    assert end_a["state_dict"].keys() == end_b["state_dict"].keys()
    for key, value in end_a["state_dict"].items():
        torch.testing.assert_close(end_b["state_dict"][key], value, msg=lambda m, key=key: f"{key}: {m}")
    stateful = {"moco_v3": "momentum_backbone.", "byol": "target_backbone.", "dino": "center", "beit": "tokenizer.codes"}
    if method in stateful:
        assert any(k.startswith(stateful[method]) for k in end_a["state_dict"]), "the EMA/centre/codebook state is checkpointed"

    checkpoint = straight / f"checkpoints/step-{STEPS:08d}.ckpt"
    backbone = load_backbone(checkpoint)
    assert not backbone.training and isinstance(backbone, torch.nn.Module)
    images = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        features = backbone(images)
    assert features.shape == (3, backbone.feature_dim) and torch.isfinite(features).all()
    # The same backbone from the file `pretrain consolidate` writes.
    consolidate(checkpoint, tmp_path / "weights.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "weights.safetensors")(images), features)


SHARDED = {"fsdp": ["trainer.strategy=fsdp"], "zero3": ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"]}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("method, strategy", [("byol", "zero3"), ("dino", "fsdp")])
def test_sharded_strategies_give_the_ddp_losses_and_a_loadable_backbone(method, strategy, digit_shards, tmp_path):
    """The EMA teachers (BYOL's target, DINO's teacher and centre) under sharded parameters: the same
    losses as DDP from the same seed, and a backbone that loads from the sharded checkpoint."""
    from framework import load_backbone

    # One validation at the end: the online probes are exercised under DDP above; here the pretext step counts.
    common = [f"trainer.val_every_steps={STEPS}", f"trainer.checkpoint_every_steps={STEPS}"]
    ddp_dir, sharded_dir = tmp_path / "ddp", tmp_path / strategy
    run_cli(fit_args(method, digit_shards, ddp_dir, *common))
    run_cli(fit_args(method, digit_shards, sharded_dir, *common, *SHARDED[strategy]), timeout=360)

    def losses(run_dir):
        return [r["train/loss"] for r in metric_rows(run_dir) if "train/loss" in r]

    reference, got = losses(ddp_dir), losses(sharded_dir)
    assert len(got) == STEPS
    # Same fp32 math, gradients reduced in another order: equal to the last bits.
    assert got == pytest.approx(reference, abs=1e-4), (reference, got)

    backbone = load_backbone(sharded_dir / f"checkpoints/step-{STEPS:08d}.ckpt")
    plain = load_backbone(ddp_dir / f"checkpoints/step-{STEPS:08d}.ckpt")
    images = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), plain(images), atol=1e-3, rtol=1e-3)


@pytest.mark.timeout(300)
def test_named_validation_sets_log_losses_and_probes_set_by_set(digit_shards, tmp_path):
    """``data.val: {held_out: ..., seen: ...}`` on 2 ranks: a loss and probes per set, none unnamed."""
    run_dir = tmp_path / "run"
    run_cli(fit_args("simclr", digit_shards, run_dir, f"data.val={{held_out: {digit_shards['val']}, seen: {digit_shards['train']}}}",
                     "trainer.max_steps=3", "trainer.val_every_steps=3", "trainer.checkpoint_every_steps=3"))
    validated = [r for r in metric_rows(run_dir) if any(k.startswith(("val/", "probe/")) for k in r)]
    keys = {k for r in validated for k in r}
    for name in ("held_out", "seen"):
        assert {f"val/{name}/loss", f"probe/{name}/knn_acc", f"probe/{name}/linear_acc"} <= keys
    assert not keys & {"val/loss", "probe/knn_acc"}, "named sets only"
    row = next(r for r in validated if "val/seen/loss" in r)
    assert row["val/held_out/loss"] != row["val/seen/loss"], "two sets, two figures"

