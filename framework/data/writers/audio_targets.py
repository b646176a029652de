"""``pretrain audio targets``: k-means frame targets for HuBERT, as a side directory keyed by sample key.

Iteration 1 clusters 39-dim MFCC (``features="mfcc"``); iteration 2 clusters the layer-``layer``
features of a trained hubert or wav2vec2 run (``features=<run dir or checkpoint>``), as in
HuBERT (Hsu et al. 2021, Sec. 3.2) and fairseq's ``examples/hubert/simple_kmeans``:

1. features of every clip, one shard per task, in parallel worker processes: each clip is
   decoded and normalised exactly as the training loader does (``data.sample_rate``, soxr), and
   its features are at the model's frame rate (one row per encoder frame of the whole clip);
2. scikit-learn's MiniBatchKMeans (fairseq's settings: k-means++, batches of 10,000, 100
   iterations without reassignment) on a seeded sample of at most ``fit_frames`` frames;
3. every frame's nearest centre -> ``targets.npy`` + ``index.json``; when the shards hold
   labels (``cls``), each frame takes its clip's label and the targets' purity and PNMI are
   measured against them (with labels as the "phones", HuBERT's PNMI) and written to ``meta.json``.

Resumable: finished stages and shards are kept under ``.targets-state/`` (atomic writes), so a
rerun after a crash (even ``kill -9``) picks up where it stopped and ends with the same bytes
as an uninterrupted run, for any number of workers. ``.targets-state/fingerprint.json``
refuses a rerun with other inputs or options unless ``overwrite``.
"""
from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np

from framework.data.audio_targets import INDEX_NAME, META_NAME, TARGETS_NAME, frame_mfcc, target_quality
from framework.data.files import file_progress
from framework.data.writers.parallel import default_workers, mp_context
from framework.errors import DataError

log = logging.getLogger(__name__)

STATE_DIR = ".targets-state"
# Test hook: the process computing shard N's features SIGKILLs itself right after saving them,
# like a machine dying mid-run.
KILL_ENV = "FRAMEWORK_TARGETS_KILL_AT"
KMEANS = {"init": "k-means++", "batch_size": 10000, "max_iter": 100, "tol": 0.0, "max_no_improvement": 100,
          "n_init": 20, "reassignment_ratio": 0.0}


class Geometry(NamedTuple):
    sample_rate: int
    conv_layers: List[List[int]]


class _Task(NamedTuple):
    index: int
    url: str
    output: str
    features: str  # "mfcc" or a checkpoint path
    layer: int
    geometry: Geometry


def run_geometry(features: str, config: Optional[str], shards: str = "unused") -> Geometry:
    """The sample rate and conv layers targets are computed for: the checkpoint's run config, else
    ``config`` (an experiment yaml), else the defaults (16 kHz, wav2vec 2.0 Base's conv layers)."""
    from framework.config.load import load_config
    from framework.config.schema import DataConfig
    from framework.evaluate.backbone import read_run_config
    from framework.models.audio_encoder import AudioEncoderConfig

    if features != "mfcc":
        cfg = read_run_config(features, key="--features")
    elif config:
        cfg = load_config(config, [f"data.train={shards}"])  # the shards to label stand in for the run's
    else:
        return Geometry(DataConfig().sample_rate, AudioEncoderConfig().conv_layers)
    if not isinstance(cfg.model, AudioEncoderConfig):
        raise DataError(f"{features if features != 'mfcc' else config}: model.name is {cfg.model.name}, not audio_encoder")
    return Geometry(int(cfg.data.sample_rate), [list(map(int, layer)) for layer in cfg.model.conv_layers])


def _clips(url: str, sample_rate: int):
    """(key, normalised waveform, label or -1) for every clip of a shard; bad clips are warned and skipped."""
    from framework.data.audio import audio_member, decode_audio
    from framework.data.sources import open_shard
    from framework.data.tar import iter_samples
    from framework.errors import SampleError

    with open_shard(url) as stream:
        for key, sample, _ in iter_samples(stream):
            data = audio_member(sample)
            try:
                if data is None:
                    raise SampleError("no audio member")
                wave = decode_audio(bytes(data), sample_rate)
            except SampleError as exc:
                log.warning("%s: sample %s: %s (no targets for it)", url, key, exc)
                continue
            label = int(bytes(sample["cls"])) if "cls" in sample else -1
            yield key, (wave - wave.mean()) / (wave.std() + 1e-7), label


