"""Preemption: checkpoint at the next safe point, requeue under Slurm, stop cleanly.

On the preemption signal (``SIGUSR1``, which the sbatch script asks Slurm to send to the job
steps ahead of the time limit, or ``scancel --signal=USR1``) or on ``SIGTERM``, the handler
only sets a flag: nothing is saved inside a signal handler. After each optimizer step
(``on_train_batch_end`` once the step counter moved, so never in the middle of gradient
accumulation) every rank contributes its flag to an ``all_reduce(MAX)``: the ranks agree on
the same step even if the signal reached them at different times. Then every rank takes part
in a full checkpoint (``checkpoints/step-XXXXXXXX.ckpt`` through the Checkpointing callback,
the name ``run.resume=auto`` picks up), rank 0 requeues the job (``scontrol requeue``) when
the signal was USR1, it runs under Slurm and the run has steps left, and the trainer stops.
SIGTERM checkpoints and stops without a requeue: it is what ``scancel`` sends, and Slurm's
own preemption (PreemptMode=REQUEUE) requeues by itself after it.

Lightning's own Slurm auto-requeue (``SLURMEnvironment(auto_requeue=True)``, which saves an
``hpc_ckpt_N.ckpt`` inside the signal handler) is switched off, and its SIGTERM handler is
replaced while training runs, so only this callback acts on those signals.

A crash loop is bounded: each requeue is appended to ``<run.dir>/requeues.jsonl``; once
``max_requeues`` (env ``PRETRAIN_MAX_REQUEUES``, written by ``pretrain launch slurm``) are
recorded, the run checkpoints and stops without requeueing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger("framework")

REQUEUE_FILE = "requeues.jsonl"
PREEMPTION_FILE = "preemptions.jsonl"
MAX_REQUEUES_ENV = "PRETRAIN_MAX_REQUEUES"
DEFAULT_MAX_REQUEUES = 10
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def slurm_job_id() -> Optional[str]:
    """The id ``scontrol requeue`` needs (``ARRAYJOB_TASK`` for array tasks), or None outside Slurm."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_count(run_dir: Path) -> int:
    path = Path(run_dir) / REQUEUE_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def disable_lightning_auto_requeue(trainer: Trainer) -> None:
    """Turn off Lightning's SLURM auto-requeue (``_SignalConnector``) so it never acts next to ours."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False


class Preemption(Callback):
    def __init__(self, run_dir: Path, max_requeues: Optional[int] = None) -> None:
        self.run_dir = Path(run_dir)
        if max_requeues is None:
            max_requeues = int(os.environ.get(MAX_REQUEUES_ENV, DEFAULT_MAX_REQUEUES))
        self.max_requeues = max_requeues
        self.received: Optional[int] = None  # the signal number, set by the handler
        self.stopped_at: Optional[int] = None
        self.requeued = False
        self.wants_requeue = False
        self._last_step: Optional[int] = None
        # USR1 would end the process by default: a preemption notice that arrives while the run
        # is still starting (model built, trainer not yet fitting) is kept for the first step.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._handler)

    # -- the handler: a flag and nothing else -------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None or signum == signal.SIGUSR1:
            self.received = signum

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        disable_lightning_auto_requeue(trainer)  # before Trainer._run registers its handlers

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registered its handlers just before the fit loop started; ours replace them
        # for the time training runs (Lightning restores the originals at teardown).
        self._last_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._handler)

    # -- the safe point -----------------------------------------------------------------------
    def _agreed(self, trainer: Trainer) -> int:
        """0: go on; 1: SIGTERM somewhere (stop); 2: the preemption signal somewhere (stop, requeue)."""
        flag = {None: 0, signal.SIGTERM: 1, signal.SIGUSR1: 2}.get(self.received, 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            tensor = torch.tensor([flag], dtype=torch.int32, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = int(tensor.item())
        return flag

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # mid-accumulation: not a step boundary
            return
        self._last_step = step
        agreed = self._agreed(trainer)
        if not agreed:
            return
        self.stopped_at = step
        started = time.time()
        checkpointing = _checkpointing(trainer)
        if checkpointing is not None and checkpointing.last_saved_step != step:
            path = checkpointing.save(trainer, step)
        else:
            path = None if checkpointing is None else checkpointing.dirpath / f"step-{step:08d}.ckpt"
        finished = step >= trainer.max_steps > 0
        if trainer.is_global_zero:
            name = {1: "SIGTERM", 2: "SIGUSR1"}[agreed]
            self._record(PREEMPTION_FILE, {"signal": name, "step": step, "checkpoint": str(path), "save_seconds": round(time.time() - started, 3)})
            log.warning(f"{name}: saved {path.name if path else 'no checkpoint'} at step {step}; stopping")
            # Only the preemption signal requeues. SIGTERM comes from `scancel` (the user wants
            # the job gone), from the time limit without --signal, or from Slurm's own
            # preemption with PreemptMode=REQUEUE, which requeues by itself.
            self.wants_requeue = agreed == 2 and not finished
        trainer.should_stop = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Requeue as late as possible: `scontrol requeue` ends the running job at once (SIGTERM,
        # then SIGKILL after KillWait), so the loggers are finished first. Every rank's part of
        # the checkpoint is on disk already. Lightning restored the handlers it found at the
        # start by now; ours go back in so that the SIGTERM of the requeue does not cut the exit short.
        if not (self.wants_requeue and trainer.is_global_zero):
            return
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._handler)
        for logger in trainer.loggers:
            logger.finalize("success")
            experiment = getattr(logger, "_experiment", None)
            if experiment is not None and hasattr(experiment, "finish"):
                experiment.finish()  # W&B: flush the run files before the job is ended
        self._requeue()

    def _requeue(self) -> None:
        job = slurm_job_id()
        if job is None:
            return  # torchrun or a plain process: whoever started it decides (run.resume=auto resumes)
        done = requeue_count(self.run_dir)
        if done >= self.max_requeues:
            log.warning(f"not requeueing job {job}: it was requeued {done} times already (max {self.max_requeues})")
            return
        if not re.fullmatch(r"[0-9_]+", job):
            log.warning(f"not requeueing: unexpected SLURM job id {job!r}")
            return
        self._record(REQUEUE_FILE, {"job": job, "step": self.stopped_at, "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")})
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            self.requeued = True
            log.warning(f"requeued Slurm job {job}")
        else:
            log.warning(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")

    def _record(self, name: str, row: Dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps({"time": time.time(), **row}) + "\n")


def _checkpointing(trainer: Trainer):
    from framework.training.checkpoint import Checkpointing

    found: List[Checkpointing] = [c for c in trainer.callbacks if isinstance(c, Checkpointing)]
    return found[0] if found else None
