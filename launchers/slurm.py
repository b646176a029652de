"""``pretrain launch slurm``: render ``slurm/sbatch.template`` into the run directory and submit it.

The config is validated first (with the layout the job will have), so a job whose config is
invalid fails at submission, not in the queue. Ranks start through ``srun`` (one task per
device), so Lightning's SLURMEnvironment sees them. The script asks for ``--requeue`` and a
``USR1`` signal to the job steps ``--signal-seconds`` before the time limit; the Preemption
callback in the run checkpoints, requeues (``scontrol requeue``) and stops; the requeued job
resumes from the newest checkpoint (``run.resume=auto``) with the same W&B run id.

``--sweep key=v1,v2`` (repeatable) makes a job array over the product of the values; task i
gets its overrides and its own run directory ``<run.dir>/<i>-<key>=<value>...``."""
from __future__ import annotations

import argparse
import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launchers.common import layout_overrides, validated_config, without_keys

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "sbatch.template"
SCRIPT_NAME = "job.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render(template: str, values: Dict[str, str]) -> str:
    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"sbatch template: no value for {{{{{match.group(1)}}}}}")
        return str(values[match.group(1)])

    kept = "".join(line for line in template.splitlines(keepends=True) if not line.startswith("#|"))
    return _PLACEHOLDER.sub(fill, kept)


def sweep_tasks(sweeps: Sequence[str]) -> List[List[str]]:
    """``["a=1,2", "b=x,y"]`` -> ``[["a=1","b=x"], ["a=1","b=y"], ...]`` (one list per array task)."""
    axes = []
    for sweep in sweeps:
        key, _, values = sweep.partition("=")
        if not key or not values:
            raise ValueError(f"--sweep wants key=v1,v2,...; got {sweep!r}")
        axes.append([f"{key.strip()}={v.strip()}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def task_dir(base: str, index: int, overrides: Sequence[str]) -> str:
    label = "-".join(re.sub(r"[^A-Za-z0-9_.=-]", "_", o) for o in overrides)
    return str(Path(base) / f"{index}-{label}")


def sbatch_script(
    *,
    config: str,
    tasks: Sequence[Sequence[str]],
    run_dir: Path,
    nodes: int,
    tasks_per_node: int,
    cpus_per_task: int,
    gpus_per_node: int = 0,
    mem: Optional[str] = None,
    partition: Optional[str] = None,
    account: Optional[str] = None,
    time: Optional[str] = None,
    signal_seconds: int = 120,
    max_requeues: int = 3,
    job_name: Optional[str] = None,
    workdir: Optional[Path] = None,
    python: str = sys.executable,
    srun_args: str = "",
    template: Optional[str] = None,
) -> str:
    """The sbatch script text. ``tasks``: the full ``fit`` overrides of each array task (one
    entry = a plain job)."""
    options = []
    if gpus_per_node:
        options.append(f"--gpus-per-node={gpus_per_node}")
    if mem:
        options.append(f"--mem={mem}")
    if partition:
        options.append(f"--partition={partition}")
    if account:
        options.append(f"--account={account}")
    if time:
        options.append(f"--time={time}")
    if len(tasks) > 1:
        options.append(f"--array=0-{len(tasks) - 1}")
    cases = "\n".join(f"    {i}) OVERRIDES=({shlex.join(list(t))}) ;;" for i, t in enumerate(tasks))
    values = {
        "job_name": job_name or f"pretrain-{run_dir.name}",
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task,
        "options": "".join(f"#SBATCH {o}\n" for o in options),
        "signal_seconds": signal_seconds,
        "log": str(run_dir / ("slurm-%A_%a.out" if len(tasks) > 1 else "slurm-%j.out")),
        "workdir": str(workdir or Path.cwd()),
        "max_requeues": max_requeues,
        "tasks": cases,
        "python": shlex.join(shlex.split(python)),  # a command prefix, e.g. "apptainer exec --nv img.sif python"
        "config": shlex.quote(config),
        "srun_args": (srun_args.strip() + " ") if srun_args.strip() else "",
    }
    return render(template if template is not None else TEMPLATE.read_text(), values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="experiment YAML")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node = ranks per node (0: CPU ranks)")
    parser.add_argument("--ntasks-per-node", type=int, default=None, help="CPU ranks per node when --gpus-per-node is 0 (default: trainer.devices)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (default: data.num_workers + 1)")
    parser.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    parser.add_argument("--account", default=None)
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--signal-seconds", type=int, default=120, help="USR1 this many seconds before the time limit")
    parser.add_argument("--max-requeues", type=int, default=3, help="requeues allowed (preemption, time limit) before the job gives up")
    parser.add_argument("--sweep", action="append", default=[], help="key=v1,v2,... : a job array over the values (repeatable: product)")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python on the compute nodes, or a command ending in one, e.g. "
                        "'apptainer exec --nv pretrain.sif /opt/pretrain/.venv/bin/python' (default: this Python)")
    parser.add_argument("--srun-args", default="", help="extra srun options, e.g. '--container-image=pretrain.sqsh'")
    parser.add_argument("--dry-run", action="store_true", help="write the script, do not submit it")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from framework.errors import ConfigError

    base_cfg = validated_config(args.config, args.overrides)
    nodes = args.nodes or base_cfg.trainer.num_nodes
    per_node = args.gpus_per_node or args.ntasks_per_node or base_cfg.trainer.devices
    if nodes < 1 or per_node < 1 or args.max_requeues < 0 or args.signal_seconds < 0:
        raise ConfigError("--nodes and ranks per node must be at least 1, --max-requeues and --signal-seconds at least 0")
    accelerator = "gpu" if args.gpus_per_node else "cpu"
    layout = layout_overrides(per_node, nodes, accelerator)
    user = without_keys(args.overrides, ("trainer.devices", "trainer.num_nodes", "trainer.accelerator", "run.dir"))
    try:
        sweeps = sweep_tasks(args.sweep)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    base_dir = Path(base_cfg.run.dir).resolve()
    tasks = []
    for index, extra in enumerate(sweeps):
        task = [*user, *extra, *layout]
        if len(sweeps) > 1:
            task.append(f"run.dir={task_dir(str(base_dir), index, extra)}")
        else:
            task.append(f"run.dir={base_dir}")
        validated_config(args.config, task)  # every task's config, as its ranks will load it
        tasks.append(task)
    cpus = args.cpus_per_task or base_cfg.data.num_workers + 1
    script = sbatch_script(
        config=str(Path(args.config).resolve()), tasks=tasks, run_dir=base_dir, nodes=nodes, tasks_per_node=per_node,
        cpus_per_task=cpus, gpus_per_node=args.gpus_per_node, mem=args.mem, partition=args.partition,
        account=args.account, time=args.time, signal_seconds=args.signal_seconds, max_requeues=args.max_requeues,
        job_name=args.job_name, python=args.python, srun_args=args.srun_args,
    )
    base_dir.mkdir(parents=True, exist_ok=True)
    path = base_dir / SCRIPT_NAME
    path.write_text(script)
    path.chmod(0o755)
    if args.dry_run:
        print(f"wrote {path} (not submitted: --dry-run)")
        return
    try:
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(f"sbatch not found: is this a Slurm login node? The script is in {path}") from None
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {result.stderr.strip() or result.stdout.strip()}")
    job = result.stdout.strip().split(";")[0]
    print(f"submitted job {job}: {path}; log {base_dir}/slurm-{job}.out" if len(tasks) == 1 else
          f"submitted array job {job} ({len(tasks)} tasks): {path}; logs {base_dir}/slurm-{job}_<task>.out")
