"""CLIP's and SigLIP's losses are exact: 2 ranks x b give the loss and every gradient of 1 rank x 2b
(towers, projections, logit scale and bias), and k accumulated micro-batches give the gradients of
one batch of k x b. The 2-rank side runs in 2 processes (gloo), gradients averaged as DDP does."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip_helpers import RESNET, objective
from framework.losses.clip import clip_loss, siglip_loss

BATCH, LENGTH, VOCAB = 8, 12, 64  # global batch


def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, 1, 8, 8, generator=generator)
    lengths = torch.randint(2, LENGTH + 1, (BATCH,), generator=generator)
    tokens = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    tokens[torch.arange(LENGTH)[None, :] >= lengths[:, None]] = 1  # padding
    return images, tokens, lengths


def step(loss: str, rank: int, world: int, *overrides: str) -> dict:
    """Loss and gradients (both averaged over ranks, as DDP does) of one step on this rank's part."""
    module = objective(f"objective.loss={loss}", *overrides)
    images, tokens, lengths = (x.chunk(world)[rank] for x in batch())
    value = module.loss(images, tokens, lengths)
    value.backward()
    grads = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            grad = param.grad.clone()
            if world > 1:
                dist.all_reduce(grad)
            grads[name] = grad / world
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
    return {"loss": value / world, "grads": grads}


def functional(loss: str, rank: int, world: int) -> dict:
    """The pure loss functions alone, on fixed unit features."""
    generator = torch.Generator().manual_seed(2)
    image = torch.nn.functional.normalize(torch.randn(BATCH, 6, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(BATCH, 6, generator=generator), dim=1)
    image, text = image.chunk(world)[rank].clone().requires_grad_(), text.chunk(world)[rank].clone().requires_grad_()
    scale, bias = torch.tensor(7.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    value = siglip_loss(image, text, scale, bias) if loss == "siglip" else clip_loss(image, text, scale)
    value.backward()
    out = {"loss": value.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad,
           "bias": bias.grad if loss == "siglip" else torch.zeros(())}
    if world > 1:
        for key in ("loss", "scale", "bias"):
            dist.all_reduce(out[key])
            out[key] = out[key] / world
        for key in ("image", "text"):  # each rank holds its rows: gather them back in order
            parts = [torch.empty_like(out[key]) for _ in range(world)]
            dist.all_gather(parts, out[key].contiguous())
            out[key] = torch.cat(parts) / world  # DDP's mean over ranks applies to these too
    return out


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {loss: {"model": step(loss, rank, world), "functional": functional(loss, rank, world)}
                   for loss in ("clip", "siglip")}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # both ranks past their last collective before either tears gloo down
    finally:
        dist.destroy_process_group()


def assert_same(got: dict, want: dict, what: str) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6, msg=f"{what} loss")
    assert got["grads"].keys() == want["grads"].keys() and want["grads"]
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    for loss in ("clip", "siglip"):
        assert_same(two[loss]["model"], step(loss, 0, 1), f"{loss} (2 ranks)")
        one = functional(loss, 0, 1)
        for key, value in one.items():
            torch.testing.assert_close(two[loss]["functional"][key], value, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, key=key, loss=loss: f"{loss} functional {key}: {m}")
        grads = two[loss]["model"]["grads"]
        assert grads["logit_scale"].abs().sum() > 0 and ("logit_bias" in grads) == (loss == "siglip")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulated_micro_batches_equal_one_batch(loss):
    """trainer.accumulate_grad_batches=4: the towers run on 4 micro-batches of 2, recomputed in the
    backward, and the loss sees all 8 pairs: every gradient (the logit scale and bias once, not 4x)
    equals one batch of 8."""
    assert_same(step(loss, 0, 1, "trainer.accumulate_grad_batches=4"), step(loss, 0, 1), f"{loss} (4 micro-batches)")


def test_accumulation_counts_batchnorm_statistics_once():
    """A BatchNorm image tower with 2 micro-batches: the recomputed forward pass in the backward does
    not update the running statistics a second time."""
    accumulated = objective("trainer.accumulate_grad_batches=2", model=RESNET)
    accumulated.loss(*batch()).backward()
    reference = objective(model=RESNET)  # the same two halves through the tower, one after the other
    images = batch()[0]
    with torch.no_grad():
        for half in images.chunk(2):
            reference.image_tower(half)
    for (name, value), (_, want) in zip(accumulated.image_tower.named_buffers(), reference.image_tower.named_buffers()):
        torch.testing.assert_close(value, want, msg=lambda m, name=name: f"{name}: {m}")
    counts = [b for n, b in accumulated.image_tower.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 2 for c in counts)
