"""``pretrain eval finetune``: one fine-tuning run (``objective.name: finetune``, through ``fit``)
per label fraction x seed, from the checkpoint and, with ``--from-scratch``, from random weights.

A label subset is written as its own shards under the output directory (class-balanced, drawn
by seed) and streamed like any training set; the full training set is read where it is. Model
selection (best checkpoint, early stopping) uses ``data.val`` when ``data.test`` is given, else
a fixed fifth of ``data.train`` (by key hash) that no subset draws from, with ``data.val`` as
the test set, as in the frozen modes. Test predictions come from the best validation's weights.

Every run is an ordinary run directory (``config.yaml``, ``metrics.jsonl``, checkpoints): a
large one can be launched alone with ``pretrain launch torchrun|slurm --config`` its config, and
this command, run again, finds it finished and only evaluates it. Under torchrun every rank
runs the same sequence of fits; rank 0 alone writes subsets first, and evaluates and reports.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from framework.errors import ConfigError, DataError

# The fine-tuning recipe's defaults (MAE's, scaled to short runs); any key=value given to the
# command overrides them, and the pretrained run's own trainer/optim settings are not inherited.
FINETUNE_DEFAULTS: Dict[str, Any] = {
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_steps": 20,
              "min_lr_ratio": 0.01, "grad_clip": 1.0, "scale_rule": "none"},
    "trainer": {"max_steps": 300, "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32",
                "accumulate_grad_batches": 1, "val_every_steps": 50, "val_batches": -1, "checkpoint_every_steps": 300,
                "keep_last_checkpoints": 1, "log_every_steps": 10, "activation_checkpointing": False, "compile": False},
    "logging": {"wandb": "disabled", "progress": False},
}
BATCH_SIZE = 32


@dataclass
class LabelIndex:
    """Every sample's label and key id, in shard order, read without decoding."""

    labels: np.ndarray
    ids: np.ndarray


def scan_labels(spec: Any, key: str) -> LabelIndex:
    from framework.data.images import key_id, sample_label
    from framework.data.sources import iter_shard, resolve_shards

    labels, ids = [], []
    for shard in resolve_shards(spec, key):
        for sample_key, sample in iter_shard(shard):
            labels.append(sample_label(sample)), ids.append(key_id(sample_key))
    labels_array = np.asarray(labels, dtype=np.int64)
    if not len(labels_array):
        raise DataError(f"{key}={spec}: no samples")
    if (labels_array < 0).any():
        raise DataError(f"{key}={spec}: {int((labels_array < 0).sum())} of {len(labels_array)} samples have no label "
                        "(a cls member or an integer json 'label'): fine-tuning needs labelled shards")
    return LabelIndex(labels_array, np.asarray(ids, dtype=np.int64))


def write_subset(spec: Any, key: str, keep: np.ndarray, out: Path) -> str:
    """The samples of ``spec`` whose key id is in ``keep``, as shards in ``out`` (written once:
    an existing complete ``out`` is reused; concurrent writers each write a private copy and the
    first rename wins)."""
    from framework.data.images import key_id
    from framework.data.sources import iter_shard, resolve_shards
    from framework.data.writers.shard_writer import ShardWriter

    if (out / "manifest.json").exists():
        return str(out)
    wanted = set(keep.tolist())
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with ShardWriter(tmp, modality="labelled", max_samples=1000, manifest_extra={"subset_of": str(spec)}) as writer:
        for shard in resolve_shards(spec, key):
            for sample_key, sample in iter_shard(shard):
                if key_id(sample_key) in wanted:  # a row file's text comes decoded: written back as UTF-8
                    writer.write(sample_key, {ext: data.encode() if isinstance(data, str) else bytes(data)
                                              for ext, data in sample.items()})
    try:
        os.rename(tmp, out)
    except OSError:  # another rank's copy is in place
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _wait_for(path: Path, timeout: float = 3600.0) -> None:
    """Ranks other than 0 wait for rank 0's subset shards (before any process group exists)."""
    deadline = time.monotonic() + timeout
    while not (path / "manifest.json").exists():
        if time.monotonic() > deadline:
            raise DataError(f"timed out waiting for rank 0 to write {path}")
        time.sleep(0.5)


