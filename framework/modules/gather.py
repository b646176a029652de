"""Collectives for losses that look across ranks: all_gather and all_reduce that carry gradients.

``torch.distributed.all_gather`` cuts the autograd graph, so a contrastive loss whose
negatives come from other ranks would get no gradient through them. ``all_gather_with_grad``
sends each rank the gradient of every rank's loss with respect to its own inputs, which,
after DDP averages parameter gradients, gives exactly the gradient of the loss over the
global batch. Both work with gloo (CPU) and NCCL, and are the identity without a process
group (one process), so the same objective code runs everywhere.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank holds the gradient of its own loss w.r.t. all ranks' inputs; this rank's
        # inputs are touched by every rank's loss, so sum those gradients (no reduce_scatter:
        # gloo has none) and keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # y = sum_r x_r on every rank, so dL/dx_r = sum over ranks of dL_rank/dy.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _RingShift(torch.autograd.Function):
    """Forward: send to the next rank, receive from the previous. Backward: the reverse, so a
    gradient returns to the rank that owns the tensor (SigLIP's neighbour exchange)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _exchange(x.contiguous(), +1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _exchange(grad.contiguous(), -1)


def _exchange(x: torch.Tensor, direction: int) -> torch.Tensor:
    world, me = dist.get_world_size(), dist.get_rank()
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, (me + direction) % world), dist.P2POp(dist.irecv, received, (me - direction) % world)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def ring_shift_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The previous rank's ``x`` (rank r gets rank r-1's), differentiable; one peer-to-peer
    exchange, so a rank never holds more than two ranks' tensors at once."""
    if world_size() == 1:
        return x
    return _RingShift.apply(x)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, rank order."""
    if world_size() == 1:
        return x
    return _AllGather.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like ``all_gather_with_grad`` for tensors that need no gradient (momentum keys, centres)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable (for batch statistics over the global batch)."""
    if world_size() == 1:
        return x
    return _AllReduce.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks, no gradient (statistics such as DINO's centre)."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()
