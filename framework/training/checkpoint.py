"""Checkpoints: periodic, atomic, keep-last-N, exact resume, and consolidation to one file.

Layout: ``<run.dir>/checkpoints/step-XXXXXXXX.ckpt``, a file under ddp / a single device
(Lightning's format), a directory under fsdp and deepspeed in which every rank writes its own
shard (DCP files under fsdp, DeepSpeed's ZeRO files under deepspeed); a save never gathers the
model on one rank. Every checkpoint also carries:

* ``framework``: which strategy and world size wrote it (``framework.json`` in directories),
  so a resume under different ones stops with a clear message before training;
* each rank's own state in its own file ``rank-XXXXX.pt``, written by that rank: its RNG
  states (python, numpy, torch, cuda) and its data loaders' positions. Rank 0 gathers
  nothing. The files lie inside a checkpoint directory, and beside a checkpoint file in
  ``step-XXXXXXXX.ranks/``. Lightning's loop state keeps only the loaders' layout
  (``framework.data.loader``); exact resume reads a rank's own file, elastic resume the few
  that its share of the re-plan needs (``framework.data.elastic``).

Atomic: everything is written under ``.tmp-step-...`` and renamed into place by rank 0 after
every rank has finished, the rank files' directory before the checkpoint file (whose rename
is the commit), so a crash mid-save leaves the previous checkpoints as they were (stale
temporaries and rank directories without their checkpoint are removed at the next start).
Pruning to ``keep_last`` happens after the rename.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from framework.data.loader import LOCAL_KEY, SAVED_KEY, data_state_stubs
from framework.errors import ConfigError, DataError

CHECKPOINT_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"
INFO_FILE = "framework.json"
FORMAT_VERSION = 1
RANK_FILE = "rank-{:05d}.pt"
RANKS_SUFFIX = ".ranks"
_STEP = re.compile(r"^step-(\d+)\.ckpt$")


# --- names ------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def checkpoint_step(path: Path) -> int:
    match = _STEP.search(Path(path).name)
    if not match:
        raise ConfigError(f"cannot tell the step of checkpoint {path} (expected a name like step-00000100.ckpt)")
    return int(match.group(1))


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Committed checkpoints (files or directories), oldest first; temporaries are not listed."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [p for p in folder.glob("step-*.ckpt") if _STEP.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rank_state_dir(checkpoint: Path) -> Path:
    """Where each rank's own state file is: inside a checkpoint directory, beside a file."""
    checkpoint = Path(checkpoint)
    return checkpoint if checkpoint.is_dir() else checkpoint.with_suffix(RANKS_SUFFIX)


class RankStateFiles:
    """The data-loader states of a checkpoint's ranks, each read from its file on demand
    (``framework.data.elastic.SavedLoaderStates``); ``files_read`` lists what was opened."""

    def __init__(self, directory: Path, world_size: int, num_workers: int, index: int) -> None:
        self.directory, self.world_size, self.num_workers, self.index = Path(directory), world_size, num_workers, index
        self.files_read: List[int] = []

    def loader_state(self, rank: int) -> Dict[str, Any]:
        from framework.training.trusted import load_trusted

        path = self.directory / RANK_FILE.format(rank)
        if not path.is_file():
            raise DataError(
                f"cannot resume the data position: {path} (rank {rank}'s data state) is missing; a checkpoint file "
                f"needs its {self.directory.name}/ directory beside it"
            )
        self.files_read.append(rank)
        data = load_trusted(path).get("data") or []
        if self.index >= len(data) or data[self.index] is None:
            raise DataError(f"cannot resume the data position: {path} holds no state for data loader {self.index}")
        return data[self.index]


