"""Online evaluation during pretraining: a linear probe and a kNN classifier on frozen features.

At every validation, the callback embeds the labelled validation images with the objective's
evaluation backbone (``pl_module.features``, under ``no_grad`` and in eval mode), gathers the
features from all ranks, splits them by a stable hash of each sample key into a fitting part
and a scoring part (so the split does not depend on the number of ranks), and logs

- ``probe/linear_acc``: a linear classifier fitted on detached, standardised features (its
  own parameters and optimiser: no gradient reaches the backbone), scored on the other part;
- ``probe/knn_acc``: DINO's weighted kNN (cosine similarity, top-k, weights exp(s / T)).

Every rank computes the same numbers from the same gathered features; rank 0 logs them.
Validation shards without labels (``cls`` members) are skipped with one warning.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

from framework.modules.gather import world_size

log = logging.getLogger(__name__)


def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (validation splits)."""
    if world_size() == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes)])


def split_by_id(ids: torch.Tensor, train_fraction: float) -> torch.Tensor:
    """True for samples that fit the probe: a fixed fraction by the key hash, any rank count."""
    return (ids % 10_000).float() < train_fraction * 10_000


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 20,
                temperature: float = 0.07) -> torch.Tensor:
    """Weighted kNN of Wu et al. 2018 as used by DINO: each test row takes the label with the most
    votes exp(cos / T) among its k nearest training rows. Labels need not be contiguous."""
    classes, train_index = torch.unique(train_y, return_inverse=True)
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    k = min(k, train_x.shape[0])
    predictions = []
    for start in range(0, test_x.shape[0], 1024):
        sims, index = (test_x[start : start + 1024] @ train_x.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], len(classes), dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_index[index], weights)
        predictions.append(classes[votes.argmax(dim=1)])
    return torch.cat(predictions) if predictions else train_y.new_zeros(0)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    return float((knn_predict(train_x, train_y, test_x, k, temperature) == test_y).float().mean())


def fit_softmax(train_x: torch.Tensor, train_y: torch.Tensor, steps: int = 300, lr: float = 0.05,
                weight_decay: float = 1e-4, seed: int = 0, standardize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A softmax classifier fitted on detached features (full batch, AdamW); returns features ->
    predicted labels (any label values). ``standardize``: features scaled by the fitting part's
    statistics (MAE's probe uses an affine-free BatchNorm for the same reason: feature scales
    differ wildly between methods)."""
    train_x = train_x.detach().float()
    mean, std = (train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6) if standardize else (0.0, 1.0)
    train_x = (train_x - mean) / std
    classes, target = torch.unique(train_y, return_inverse=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = (torch.randn(train_x.shape[1], len(classes), generator=generator) * 0.01).to(train_x.device).requires_grad_()
    bias = torch.zeros(len(classes), device=train_x.device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(train_x @ weight + bias, target).backward()
            optimizer.step()
    weight, bias = weight.detach(), bias.detach()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classes[(((x.detach().float() - mean) / std) @ weight + bias).argmax(1)]

    return predict


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Fit a softmax classifier on standardised detached features and score it."""
    predict = fit_softmax(train_x, train_y, steps, lr, weight_decay, seed)
    return float((predict(test_x) == test_y).float().mean())


class OnlineProbes(Callback):
    """Linear probe and kNN on validation features, logged at every validation.

    ``probe`` is the objective's ``ProbeConfig``. The objective provides ``features(images)``:
    float images in [0, 1] -> (N, D) from the backbone it would export, or, for other inputs,
    ``probe_features(batch)`` (audio: the mean of the encoder's frames over a clip)."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        # (features, labels, ids) per validation set (``dataloader_idx``): named sets are probed apart
        self._sets: Dict[int, tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]] = {}
        self._warned = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sets = {}

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.collect(pl_module, batch, dataloader_idx)

    def collect(self, pl_module: LightningModule, batch: Any, dataloader_idx: int = 0) -> None:
        if not isinstance(batch, dict) or "label" not in batch:
            return
        from framework.augment import to_float_images

        probe = getattr(pl_module, "probe_features", None)  # non-image objectives (audio) say what to embed
        with torch.no_grad():
            features = probe(batch) if probe is not None else pl_module.features(to_float_images(batch["image"]))
        features_of_set, labels, ids = self._sets.setdefault(dataloader_idx, ([], [], []))
        # .clone(): validation runs under inference_mode, whose tensors cannot enter autograd later.
        features_of_set.append(features.detach().float().clone())
        labels.append(batch["label"].clone())
        ids.append(batch["id"].clone())

    def compute(self, device: torch.device, dataloader_idx: int = 0, prefix: str = "probe") -> Dict[str, float]:
        """Gather set ``dataloader_idx`` (all ranks take part) and score it as ``<prefix>/knn_acc``,
        ``<prefix>/linear_acc``; empty when there is nothing labelled."""
        features, labels, ids = self._sets.get(dataloader_idx, ([], [], []))
        if features:
            local_x, local_y, local_id = torch.cat(features), torch.cat(labels), torch.cat(ids)
        else:
            local_x = torch.zeros(0, 1, device=device)
            local_y = local_id = torch.zeros(0, dtype=torch.long, device=device)
        # Ranks without batches must still know the feature width to take part in the gather.
        width = torch.tensor([local_x.shape[1] if local_x.shape[0] else 0], device=device)
        if world_size() > 1:
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if local_x.shape[0] == 0:
            local_x = torch.zeros(0, int(width.item()), device=device)
        x, y, ids = gather_uneven(local_x.to(device)), gather_uneven(local_y.to(device)), gather_uneven(local_id.to(device))
        labelled = y >= 0
        x, y, ids = x[labelled], y[labelled], ids[labelled]
        fit = split_by_id(ids, self.probe.train_fraction)
        if fit.sum() < 2 or (~fit).sum() < 1 or y[fit].unique().numel() < 2:
            if not self._warned:
                log.warning("online probes skipped (%s): the validation shards give %d labelled samples "
                            "(need labels in 'cls' members and at least 2 classes)", prefix, int(labelled.sum()))
                self._warned = True
            return {}
        results: Dict[str, float] = {}
        with torch.inference_mode(False):
            x, y = x.clone(), y.clone()
            if self.probe.knn:
                results[f"{prefix}/knn_acc"] = knn_accuracy(x[fit], y[fit], x[~fit], y[~fit], self.probe.knn_k,
                                                            self.probe.knn_temperature)
            if self.probe.linear:
                results[f"{prefix}/linear_acc"] = linear_probe_accuracy(x[fit], y[fit], x[~fit], y[~fit],
                                                                        self.probe.linear_steps, self.probe.linear_lr)
        return results

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Every rank walks every set (its own may be empty): the gathers inside must pair up.
        names = getattr(pl_module, "val_names", [""])
        results: Dict[str, float] = {}
        for index, name in enumerate(names):
            results.update(self.compute(pl_module.device, index, f"probe/{name}" if name else "probe"))
        self._sets = {}
        for name, value in results.items():
            pl_module.log(name, value, rank_zero_only=True)
        if results and trainer.is_global_zero:
            print(f"step {trainer.global_step}  " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)