def check_decodes(spec: Any, key: str, modality: str, data: Any) -> None:
    """The first sample of ``spec`` must decode as the checkpoint's modality: one clear line
    instead of a run that skips every sample."""
    from framework.data.labelled import labelled_processor
    from framework.data.sources import iter_shard, resolve_shards
    from framework.errors import SampleError

    processor, _ = labelled_processor(modality, data, 0, False)
    shard = resolve_shards(spec, key)[0]
    for sample_key, sample in iter_shard(shard):
        try:
            processor(sample_key, sample, shard.url)
        except SampleError as exc:
            raise DataError(f"{key}={spec}: sample {sample_key} of {shard.url} does not decode as {modality} "
                            f"({exc}): the checkpoint is a {modality} model (are these shards of another modality?)") from None
        return


def run_config(pretrained: Any, checkpoint: Path, train: str, val: str, num_classes: int, samples: int, seed: int,
               from_scratch: bool, run_dir: Path, overrides: List[str]) -> Any:
    """The fit config of one fine-tuning run: the pretrained model and data facts, the recipe's
    defaults, then ``overrides`` (validated like fit's)."""
    from framework.config.load import compose_config, config_to_dict
    from framework.objectives.finetune import adopt_pretrained

    base = config_to_dict(pretrained)
    data = {**base["data"], "train": train, "val": val, "mode": "epoch", "remainder": "pad"}
    config = {
        "objective": {"name": "finetune", "checkpoint": str(checkpoint), "num_classes": num_classes,
                      "from_scratch": from_scratch},
        "model": base["model"], "data": data, **FINETUNE_DEFAULTS,
        "run": {"dir": str(run_dir), "seed": seed, "resume": "auto", "init_from": None},
    }
    cfg = adopt_pretrained(compose_config(config, overrides, "the pretrained run's config and the fine-tuning defaults"),
                           pretrained)
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    wanted = cfg.data.batch_size if any(o.startswith("data.batch_size=") for o in overrides) else BATCH_SIZE
    cfg.data.batch_size = max(1, min(wanted, samples // world))  # a 1% subset may hold fewer samples than a batch
    cfg.data.val_batch_size = cfg.data.val_batch_size or max(cfg.data.batch_size, BATCH_SIZE)
    return cfg


LAYOUT_KEYS = ("trainer.devices", "trainer.num_nodes", "trainer.strategy")  # a launcher may set these


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def finished(cfg: Any) -> bool:
    """Whether ``cfg.run.dir`` already holds this run, trained to the end (launched by this command
    earlier, or alone with ``pretrain launch``: then on any number of processes). A run directory
    of another configuration is refused rather than overwritten."""
    from framework.config.load import config_to_dict, load_config
    from framework.training.checkpoint import checkpoint_step, newest_checkpoint

    saved = Path(cfg.run.dir) / "config.yaml"
    if not saved.exists():
        return False
    theirs, ours = _flat(config_to_dict(load_config(str(saved), []))), _flat(config_to_dict(cfg))
    differ = [k for k in sorted(set(theirs) | set(ours)) if k not in LAYOUT_KEYS and theirs.get(k) != ours.get(k)]
    if differ:
        raise ConfigError(f"{cfg.run.dir} holds a run of another configuration ({differ[0]}: {theirs.get(differ[0])!r} "
                          f"there, {ours.get(differ[0])!r} now): remove it or choose another --output")
    newest = newest_checkpoint(Path(cfg.run.dir))
    return newest is not None and checkpoint_step(newest) >= cfg.trainer.max_steps


def test_predictions(run_dir: Path, test: Any, on_error: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted, true labels, key ids) on ``test`` with the run's best validation weights (its
    last checkpoint when it never validated)."""
    import torch

    from framework.data.labelled import labelled_processor
    from framework.data.loader import val_loader
    from framework.data.sources import resolve_shards
    from framework.objectives.finetune import Objective
    from framework.training.callbacks.best import BEST_CHECKPOINT
    from framework.training.checkpoint import newest_checkpoint
    from framework.training.consolidate import read_full_weights

    path = run_dir / BEST_CHECKPOINT
    if not path.exists():
        path = newest_checkpoint(run_dir)
    state, hparams = read_full_weights(path)
    model = Objective(hparams["config"])
    model.load_state_dict(state)
    model.eval()
    cfg = model.cfg
    cfg.data.on_error, cfg.data.num_workers = on_error, 0
    processor, collate = labelled_processor(model.encoder.modality, cfg.data, 0, False, getattr(cfg.model, "conv_layers", None),
                                            model.encoder.pad_id)
    loader = val_loader(resolve_shards(test, "data.test"), processor, cfg.data, seed=0, rank=0, world_size=1, collate_fn=collate)
    predicted, labels, ids = [], [], []
    with torch.no_grad():
        for batch in loader:
            predicted.append(model(batch).argmax(-1).numpy()), labels.append(batch["label"].numpy()), ids.append(batch["id"].numpy())
    return np.concatenate(predicted), np.concatenate(labels), np.concatenate(ids)


def finetune_rows(o: Any) -> Tuple[List[Dict[str, Any]], Dict[str, np.ndarray], np.ndarray, np.ndarray, str]:
    """Rows (mode, fraction, seed, labels, accuracy, val_accuracy, step), the predictions of the
    largest fraction's seed 0 by mode, the test labels and ids, and the test spec."""
    import json

    from lightning.pytorch.utilities import rank_zero_only

    from framework.evaluate.backbone import read_run_config, resolve_checkpoint
    from framework.evaluate.downstream.encoders import modality_of
    from framework.evaluate.downstream.report import selection_part
    from framework.evaluate.downstream.subsets import balanced_subset
    from framework.training.fit import fit

    checkpoint = resolve_checkpoint(o.checkpoint, key="--checkpoint")
    pretrained = read_run_config(checkpoint, key="--checkpoint")
    modality = modality_of(pretrained.objective.name)
    check_decodes(o.train, "data.train", modality, pretrained.data)
    out, leader = Path(o.output), rank_zero_only.rank == 0
    train = scan_labels(o.train, "data.train")
    held = np.zeros(len(train.ids), dtype=bool) if o.test else selection_part(train.ids)
    pool_labels, pool_ids = train.labels[~held], train.ids[~held]
    # the head covers every class of training and selection, never read from the test set (a
    # test-only class is simply never predicted)
    selection_max = scan_labels(o.val, "data.val").labels.max() if o.test else train.labels.max()
    num_classes = int(max(train.labels.max(), selection_max)) + 1
    test_spec = o.test or o.val
    val_spec = o.val if o.test else str(out / "subsets" / "selection")
    if not o.test:
        (write_subset(o.train, "data.train", train.ids[held], Path(val_spec)) if leader else _wait_for(Path(val_spec)))
    rows, kept, truth = [], {}, None
    variants = [("finetune", False)] + ([("scratch", True)] if o.from_scratch else [])
    for fraction in o.fractions:
        for seed in range(o.seeds):
            subset = balanced_subset(pool_labels, fraction, seed)
            spec = o.train
            if len(subset) < len(train.ids):
                spec = str(out / "subsets" / f"{fraction:g}-seed{seed}")
                write_subset(o.train, "data.train", pool_ids[subset], Path(spec)) if leader else _wait_for(Path(spec))
            for mode, scratch in variants:
                run_dir = out / "runs" / f"{mode}-{fraction:g}-seed{seed}"
                cfg = run_config(pretrained, checkpoint, spec, val_spec, num_classes, len(subset), seed, scratch, run_dir,
                                 o.overrides)
                if not finished(cfg):
                    fit(cfg)
                if not leader:
                    continue
                predicted, labels, ids = test_predictions(run_dir, test_spec, o.on_error)
                truth = (labels, ids)
                best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").exists() else {}
                rows.append({"mode": mode, "fraction": fraction, "seed": seed, "labels": int(len(subset)),
                             "accuracy": float(np.mean(predicted == labels)), "val_accuracy": best.get("val/accuracy"),
                             "best_step": best.get("step"), "run": str(run_dir)})
                if fraction == max(o.fractions) and seed == 0:
                    kept[mode] = predicted
    if truth is None:
        return rows, kept, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), test_spec
    return rows, kept, truth[0], truth[1], test_spec


def check_overrides(overrides: List[str]) -> None:
    """Keys that would break the comparison: the run's identity is the command's to set."""
    for item in overrides:
        key = item.partition("=")[0]
        if key.startswith(("run.", "objective.name", "objective.checkpoint", "objective.num_classes", "objective.from_scratch",
                           "model.")):
            raise ConfigError(f"command line: {key} is set by `pretrain eval finetune` itself "
                              "(run.* by its --output, the network by the checkpoint)")