def _layer_encoder(checkpoint: str):
    from framework.evaluate.backbone import load_objective

    objective = load_objective(checkpoint, key="--features")
    if not hasattr(objective, "encoder") or not hasattr(objective.encoder, "contextualize"):
        raise DataError(f"--features {checkpoint}: objective '{objective.cfg.objective.name}' has no audio encoder")
    return objective.encoder.eval()


def _shard_features(task: _Task) -> Dict[str, Any]:
    """One shard's clips -> their frame features, saved (atomically) to ``task.output``."""
    import torch

    torch.set_num_threads(1)
    encoder = _layer_encoder(task.features) if task.features != "mfcc" else None
    if encoder is not None and not 0 <= task.layer <= len(encoder.blocks):
        raise DataError(f"--layer {task.layer}: the encoder has layers 0 (its input) to {len(encoder.blocks)}")
    keys, lengths, labels, rows = [], [], [], []
    for key, wave, label in _clips(task.url, task.geometry.sample_rate):
        if encoder is None:
            frames = frame_mfcc(wave, task.geometry.sample_rate, task.geometry.conv_layers)
        else:
            with torch.no_grad():
                lengths_t = torch.tensor([len(wave)])
                raw, valid = encoder.encode(torch.from_numpy(wave)[None], lengths_t)
                frames = encoder.contextualize(encoder.feature_norm(raw), valid, all_layers=True)[task.layer][0].numpy()
        keys.append(key), lengths.append(len(frames)), labels.append(label), rows.append(frames)
    width = rows[0].shape[1] if rows else 1
    features = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)
    tmp = task.output + ".tmp.npz"
    np.savez(tmp, keys=np.array(keys), lengths=np.array(lengths, np.int64), labels=np.array(labels, np.int64),
             features=features)
    os.replace(tmp, task.output)
    if os.environ.get(KILL_ENV) == str(task.index):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"index": task.index, "clips": len(keys)}


def _fingerprint(urls: List[str], features: str, layer: int, clusters: int, geometry: Geometry, seed: int,
                 fit_frames: int) -> Dict[str, Any]:
    def stat(path: str) -> List[int]:
        try:
            info = os.stat(path)
        except OSError:
            return [0, 0]
        return [info.st_size, info.st_mtime_ns]

    checkpoint = None
    if features != "mfcc":
        from framework.evaluate.backbone import resolve_checkpoint

        checkpoint = str(resolve_checkpoint(features, key="--features"))
    options = {"shards": [[url, *stat(url)] for url in urls], "features": features, "checkpoint": checkpoint,
               "checkpoint_stat": stat(checkpoint) if checkpoint else None, "layer": layer, "clusters": clusters,
               "geometry": [geometry.sample_rate, geometry.conv_layers], "seed": seed, "fit_frames": fit_frames}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "options": {k: v for k, v in options.items() if k != "shards"}, "shards": len(urls)}


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _prepare_output(output: Path, fingerprint: Dict[str, Any], overwrite: bool) -> Path:
    state = output / STATE_DIR
    old_path = state / "fingerprint.json"
    if overwrite and output.exists():
        for name in (META_NAME, TARGETS_NAME, INDEX_NAME):
            (output / name).unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)
    elif old_path.is_file():
        old = json.loads(old_path.read_text())
        if old["digest"] != fingerprint["digest"]:
            changed = [k for k in fingerprint["options"] if old["options"].get(k) != fingerprint["options"][k]]
            changed += ["the shards"] if not changed else []
            raise DataError(f"{output} holds targets of another run ({', '.join(changed)} differ); "
                            "pass --overwrite to replace them")
    elif (output / META_NAME).exists():
        raise DataError(f"{output} already holds targets; pass --overwrite to replace them")
    state.mkdir(parents=True, exist_ok=True)
    _atomic_json(old_path, fingerprint)
    return state


def _features_stage(tasks: List[_Task], workers: int) -> None:
    todo = [task for task in tasks if not os.path.exists(task.output)]
    with file_progress("clip features", len(tasks)) as update:
        update(len(tasks) - len(todo))
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                _shard_features(task)
                update(1)
            return
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp_context()) as pool:
            try:
                for _ in pool.map(_shard_features, todo):
                    update(1)
            except BrokenProcessPool:
                raise DataError("a feature process died (killed, or out of memory); run the same command again: "
                                "it keeps the shards already done") from None


