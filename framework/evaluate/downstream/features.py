"""Labelled shards -> frozen features of a checkpoint's encoder, computed once and cached.

Any modality (``encoders.py``): a text transformer's pooled states on text shards, a vision
objective's image backbone (CLIP's image tower too) on image shards, a speech objective's audio
encoder (mean over valid frames) on audio shards, decoded as its training loader did (tokenizer;
image size and channels; sample rate). The
features are cached under the output directory, keyed by the checkpoint file and the shards'
sizes and times, so another label fraction, seed or mode does not embed again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from framework.errors import ConfigError, DataError


@dataclass
class Split:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) int64: key_id of each sample key
    groups: Optional[np.ndarray] = None  # (N,) str: the group key's value per sample, when asked


def _cache_key(checkpoint: Path, urls: List[str]) -> str:
    parts = [str(checkpoint), *(str(os.stat(p).st_mtime_ns) + str(os.stat(p).st_size) for p in [checkpoint, *urls]
                                if os.path.exists(p)), *urls]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def embed_split(checkpoint: str | Path, spec: str, key: str, cache_dir: Path, batch_size: int = 256,
                on_error: str = "skip", seq_len: Optional[int] = None) -> Split:
    """The checkpoint's frozen features of every labelled sample of ``spec`` (shards)."""
    from framework.data.labelled import labelled_processor
    from framework.data.loader import val_loader
    from framework.data.sources import resolve_shards
    from framework.evaluate.backbone import resolve_checkpoint
    from framework.evaluate.downstream.encoders import pretrained_encoder

    path = resolve_checkpoint(checkpoint, key="--checkpoint")
    shards = resolve_shards(spec, key)
    cached = cache_dir / f"{key.replace('.', '-')}-{_cache_key(path, [s.url for s in shards])}{f'-{seq_len}' if seq_len else ''}.npz"
    if cached.exists():
        with np.load(cached) as saved:
            return Split(saved["features"], saved["labels"], saved["ids"])
    encoder, cfg = pretrained_encoder(path)
    modality, data = encoder.modality, copy.deepcopy(cfg.data)
    data.val_batch_size, data.on_error, data.num_workers = batch_size, on_error, 0
    if seq_len:
        if seq_len > getattr(cfg.model, "max_seq_len", seq_len):
            raise ConfigError(f"data.seq_len={seq_len} exceeds the checkpoint's model.max_seq_len={cfg.model.max_seq_len}")
        data.seq_len = seq_len
    processor, collate = labelled_processor(modality, data, 0, False, getattr(cfg.model, "conv_layers", None), encoder.pad_id)
    loader = val_loader(shards, processor, data, seed=0, rank=0, world_size=1, collate_fn=collate)
    features, labels, ids = [], [], []
    with torch.no_grad():
        for batch in loader:
            out = encoder(batch)
            features.append(out.float().numpy()), labels.append(batch["label"].numpy()), ids.append(batch["id"].numpy())
    if not features:
        raise DataError(f"{key}={spec}: no sample decoded as {modality}: the checkpoint is a {modality} model "
                        "(are these shards of another modality?)")
    split = Split(np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64), np.concatenate(ids))
    if (split.labels < 0).any():
        raise DataError(f"{key}={spec}: {int((split.labels < 0).sum())} of {len(split.labels)} samples have no label "
                        "(a cls member or an integer json 'label'): downstream evaluation needs labelled shards")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cached, features=split.features, labels=split.labels, ids=split.ids)
    return split


def read_groups(spec: str, key: str, group_key: str, ids: np.ndarray) -> np.ndarray:
    """Each sample's json value of ``group_key`` (as text), in the order of ``ids``."""
    from framework.data.images import key_id
    from framework.data.sources import iter_shard, resolve_shards

    values: Dict[int, str] = {}
    fields: set = set()
    for shard in resolve_shards(spec, key):
        for sample_key, sample in iter_shard(shard):
            if "json" not in sample:
                continue
            meta = json.loads(bytes(sample["json"]))
            fields.update(meta)
            if group_key in meta:
                values[key_id(sample_key)] = str(meta[group_key])
    if not values:
        raise ConfigError(f"--group-key {group_key}: no sample of {key}={spec} has it in its json "
                          f"(fields there: {', '.join(sorted(fields)) or 'none'})")
    missing = [i for i in ids.tolist() if i not in values]
    if missing:
        raise DataError(f"--group-key {group_key}: {len(missing)} of {len(ids)} samples of {key}={spec} lack it")
    return np.array([values[i] for i in ids.tolist()])