def remove_stale_temporaries(run_dir: Path) -> List[Path]:
    """Leftovers of saves that crashed before their rename; call on rank 0 before training."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    stale = sorted(folder.glob(f"{TMP_PREFIX}*")) if folder.is_dir() else []
    stale += [p for p in (sorted(folder.glob(f"step-*{RANKS_SUFFIX}")) if folder.is_dir() else [])
              if not p.with_suffix(".ckpt").exists()]
    for path in stale:
        _remove(path)
    return stale


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Move a finished temporary into place (rename is atomic within one file system)."""
    if final.exists():  # the same step saved again: keep the old one until the new one is in place
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        _remove(old)
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def prune(run_dir: Path, keep_last: int) -> List[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last < 1`` keeps all)."""
    if keep_last < 1:
        return []
    old = list_checkpoints(run_dir)[:-keep_last]
    for path in old:
        if not path.is_dir():
            _remove(rank_state_dir(path))
        _remove(path)
    return old


# --- what wrote a checkpoint --------------------------------------------------------------------


def read_info(path: Path) -> Dict[str, Any]:
    """``{"strategy", "world_size", "deepspeed_stage", "step", ...}``; ``{}`` for checkpoints
    written before this was recorded."""
    path = Path(path)
    if path.is_dir():
        info = path / INFO_FILE
        return json.loads(info.read_text()) if info.is_file() else {}
    from framework.training.trusted import load_trusted

    checkpoint = load_trusted(path, mmap=True)
    return dict(checkpoint.get("framework", {}))


# ddp and a single device store the same full replica: one family.
_FAMILY = {"ddp": "replicated", "single": "replicated", "fsdp": "fsdp", "deepspeed": "deepspeed"}


def check_resume(path: Path, info_now: Dict[str, Any]) -> None:
    """Whether this run can restore the checkpoint's full state (model, optimizer, loops).

    * same strategy family: the layout of model and optimizer state matches;
    * another world size: fine for replicas (ddp / one device) and for fsdp (DCP reshards on
      load); not for DeepSpeed, whose optimizer partitions are fixed per rank. The data
      position is re-planned over the new ranks by the data loader; RNG streams restart.
    Otherwise one ConfigError that says why and how to continue (consolidate + init_from)."""
    info = read_info(path)
    if not info:
        if path.is_dir():
            raise ConfigError(f"run.resume: {path} has no {INFO_FILE}; it was not written by this framework's checkpointing")
        return  # an older single-file (ddp) checkpoint: Lightning restores it as before
    old, new = info.get("strategy"), info_now.get("strategy")
    differences = []
    if _FAMILY.get(old, old) != _FAMILY.get(new, new):
        differences.append(f"strategy {old} -> {new}")
    if old == "deepspeed" == new:
        differences += [
            f"{key} {info.get(key)} -> {info_now.get(key)}"
            for key in ("deepspeed_stage", "world_size")
            if info.get(key) != info_now.get(key)
        ]
    if differences:
        raise ConfigError(
            f"cannot resume {path.name}: it was written with strategy={old} on {info.get('world_size')} ranks"
            + (f" (ZeRO stage {info['deepspeed_stage']})" if info.get("deepspeed_stage") else "")
            + f", this run differs ({'; '.join(differences)}): the optimizer state is laid out per strategy"
            + (" and, under DeepSpeed, partitioned per rank" if "deepspeed" in (old, new) else "")
            + ". To continue with the new setup from these weights (fresh optimizer state): "
            f"pretrain consolidate {path} weights.safetensors, then start a new run with run.init_from=weights.safetensors"
        )


# --- RNG states (kept free of numpy so checkpoints load with weights_only=True) -----------------


def collect_rng_states() -> Dict[str, Any]:
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    import random

    random.setstate(_tuples(states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuples(value: Any) -> Any:
    # random.setstate needs tuples; a round trip through some loaders turns them into lists.
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- the callback -------------------------------------------------------------------------------


class Checkpointing(Callback):
    """Saves every ``every_n_steps`` optimizer steps and at the end of training (all ranks take
    part), keeps the newest ``keep_last``, and restores per-rank state on resume.

    ``info`` (strategy, world size, ZeRO stage) is recorded in each checkpoint; ``sharded``
    says whether the strategy writes a directory of per-rank shards. ``before_commit`` runs on
    every rank once the shards are written and before a mid-training checkpoint becomes
    visible (it writes the step's metrics row: what a resume from this checkpoint will not redo)."""

    def __init__(
        self,
        run_dir: Path,
        every_n_steps: int,
        keep_last: int,
        info: Dict[str, Any],
        sharded: bool,
        before_commit: Optional[Callable[[Trainer], None]] = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.dirpath = self.run_dir / CHECKPOINT_DIR
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.info = dict(info)
        self.sharded = sharded
        self.before_commit = before_commit
        self.last_saved_step: Optional[int] = None
        self._rank_state: Optional[Dict[str, Any]] = None
        self._rng_to_restore: Optional[Dict[str, Any]] = None
        self._rng_outside_validation: Optional[Dict[str, Any]] = None

    # -- saving ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self.last_saved_step:
            return
        self.save(trainer, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The end state is always resumable (a longer run continues from it).
        if trainer.global_step > 0 and trainer.global_step != self.last_saved_step:
            self.save(trainer, trainer.global_step, mid_training=False)

    def save(self, trainer: Trainer, step: int, mid_training: bool = True) -> Path:
        """Write ``step-XXXXXXXX.ckpt`` atomically; every rank must call this (from
        ``on_train_batch_end`` unless ``mid_training`` is False)."""
        strategy = trainer.strategy
        final = self.dirpath / checkpoint_name(step)
        tmp = self.dirpath / f"{TMP_PREFIX}{final.name}"
        ranks = tmp if self.sharded else tmp.with_suffix(RANKS_SUFFIX)
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
            _remove(ranks)
            if not self.sharded:
                ranks.mkdir()
        strategy.barrier("checkpoint-start")
        # the full state (weights_only here means "save only the weights", not how it is loaded)
        trainer.save_checkpoint(tmp, weights_only=False)  # strategy-specific: one file, DCP shards or ZeRO shards
        assert self._rank_state is not None
        torch.save(self._rank_state, ranks / RANK_FILE.format(trainer.global_rank))  # this rank's own, by this rank
        if self.sharded and trainer.is_global_zero:
            (tmp / INFO_FILE).write_text(json.dumps({**self.info, "step": step}, indent=1))
        self._rank_state = None
        if mid_training and self.before_commit is not None:
            self.before_commit(trainer)
        strategy.barrier("checkpoint-written")  # every shard is on disk before the rename
        if trainer.is_global_zero:
            if not self.sharded:
                commit(ranks, rank_state_dir(final))  # before the file: its rename is the commit
            commit(tmp, final)
            prune(self.run_dir, self.keep_last)
        strategy.barrier("checkpoint-committed")
        self.last_saved_step = step
        return final

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        checkpoint["framework"] = {**self.info, "step": trainer.global_step, "format": FORMAT_VERSION}
        # This rank's own state, written by this rank into its own file (see save); the data
        # loaders' positions leave Lightning's loop state for it.
        data = [stub.pop(LOCAL_KEY, None) for stub in data_state_stubs(checkpoint.get("loops", {}))]
        self._rank_state = {"rng": collect_rng_states(), "data": data}

    # -- resuming --------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        self.last_saved_step = checkpoint.get("global_step")
        directory = rank_state_dir(Path(trainer.ckpt_path)) if trainer.ckpt_path else None
        if directory is not None:
            # The loaders read their positions from the rank files (their own, or on another
            # world size the ones the re-plan needs); a missing file is named when it is needed.
            for index, stub in enumerate(data_state_stubs(checkpoint.get("loops", {}))):
                stub[SAVED_KEY] = RankStateFiles(directory, stub["world_size"], stub["num_workers"], index)
        saved_world = checkpoint.get("framework", {}).get("world_size", world)
        if saved_world != world:
            rank_zero_warn(f"resuming {saved_world} ranks' checkpoint on {world}: random streams restart from run.seed")
            return
        state: Optional[Dict[str, Any]] = None
        states = checkpoint.get("rank_states")  # checkpoint files written before the rank files
        file = directory / RANK_FILE.format(rank) if directory is not None else None
        if file is not None and file.is_file():
            from framework.training.trusted import load_trusted

            state = load_trusted(file)
        elif states is not None:
            state = states[rank] if rank < len(states) else None
        if state is None:
            rank_zero_warn("the checkpoint has no per-rank RNG states: random streams restart from run.seed")
            return
        self._rng_to_restore = state.get("rng")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Restored here, not at load time: creating the loader iterators draws from the RNGs,
        # which the original run had done before it saved.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # Validation must not move the training random streams, or a run that resumes after a
    # validation (or validates at different steps) could not reproduce the original.
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._rng_outside_validation = collect_rng_states()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng_outside_validation is not None:
            set_rng_states(self._rng_outside_validation)
            self._rng_outside_validation = None

    def state_dict(self) -> Dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.last_saved_step = state_dict.get("last_saved_step", self.last_saved_step)
