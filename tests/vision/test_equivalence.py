"""2 ranks x batch b give the loss and gradients of 1 rank x batch 2b, for the losses that look
across the batch: SimCLR (negatives gathered with gradients, global BatchNorm), MoCo v3
(keys gathered, BN in heads), BYOL (BN in heads), DINO (the centre, all-reduced).

The 2-rank side runs in 2 processes with torch.distributed (gloo); gradients are averaged
over ranks as DDP does. The 1-rank side runs in this process without a process group."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from framework.config.load import config_to_dict, load_config
from framework.objectives import objective_module

RESNET = ["model.name=resnet", "model.stem=cifar", "model.layers=[1,1]", "model.widths=[4,8]"]
VIT = ["model.name=vit", "model.patch_size=2", "model.dim=16", "model.depth=1", "model.heads=2"]
CASES = {
    "simclr": [*RESNET, "objective.proj_hidden_dim=16", "objective.proj_dim=8"],
    "moco_v3": [*RESNET, "objective.mlp_hidden_dim=16", "objective.dim=8"],
    "byol": [*RESNET, "objective.mlp_hidden_dim=16", "objective.proj_dim=8"],
    "dino": [*VIT, "objective.out_dim=32", "objective.hidden_dim=16", "objective.bottleneck_dim=8",
             "objective.local_crops=1", "objective.local.size=4"],
}
BATCH = 8  # global


def build(method: str):
    cfg = load_config(None, [f"objective.name={method}", *CASES[method], "data.train=unused", "data.image_size=8",
                             "data.channels=1"])
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return objective_module(method).Objective(config_to_dict(cfg)).train()


def fixed_views(method: str, module) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return module.views(torch.rand(BATCH, 1, 8, 8))


def step(method: str, rank: int, world: int) -> dict:
    """Loss (mean over ranks), parameter gradients (mean over ranks) and buffers after one step."""
    module = build(method)
    views = [v.chunk(world)[rank] for v in fixed_views(method, module)]
    loss = module.loss(views)
    loss.backward()
    grads = {}
    for name, param in module.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.clone()
        if world > 1:
            dist.all_reduce(grad)
        grads[name] = grad / world
    loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
    buffers = {name: b.clone() for name, b in module.named_buffers() if "running" in name or name == "center"}
    return {"loss": loss / world, "grads": grads, "buffers": buffers}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {method: step(method, rank, world) for method in CASES}
        if rank == 0:
            torch.save(results, out)
        # both ranks past their last collective before either tears gloo down: a rank closing its
        # pairs while the other still wrote ranks.pt aborted (SIGABRT) in one fresh-clone suite
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    for method in CASES:
        one = step(method, 0, 1)
        torch.testing.assert_close(two[method]["loss"], one["loss"], rtol=1e-5, atol=1e-6, msg=f"{method} loss")
        assert two[method]["grads"].keys() == one["grads"].keys() and one["grads"]
        for name, grad in one["grads"].items():
            torch.testing.assert_close(two[method]["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, method=method: f"{method} {name}: {m}")
        for name, value in one["buffers"].items():  # BN running statistics, DINO's centre
            torch.testing.assert_close(two[method]["buffers"][name], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, method=method: f"{method} {name}: {m}")
    assert one["buffers"]["center"].abs().sum() > 0, "DINO's centre was updated"


def test_per_rank_batchnorm_would_differ():
    """The control: without global statistics, 2 x b is NOT 1 x 2b (so the test above tests something)."""
    module = build("byol")
    views = fixed_views("byol", module)
    full = module.loss(views)
    halves = [module.loss([v.chunk(2)[r] for v in views]) for r in range(2)]
    assert not torch.allclose(full, sum(halves) / 2)

