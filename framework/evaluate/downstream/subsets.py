"""Class-balanced label subsets, reproducible by seed."""
from __future__ import annotations

import numpy as np

from framework.errors import ConfigError


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction * n_c)`` samples of every class c, drawn without
    replacement by ``seed``: each class keeps its share, and the same seed gives the same subset.
    A fraction that leaves a class with no sample is an error naming the class."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--label-fraction values must be in (0, 1], not {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        if count == 0:
            raise ConfigError(f"--label-fraction {fraction} leaves class {label} with no sample (it has {len(members)} "
                              f"labelled sample(s); the smallest usable fraction is {0.5 / len(members):.3g})")
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen))
