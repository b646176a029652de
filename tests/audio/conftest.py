"""Fixtures of the speech tests: one intra-op thread, and small labelled audio shards of synthetic
"words" (tone sequences whose pitches depend on the class) at 8 kHz, which the loader resamples
to 16 kHz, of lengths 0.25-1.2 s so batches need padding and bucketing has work to do."""
from __future__ import annotations

import numpy as np
import pytest

from run_helpers import one_thread


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def word(label: int, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Three tones whose pitches the label sets, with a little noise: a class that frames can tell apart."""
    t = np.arange(int(seconds * rate)) / rate
    thirds = np.array_split(t, 3)
    parts = [np.sin(2 * np.pi * (200 + 150 * ((label + k) % 4)) * part) for k, part in enumerate(thirds)]
    return (0.5 * np.concatenate(parts) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="session")
def speech_shards(tmp_path_factory) -> dict:
    """48 train + 16 val clips in 4 classes (folders), 8 kHz WAV, shards of 12."""
    import soundfile

    from framework.data.writers.audio import write_audio_shards

    root = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(0)
    out = {"root": root}
    for split, count in (("train", 48), ("val", 16)):
        for i in range(count):
            label = i % 4
            path = root / "wav" / split / f"c{label}" / f"{i:03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), word(label, float(rng.uniform(0.25, 1.2)), 8000, rng), 8000, subtype="PCM_16")
        write_audio_shards([str(root / "wav" / split)], str(root / split), labels_from_folders=True,
                           max_samples_per_shard=12, seed=0, workers=1)
        out[split] = root / split
    return out
