"""Frame targets for HuBERT: what ``pretrain audio targets`` writes and the loader reads.

A targets directory holds, beside the shards it was computed from:

* ``meta.json``: the frame geometry (``sample_rate``, ``conv_layers``: targets are at the
  encoder's frame rate, one per frame of the whole clip), ``clusters``, how the features were
  made (``features``, ``layer``), the k-means settings and the targets' ``quality`` against
  the shards' labels (purity, PNMI) when they have labels;
* ``targets.npy``: every clip's frame labels, one after another (int16, or int32 past 32,767 clusters);
* ``index.json``: sample key -> [offset, frames] into ``targets.npy``.

``mfcc`` is the iteration-1 feature (39 numbers per frame: 13 MFCC, deltas, delta-deltas,
from librosa), computed at the encoder's frame rate so targets and frames line up.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from framework.errors import ConfigError, SampleError

META_NAME, TARGETS_NAME, INDEX_NAME = "meta.json", "targets.npy", "index.json"
MFCC_WINDOW_SECONDS = 0.025  # the usual 25 ms analysis window


def mfcc(wave: np.ndarray, sample_rate: int, n_fft: int, hop: int, offset: int = 0) -> np.ndarray:
    """(frames, 39): 13 MFCC with deltas and delta-deltas. Frame t's window starts at sample
    ``t * hop - offset`` (zeros outside the clip), so windows can be centred on a model's frames."""
    import librosa

    padded = np.pad(wave.astype(np.float32), (max(offset, 0), n_fft))
    frames = 1 + max(0, len(wave) + max(offset, 0) - n_fft) // hop  # windows inside the clip (at least one)
    coeffs = librosa.feature.mfcc(y=padded, sr=sample_rate, n_mfcc=13, n_fft=n_fft, hop_length=hop, center=False,
                                  n_mels=40, fmin=20.0, fmax=sample_rate / 2)[:, :frames]
    # "nearest" at the edges: a short clip (fewer than 9 frames) still gets deltas
    deltas = librosa.feature.delta(coeffs, order=1, mode="nearest")
    accel = librosa.feature.delta(coeffs, order=2, mode="nearest")
    return np.concatenate([coeffs, deltas, accel]).T.astype(np.float32)


def frame_mfcc(wave: np.ndarray, sample_rate: int, conv_layers: List[List[int]]) -> np.ndarray:
    """MFCC at an encoder's frame rate: one row per frame the encoder gives ``wave``, each from a
    25 ms window (or the frame's receptive field, if wider) centred on that frame's samples."""
    from framework.models.audio_encoder import frame_lengths, receptive_field

    import torch

    field, stride = receptive_field(conv_layers)
    count = int(frame_lengths(torch.tensor([len(wave)]), conv_layers)[0])
    n_fft = max(field, int(MFCC_WINDOW_SECONDS * sample_rate))
    rows = mfcc(wave, sample_rate, n_fft, stride, offset=(n_fft - field) // 2)
    if len(rows) < count:
        rows = np.concatenate([rows, np.repeat(rows[-1:], count - len(rows), axis=0)])
    return rows[:count]


class TargetIndex:
    """Read-only access to a targets directory: ``frames(key, start, count)`` -> int array.

    The arrays are memory-mapped and opened lazily, so the index travels to loader workers
    as its path."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_NAME
        if not meta_path.is_file():
            raise ConfigError(f"objective.targets: {self.directory} holds no {META_NAME}; write targets with "
                              f"`pretrain audio targets --shards ... --output {self.directory}`")
        self.meta: Dict[str, Any] = json.loads(meta_path.read_text())
        self._shards = {_normal(url) for url in self.meta.get("shards", [])}
        self._index: Optional[Dict[str, List[int]]] = None
        self._targets: Optional[np.ndarray] = None

    @property
    def clusters(self) -> int:
        return int(self.meta["clusters"])

    def check_geometry(self, sample_rate: int, conv_layers: List[List[int]]) -> None:
        """The targets must be at the model's frame rate and the loader's sample rate."""
        theirs = [list(map(int, layer)) for layer in self.meta["conv_layers"]]
        ours = [list(map(int, layer)) for layer in conv_layers]
        if int(self.meta["sample_rate"]) != sample_rate or theirs != ours:
            raise ConfigError(
                f"objective.targets: {self.directory} was computed for {self.meta['sample_rate']} Hz and conv layers "
                f"{theirs}; this run has data.sample_rate={sample_rate} and model.conv_layers={ours}: its frames would "
                "not line up with the targets. Recompute them with this run's config.")

    def covers(self, shard: str) -> bool:
        """Whether the targets were written for ``shard`` (sample keys are unique only within
        the shards the targets were computed from: another set's clip may share a key)."""
        return _normal(shard) in self._shards

    def _open(self) -> None:
        self._index = json.loads((self.directory / INDEX_NAME).read_text())
        self._targets = np.load(self.directory / TARGETS_NAME, mmap_mode="r")

    def frames(self, key: str, start: int, count: int) -> np.ndarray:
        if self._index is None:
            self._open()
        entry = self._index.get(key)
        if entry is None:
            raise SampleError(f"no targets for this clip in {self.directory} (targets written for other shards?)")
        offset, length = entry
        if start + count > length:
            raise SampleError(f"the clip gives {start + count} frames but {self.directory} holds {length} targets "
                              "for it (targets written for other audio?)")
        return np.asarray(self._targets[offset + start : offset + start + count])

    def __getstate__(self) -> Dict[str, Any]:  # workers reopen the memory map
        return {**self.__dict__, "_index": None, "_targets": None}


def _normal(url: str) -> str:
    return url if "://" in url or url.startswith("pipe:") else os.path.realpath(url)


def target_quality(targets: np.ndarray, labels: np.ndarray, clusters: int) -> Dict[str, float]:
    """How well frame targets tell labels apart (HuBERT's Sec. 5 measures, with labels as the
    "phones"): ``purity`` = E_cluster[max_label P(label | cluster)], ``pnmi`` = I(label;
    cluster) / H(label), and the cluster entropy in bits."""
    classes = int(labels.max()) + 1
    joint = np.zeros((classes, clusters))
    np.add.at(joint, (labels, targets), 1.0)
    joint /= joint.sum()
    p_label, p_cluster = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * np.log(joint[nonzero] / np.outer(p_label, p_cluster)[nonzero])).sum())
    label_entropy = float(-(p_label[p_label > 0] * np.log(p_label[p_label > 0])).sum())
    cluster_entropy = float(-(p_cluster[p_cluster > 0] * np.log2(p_cluster[p_cluster > 0])).sum())
    return {"purity": float(joint.max(0).sum()), "pnmi": mutual / label_entropy if label_entropy > 0 else 0.0,
            "cluster_entropy_bits": cluster_entropy, "frames": int(len(targets))}