def _fit_sample(paths: List[str], fit_frames: int, seed: int) -> np.ndarray:
    """A seeded sample of at most ``fit_frames`` frames over all shards."""
    counts = [int(np.load(path)["lengths"].sum()) for path in paths]
    total = sum(counts)
    if total == 0:
        raise DataError("no clip gave any frame: nothing to cluster")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(total, fit_frames), replace=False))
    sample, start = [], 0
    for path, count in zip(paths, counts):
        inside = chosen[(chosen >= start) & (chosen < start + count)] - start
        if len(inside):
            sample.append(np.load(path)["features"][inside])
        start += count
    return np.concatenate(sample)


def _kmeans_stage(state: Path, paths: List[str], clusters: int, fit_frames: int, seed: int) -> np.ndarray:
    centres_path = state / "kmeans.npy"
    if centres_path.exists():
        return np.load(centres_path)
    from sklearn.cluster import MiniBatchKMeans

    sample = _fit_sample(paths, fit_frames, seed)
    if len(sample) < clusters:
        raise DataError(f"--clusters {clusters} is more than the {len(sample)} frames there are to cluster")
    log.info("k-means: %d clusters on %d frames of %d dimensions", clusters, len(sample), sample.shape[1])
    model = MiniBatchKMeans(n_clusters=clusters, random_state=seed, **KMEANS).fit(sample)
    tmp = state / "kmeans.tmp.npy"
    np.save(tmp, model.cluster_centers_.astype(np.float32))
    os.replace(tmp, centres_path)
    return model.cluster_centers_.astype(np.float32)


def write_audio_targets(shards: str, output: str, features: str = "mfcc", layer: int = -1, clusters: int = 100,
                        config: Optional[str] = None, fit_frames: int = 200_000, seed: int = 0,
                        workers: Optional[int] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Compute k-means frame targets for every clip of ``shards`` into ``output`` (see the module
    docstring); returns ``meta.json``'s contents."""
    from sklearn.metrics import pairwise_distances_argmin

    from framework.data.sources import resolve_shards

    if clusters < 2:
        raise DataError(f"--clusters must be at least 2, not {clusters}")
    if features != "mfcc" and layer < 0:
        raise DataError("--layer L is needed with --features <checkpoint> (0: the transformer's input, 1..depth: a block's output)")
    geometry = run_geometry(features, config, shards)
    urls = [shard.url for shard in resolve_shards(shards, key="--shards")]
    out = Path(output)
    fingerprint = _fingerprint(urls, features, layer, clusters, geometry, seed, fit_frames)
    state = _prepare_output(out, fingerprint, overwrite)
    tasks = [_Task(i, url, str(state / f"features-{i:06d}.npz"), features, layer, geometry) for i, url in enumerate(urls)]
    _features_stage(tasks, workers or default_workers())
    paths = [task.output for task in tasks]
    centres = _kmeans_stage(state, paths, clusters, fit_frames, seed)
    dtype = np.int16 if clusters <= np.iinfo(np.int16).max else np.int32
    index: Dict[str, List[int]] = {}
    all_targets, all_labels, offset = [], [], 0
    with file_progress("assigning frames", len(paths)) as update:
        for path in paths:
            part = np.load(path)
            targets = pairwise_distances_argmin(part["features"], centres).astype(dtype) if len(part["features"]) else np.zeros(0, dtype)
            for key, length, label in zip(part["keys"].tolist(), part["lengths"].tolist(), part["labels"].tolist()):
                if key in index:
                    raise DataError(f"sample key {key} appears twice in {shards}: targets are keyed by sample key")
                index[key] = [offset, length]
                all_labels.append(np.full(length, label, np.int64))
                offset += length
            all_targets.append(targets)
            update(1)
    targets = np.concatenate(all_targets) if all_targets else np.zeros(0, dtype)
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64)
    np.save(out / (TARGETS_NAME + ".tmp.npy"), targets)
    os.replace(out / (TARGETS_NAME + ".tmp.npy"), out / TARGETS_NAME)
    _atomic_json(out / INDEX_NAME, index)
    labelled = labels >= 0
    quality = target_quality(targets[labelled].astype(np.int64), labels[labelled], clusters) if labelled.any() else None
    meta = {"clusters": clusters, "sample_rate": geometry.sample_rate, "conv_layers": geometry.conv_layers,
            "features": features, "layer": layer if features != "mfcc" else None, "seed": seed,
            "fit_frames": fit_frames, "kmeans": KMEANS, "clips": len(index), "frames": int(len(targets)),
            "shards": urls, "quality": quality, "used_clusters": int(len(np.unique(targets)))}
    _atomic_json(out / META_NAME, meta)  # written last: its presence means the targets are complete
    return meta
