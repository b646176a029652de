"""Peak memory and time of an image-text loss over 2 CPU ranks (gloo), at a global batch of thousands.

    .venv/bin/python bench/clip_loss.py [--batch 4096] [--dim 512] [--repeats 5]

Each rank holds batch/2 unit image and text features (with gradients); one forward + backward of:
  (g) global logits: features gathered with gradients, every rank builds all N x N logits
      (OpenCLIP without --local-loss);
  (l) CLIP local loss (ours): every rank scores its n rows against all N columns (n x N);
  (s) SigLIP, texts round the ring (ours): n x n logits at a time, world - 1 neighbour exchanges;
  (sg) SigLIP with the texts all-gathered instead (n x N), for comparison.
Memory, per rank: "kept for backward" is exact, the bytes of every distinct tensor the forward
saves for the backward (logits, softmax inputs; the features themselves included), measured with
autograd's saved-tensor hooks; "peak RSS growth" is the process's maximum resident memory after a
warm-up pass minus before (ru_maxrss: it includes temporaries and gradients, but also whatever the
allocator keeps, so it is coarse). Each variant runs in fresh processes. Time: median of --repeats forward+backward passes on rank 0.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.losses.clip import clip_loss, siglip_loss  # noqa: E402
from framework.modules.gather import all_gather_with_grad, rank, world_size  # noqa: E402

VARIANTS = {
    "g": "global N x N logits (OpenCLIP default layout)",
    "l": "CLIP local loss (ours, n x N)",
    "s": "SigLIP, ring exchange (ours, n x n)",
    "sg": "SigLIP, texts all-gathered (n x N)",
}


def global_logits(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    images, texts = all_gather_with_grad(image), all_gather_with_grad(text)
    labels = torch.arange(images.shape[0])
    logits = scale * images @ texts.T
    # every rank computes the whole loss; dividing by the world keeps DDP's mean of gradients right
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2 / world_size()


def siglip_gathered(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    texts = all_gather_with_grad(text)
    logits = (scale * image) @ texts.T + bias  # (n, N), the same softplus form as siglip_loss
    positives = logits[torch.arange(image.shape[0]), rank() * image.shape[0] + torch.arange(image.shape[0])]
    return (F.softplus(logits).sum() - positives.sum()) / image.shape[0]


def run(variant: str, image: torch.Tensor, text: torch.Tensor) -> int:
    """Forward + backward; returns the bytes the forward kept for the backward (unique storages)."""
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if variant == "g":
            loss = global_logits(image, text, scale)
        elif variant == "l":
            loss = clip_loss(image, text, scale)
        elif variant == "s":
            loss = siglip_loss(image, text, scale, bias)
        else:
            loss = siglip_gathered(image, text, scale, bias)
    loss.backward()
    return sum(kept.values())


def _worker(local_rank: int, variant: str, batch: int, dim: int, repeats: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=local_rank, world_size=2)
    generator = torch.Generator().manual_seed(local_rank)
    n = batch // 2
    image = F.normalize(torch.randn(n, dim, generator=generator), dim=1).requires_grad_()
    text = F.normalize(torch.randn(n, dim, generator=generator), dim=1).requires_grad_()
    run(variant, image, text)  # warm-up: the collectives' own first-use buffers are not the loss's
    image.grad = text.grad = None
    dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        saved = run(variant, image, text)
        times.append(time.perf_counter() - start)
        image.grad = text.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    result = torch.tensor([saved / 1024, peak, statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    if local_rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


def measure(variant: str, batch: int, dim: int, repeats: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.pt")
        mp.spawn(_worker, args=(variant, batch, dim, repeats, str(Path(tmp) / "init"), out), nprocs=2, join=True)
        saved_kb, peak_kb, seconds = torch.load(out).tolist()
    return saved_kb / 1024, peak_kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="global batch (pairs over both ranks)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, big = args.batch // 2, args.batch
    print(f"global batch {big} over 2 ranks (n = {n} per rank), width {args.dim}; fp32 logits: "
          f"N x N = {big * big * 4 / 2**20:.0f} MB, n x N = {n * big * 4 / 2**20:.0f} MB, n x n = {n * n * 4 / 2**20:.0f} MB")
    print(f"| {'loss':<46} | {'kept for backward (MB)':>22} | {'peak RSS growth (MB)':>20} | {'forward + backward (s)':>22} |")
    print(f"|{'-' * 48}|{'-' * 23}:|{'-' * 21}:|{'-' * 23}:|")
    for variant, label in VARIANTS.items():
        saved, peak, seconds = measure(variant, args.batch, args.dim, args.repeats)
        print(f"| {label:<46} | {saved:22.0f} | {peak:20.0f} | {seconds:22.3f} |", flush=True)


if __name__ == "__main__":
    main()
