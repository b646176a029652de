"""The online probes: accurate on separable features, and they never touch the backbone's gradients."""
from __future__ import annotations

import torch

from vision_helpers import tiny_overrides
from framework.config.load import config_to_dict, load_config
from framework.evaluate.probes import OnlineProbes, knn_accuracy, linear_probe_accuracy, split_by_id
from framework.objectives import objective_module
from framework.objectives.vision_common import ProbeConfig


def clusters(n: int = 200, classes: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_probes_separate_clusters():
    x, y = clusters()
    assert knn_accuracy(x[:100], y[:100], x[100:], y[100:], k=10) > 0.95
    assert linear_probe_accuracy(x[:100], y[:100], x[100:], y[100:], steps=100) > 0.95


def test_split_by_key_id_is_stable_and_balanced():
    ids = torch.arange(10_000) * 7919
    fit = split_by_id(ids, 0.5)
    assert 0.45 < fit.float().mean() < 0.55
    assert torch.equal(fit, split_by_id(ids.flip(0), 0.5).flip(0)), "a sample's side depends on its key only"


def test_probe_callback_leaves_backbone_gradients_and_weights_unchanged(digit_shards):
    cfg = load_config(None, tiny_overrides("simclr", digit_shards))
    module = objective_module("simclr").Objective(config_to_dict(cfg)).train()
    images = torch.from_numpy(digit_shards["images"][:32, None]).contiguous()
    torch.manual_seed(0)
    module.loss(module.views(images.float() / 255)).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert grads

    probes = OnlineProbes(ProbeConfig(linear_steps=50))
    module.eval()  # as in Lightning's validation loop
    for start in (0, 32, 64):
        batch = {"image": torch.from_numpy(digit_shards["images"][start : start + 32, None]).contiguous(),
                 "label": torch.from_numpy(digit_shards["labels"][start : start + 32]).long(),
                 "id": torch.arange(start, start + 32) * 7919}
        probes.collect(module, batch)
    with torch.inference_mode():  # Lightning validates under inference mode; the probe must still train
        results = probes.compute(torch.device("cpu"))
    assert set(results) == {"probe/knn_acc", "probe/linear_acc"} and all(0 <= v <= 1 for v in results.values())
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.detach(), weights[name])
        if name in grads:
            assert torch.equal(param.grad, grads[name]), f"the probe changed the gradient of {name}"
        else:
            assert param.grad is None


def test_probes_skip_unlabelled_validation_data(caplog):
    probes = OnlineProbes(ProbeConfig())
    probes._sets = {0: ([torch.randn(10, 4)], [torch.full((10,), -1)], [torch.arange(10)])}
    assert probes.compute(torch.device("cpu")) == {}
    assert "online probes skipped" in caplog.text
