"""The launcher's view of the world against the config's: a mismatch is an error at start, not a hang.

torchrun sets ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``; ``srun`` sets ``SLURM_NTASKS`` /
``SLURM_NTASKS_PER_NODE``. Lightning takes the ranks from them but builds its process group
for ``trainer.devices x trainer.num_nodes`` ranks, so a difference would wait forever for
ranks that never come (or start ranks nobody waits for)."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from framework.config.schema import RunConfig
from framework.errors import ConfigError


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    value = env.get(key, "")
    head = value.split("(")[0].split(",")[0]  # SLURM_NTASKS_PER_NODE may read "2(x4)"
    return int(head) if head.strip().isdigit() else None


def check_launch_environment(cfg: RunConfig, env: Optional[Mapping[str, str]] = None) -> None:
    env = os.environ if env is None else env
    t = cfg.trainer
    expected = t.devices * t.num_nodes
    world = _int(env, "WORLD_SIZE")
    if world is not None:
        if world != expected:
            raise ConfigError(
                f"the launcher started {world} processes (WORLD_SIZE={world}) but the config asks for "
                f"trainer.devices x trainer.num_nodes = {t.devices} x {t.num_nodes} = {expected}; "
                f"pass trainer.devices=<processes per node> trainer.num_nodes=<nodes> (pretrain launch torchrun sets both)"
            )
        local = _int(env, "LOCAL_WORLD_SIZE")
        if local is not None and local != t.devices:
            raise ConfigError(
                f"torchrun started {local} processes on this node (--nproc-per-node) but trainer.devices={t.devices}"
            )
        return
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        tasks = _int(env, "SLURM_NTASKS")
        if tasks is not None and tasks != expected:
            raise ConfigError(
                f"srun started {tasks} tasks (SLURM_NTASKS) but the config asks for trainer.devices x "
                f"trainer.num_nodes = {t.devices} x {t.num_nodes} = {expected}; use --ntasks-per-node=trainer.devices "
                f"and --nodes=trainer.num_nodes (pretrain launch slurm sets both)"
            )
