"""``trainer.strategy=ddp``: every rank holds the whole model; gradients are all-reduced.

Lightning's ``DDPStrategy`` as is (gloo on CPU, NCCL on CUDA), with gradients kept as views
into the reduction buckets, which saves one gradient-sized copy per rank.
"""
from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class FrameworkDDPStrategy(DDPStrategy):
    def __init__(self) -> None:
        super().__init__(gradient_as_bucket_view=True)

    def describe(self) -> str:
        return "DDP: full replica per rank, gradients all-reduced"
