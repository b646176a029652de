"""Fixtures of the vision tests: one intra-op thread, small labelled image shards of scikit-learn's digits."""
from __future__ import annotations

import numpy as np
import pytest

from run_helpers import one_thread

from vision_helpers import png


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> dict:
    """192 train + 64 val digits as 8x8 PNGs in class folders -> labelled shards of 32 samples."""
    from sklearn.datasets import load_digits

    from framework.data.writers.images import write_image_shards

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    out = {}
    for split, indices in (("train", range(0, 192)), ("val", range(192, 256))):
        for i in indices:
            path = root / "png" / split / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(images[i]))
        write_image_shards([str(root / "png" / split)], str(root / split), max_samples_per_shard=32, seed=0)
        out[split] = root / split
    out["images"], out["labels"], out["root"] = images[:256], digits.target[:256], root
    return out


