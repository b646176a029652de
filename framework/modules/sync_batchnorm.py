"""BatchNorm whose batch statistics cover the global batch (all ranks), on CPU and GPU.

SimCLR ("global BN"), MoCo v3 and BYOL compute BatchNorm statistics over the whole batch:
with per-rank statistics, a network can tell which samples share a rank and a contrastive
loss can be "solved" through the statistics instead of the content. ``torch.nn.SyncBatchNorm``
would do, but refuses CPU tensors (gloo), so this is a small equivalent: per-channel sum,
sum of squares and count are all-reduced (differentiably), which makes 2 ranks x batch b
compute the same values and gradients as 1 rank x batch 2b. Without a process group, or in
eval mode, it is plain BatchNorm. It subclasses ``_BatchNorm``, so its state-dict keys
equal ``nn.BatchNorm*d``'s and a backbone loads into a plain one.
"""
from __future__ import annotations

import torch
from torch import nn

from framework.modules.gather import all_reduce_sum_with_grad, world_size


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d (inputs (N, C) or (N, C, ...))."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() / channels, device=x.device, dtype=torch.float32)
        xf = x.float()
        stats = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0)  # biased, as BN normalizes
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
                self.num_batches_tracked.add_(1)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` (in place, recursively) by GlobalBatchNorm with the same state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = convert_to_global_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module

