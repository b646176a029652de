"""The frozen-feature modes: a linear probe whose hyper-parameters are chosen on validation
(never on test), and DINO's weighted kNN."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from framework.evaluate.probes import fit_softmax, knn_predict


@dataclass
class LinearGrid:
    lrs: List[float] = field(default_factory=lambda: [0.1, 0.01, 0.001])
    weight_decays: List[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-2])
    steps: int = 300
    batchnorm: bool = True  # standardise features by the training part's statistics (an affine-free BatchNorm)


def linear_mode(train: Tuple[np.ndarray, np.ndarray], val: Tuple[np.ndarray, np.ndarray], test_x: np.ndarray,
                grid: LinearGrid, seed: int) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Fit one softmax per (lr, weight decay) on ``train``, keep the best on ``val`` (the first of
    equals), predict ``test_x``. Test labels are never an argument: selection cannot see them."""
    train_x, train_y = (torch.from_numpy(a) for a in train)
    val_x, val_y = (torch.from_numpy(a) for a in val)
    scores = []
    best = None
    for lr, decay in itertools.product(grid.lrs, grid.weight_decays):
        predict = fit_softmax(train_x, train_y, grid.steps, lr, decay, seed, standardize=grid.batchnorm)
        accuracy = float((predict(val_x) == val_y).float().mean())
        scores.append({"lr": lr, "weight_decay": decay, "val_accuracy": accuracy})
        if best is None or accuracy > best[0]:
            best = (accuracy, predict, lr, decay)
    _, predict, lr, decay = best
    return predict(torch.from_numpy(test_x)).numpy(), {"lr": lr, "weight_decay": decay, "grid": scores}


def knn_mode(train: Tuple[np.ndarray, np.ndarray], test_x: np.ndarray, k: int, temperature: float) -> np.ndarray:
    train_x, train_y = (torch.from_numpy(a) for a in train)
    return knn_predict(train_x, train_y, torch.from_numpy(test_x), k, temperature).numpy()
