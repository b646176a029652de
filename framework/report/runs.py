"""A run directory as the report reads it: its config, metric rows, preemptions, requeues and
checkpoints, from the files the run wrote (no W&B server, no checkpoint unpickled)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from framework.errors import ConfigError


@dataclass
class RunData:
    directory: Path
    config: Dict[str, Any]
    rows: List[Dict[str, Any]]
    skipped_lines: List[int] = field(default_factory=list)  # metrics.jsonl lines that are not JSON (a crash's cut line)
    preemptions: List[Dict[str, Any]] = field(default_factory=list)
    requeues: List[Dict[str, Any]] = field(default_factory=list)
    checkpoints: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def objective(self) -> str:
        return str(self.config.get("objective", {}).get("name", "?"))

    def series(self, metric: str) -> tuple[List[int], List[float]]:
        """(steps, values) of a metric, in step order; the last value of a step counts."""
        points: Dict[int, float] = {}
        for row in self.rows:
            value = row.get(metric)
            if isinstance(value, (int, float)) and "step" in row and math.isfinite(float(value)):
                points[int(row["step"])] = float(value)
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    def metrics(self) -> List[str]:
        return sorted({key for row in self.rows for key in row if key != "step"})

    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.rows if "step" in r), default=0)


def _jsonl(path: Path) -> tuple[List[Dict[str, Any]], List[int]]:
    rows, bad = [], []
    if not path.is_file():
        return rows, bad
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


def read_run(directory: str | Path) -> RunData:
    """The run in ``directory``; ConfigError naming it if it is not a run directory."""
    import yaml

    directory = Path(directory)
    config_file, metrics_file = directory / "config.yaml", directory / "metrics.jsonl"
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such run directory")
    if not config_file.is_file() or not metrics_file.is_file():
        missing = [p.name for p in (config_file, metrics_file) if not p.is_file()]
        raise ConfigError(f"{directory} is not a run directory (no {' and no '.join(missing)}; `pretrain fit` writes both)")
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_file}: not readable YAML: {exc}") from None
    rows, bad = _jsonl(metrics_file)
    preemptions, _ = _jsonl(directory / "preemptions.jsonl")
    requeues, _ = _jsonl(directory / "requeues.jsonl")
    from framework.training.checkpoint import list_checkpoints

    return RunData(directory, config, rows, bad, preemptions, requeues, [p.name for p in list_checkpoints(directory)])


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a.b.c": value}`` of a nested config."""
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(runs: List[RunData]) -> Dict[str, List[Optional[Any]]]:
    """The config keys whose values differ between runs (run.dir aside), with each run's value."""
    flat = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if k != "run.dir" and len({json.dumps(f.get(k), default=str) for f in flat}) > 1}


def check_comparable(runs: List[RunData]) -> None:
    objectives = {run.objective for run in runs}
    if len(objectives) > 1:
        listed = ", ".join(f"{run.directory} ({run.objective})" for run in runs)
        raise ConfigError(f"runs of different objectives cannot share plots: {listed}; report them separately")
