"""BEiT with ``tokenizer: teacher``: visual tokens from a frozen pretrained backbone's feature map
(BEiT v2's idea), the feature maps of both backbones, and the errors for a bad teacher."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vision_helpers import tiny_overrides
from framework.config.load import config_to_dict, load_config
from framework.errors import ConfigError
from framework.objectives import objective_module


def write_teacher(path, shards: dict, method: str = "simclr", *extra: str):
    """A checkpoint file as a run of ``method`` writes it (config + weights), from an untrained objective."""
    torch.manual_seed(1)
    cfg = load_config(None, [*tiny_overrides(method, shards), "data.val=null", *extra])
    teacher = objective_module(method).Objective(config_to_dict(cfg))
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": {"config": config_to_dict(cfg)}}, path)
    return teacher


def beit(shards: dict, *extra: str):
    cfg = load_config(None, [*tiny_overrides("beit", shards), "data.val=null", "objective.codebook_size=4", *extra])
    module = objective_module("beit")
    return module.build(cfg)[0]


def test_feature_maps_are_what_the_backbones_pool():
    from framework.models.resnet import ResNet, ResNetConfig
    from framework.models.vit import ViT, ViTConfig

    images = torch.rand(2, 1, 8, 8)
    resnet = ResNet(ResNetConfig(layers=[1, 1], widths=[8, 16], stem="cifar"), 1).eval()
    fmap = resnet.feature_map(images)
    assert fmap.shape == (2, resnet.feature_map_dim, 4, 4)
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), resnet(images))
    vit = ViT(ViTConfig(patch_size=2, dim=16, depth=1, heads=2, pool="grid", pool_grid=4), 1).eval()
    fmap = vit.feature_map(images)
    assert fmap.shape == (2, vit.feature_map_dim, 4, 4)
    torch.testing.assert_close(fmap.flatten(1), vit(images))  # pool_grid 4 on a 4x4 grid: every token


def test_teacher_tokens_are_the_quantized_teacher_features(digit_shards, tmp_path):
    teacher_objective = write_teacher(tmp_path / "teacher.ckpt", digit_shards)
    objective = beit(digit_shards, "objective.tokenizer=teacher", f"objective.teacher={tmp_path / 'teacher.ckpt'}")
    assert objective.cfg.objective.teacher_dim == teacher_objective.backbone.feature_map_dim  # read at build time
    images = torch.rand(6, 1, 8, 8)
    objective.train()
    loss = objective.loss([images])
    assert torch.isfinite(loss) and bool(objective.tokenizer.fitted)
    assert objective.tokenizer.codes.shape == (4, teacher_objective.backbone.feature_map_dim)

    # The tokens are the nearest codes of the teacher's feature map, resized to the 4x4 patch grid.
    teacher = teacher_objective.backbone.eval()
    with torch.no_grad():
        expected = F.interpolate(teacher.feature_map(images), size=(4, 4), mode="bilinear", antialias=True,
                                 align_corners=False).flatten(2).transpose(1, 2)
    inputs = objective.tokenizer_inputs(images, (4, 4))
    torch.testing.assert_close(inputs, expected)
    assert not any(name.startswith("_teacher") for name in objective.state_dict()), "the teacher is not part of the run"
    assert all(p.grad is None for p in teacher.parameters())
    loss.backward()
    assert objective._teacher[0].training is False and all(p.grad is None for p in objective._teacher[0].parameters())


def test_the_backbone_loads_without_the_teacher_file(digit_shards, tmp_path):
    from framework import load_backbone

    write_teacher(tmp_path / "teacher.ckpt", digit_shards)
    objective = beit(digit_shards, "objective.tokenizer=teacher", f"objective.teacher={tmp_path / 'teacher.ckpt'}")
    objective.train()
    objective.loss([torch.rand(6, 1, 8, 8)])
    torch.save({"state_dict": objective.state_dict(), "hyper_parameters": {"config": config_to_dict(objective.cfg)}},
               tmp_path / "beit.ckpt")
    (tmp_path / "teacher.ckpt").unlink()
    backbone = load_backbone(tmp_path / "beit.ckpt")
    images = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), objective.backbone.eval()(images))


@pytest.mark.parametrize("extra, message", [
    (["objective.tokenizer=teacher"], "objective.tokenizer: teacher needs objective.teacher"),
    (["objective.tokenizer=teacher", "objective.teacher=/nonexistent/t.ckpt"], "objective.teacher: checkpoint not found"),
    (["objective.tokenizer=dvae"], "objective.tokenizer must be 'pixels' or 'teacher'"),
])
def test_bad_tokenizer_settings_name_the_key(digit_shards, extra, message):
    with pytest.raises(ConfigError, match=message):
        beit(digit_shards, *extra)


def test_a_teacher_for_other_channels_is_refused(digit_shards, tmp_path):
    write_teacher(tmp_path / "rgb.ckpt", digit_shards, "simclr", "data.channels=3")
    with pytest.raises(ConfigError, match="takes 3-channel images, the data has 1"):
        beit(digit_shards, "objective.tokenizer=teacher", f"objective.teacher={tmp_path / 'rgb.ckpt'}")


def test_a_run_directory_means_its_newest_checkpoint_pinned_at_build(digit_shards, tmp_path):
    run = tmp_path / "simclr-run"
    (run / "checkpoints").mkdir(parents=True)
    write_teacher(run / "checkpoints/step-00000010.ckpt", digit_shards)
    write_teacher(run / "checkpoints/step-00000020.ckpt", digit_shards)
    objective = beit(digit_shards, "objective.tokenizer=teacher", f"objective.teacher={run}")
    assert objective.cfg.objective.teacher == str(run / "checkpoints/step-00000020.ckpt")
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no checkpoint yet"):
        beit(digit_shards, "objective.tokenizer=teacher", f"objective.teacher={tmp_path / 'empty-run'}")


@pytest.mark.timeout(300)
def test_ddp_fit_with_a_teacher_resumes_exactly(digit_shards, tmp_path):
    """2 processes: every rank loads the teacher, the codebook fitted on rank 0's k-means is broadcast;
    a resumed run reloads the teacher and ends with the uninterrupted run's weights."""
    from vision_helpers import metric_rows, run_cli

    write_teacher(tmp_path / "teacher.ckpt", digit_shards)

    def fit(run_dir, *extra):
        return run_cli(["fit", *tiny_overrides("beit", digit_shards), "objective.tokenizer=teacher",
                        f"objective.teacher={tmp_path / 'teacher.ckpt'}", "data.batch_size=16", "data.num_workers=0",
                        "trainer.devices=2", "trainer.max_steps=4", "trainer.val_every_steps=2", "trainer.val_batches=1",
                        "trainer.checkpoint_every_steps=2", "trainer.log_every_steps=1", "optim.warmup_steps=1",
                        "logging.wandb=disabled", "logging.progress=false", f"run.dir={run_dir}", *extra])

    fit(tmp_path / "straight")
    losses = [r["train/loss"] for r in metric_rows(tmp_path / "straight") if "train/loss" in r]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    fit(tmp_path / "resumed", f"run.resume={tmp_path / 'straight'}/checkpoints/step-00000002.ckpt")
    end_a = torch.load(tmp_path / "straight/checkpoints/step-00000004.ckpt", weights_only=False)["state_dict"]
    end_b = torch.load(tmp_path / "resumed/checkpoints/step-00000004.ckpt", weights_only=False)["state_dict"]
    assert end_a.keys() == end_b.keys() and "tokenizer.codes" in end_a
    for key, value in end_a.items():
        torch.testing.assert_close(end_b[key], value, msg=lambda m, key=key: f"{key}: {m}")
