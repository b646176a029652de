"""``pretrain eval linear|knn|finetune``: label fractions x seeds x modes; the frozen modes on a
checkpoint's cached features, fine-tuning through ``fit`` (``finetune.py``).

Splits: label subsets are drawn from ``data.train``; the linear probe's grid is chosen on
``data.val``; the figures are on ``data.test``. Without ``data.test``, ``data.val`` is the test
set and the grid is chosen on a fixed fifth of ``data.train`` (by key hash) that no label subset
draws from: in no case does selection see a test label.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from framework.errors import ConfigError
from framework.evaluate.downstream.features import Split, embed_split, read_groups
from framework.evaluate.downstream.modes import LinearGrid, knn_mode, linear_mode
from framework.evaluate.downstream.subgroups import subgroup_report, write_subgroup_report
from framework.evaluate.downstream.subsets import balanced_subset

MODES = ("linear", "knn", "finetune")


@dataclass
class DownstreamOptions:
    checkpoint: str
    train: str
    val: str
    test: Optional[str] = None
    modes: List[str] = field(default_factory=lambda: ["linear"])
    fractions: List[float] = field(default_factory=lambda: [1.0])
    seeds: int = 1
    output: str = "downstream"
    group_key: Optional[str] = None
    group_threshold: Optional[float] = None
    k: int = 20
    temperature: float = 0.07
    grid: LinearGrid = field(default_factory=LinearGrid)
    batch_size: int = 256
    on_error: str = "skip"
    seq_len: Optional[int] = None  # text: tokens per document (default: the pretraining's data.seq_len)
    from_scratch: bool = False  # finetune: also the same network from random weights
    overrides: List[str] = field(default_factory=list)  # finetune: fit's key=value options


def selection_part(ids: np.ndarray) -> np.ndarray:
    return (ids % 5) == 0  # a fixed fifth by key hash: the same for any fraction, seed or mode


def run_downstream(o: DownstreamOptions) -> Dict[str, Any]:
    for mode in o.modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    out = Path(o.output)
    out.mkdir(parents=True, exist_ok=True)
    test_key = "data.test" if o.test else "data.val"
    if o.group_key:  # a group key no sample has: said before any work
        read_groups(o.test or o.val, test_key, o.group_key, np.empty(0, dtype=np.int64))
    if o.modes == ["finetune"]:
        from framework.evaluate.downstream.finetune import finetune_rows

        rows, kept, test_labels, test_ids, test_spec = finetune_rows(o)
        if not rows:  # a rank other than 0: rank 0 reports
            return {}
    else:
        rows, kept, test_labels, test_ids, test_spec = _frozen_rows(o, out)
    groups = read_groups(test_spec, test_key, o.group_key, test_ids) if o.group_key else None
    summary = _summarise(rows)
    results = {"checkpoint": str(o.checkpoint), "train": o.train, "val": o.val, "test": test_spec,
               "test_samples": int(len(test_labels)), "rows": rows, "summary": summary}
    _write_tables(results, out)
    if groups is not None:
        results["subgroups"] = {}
        for mode, predicted in kept.items():
            report = subgroup_report(test_labels, predicted, groups, o.group_threshold)
            where = out / "subgroups" / mode
            where.mkdir(parents=True, exist_ok=True)
            write_subgroup_report(report, test_labels, predicted, groups, o.group_key,
                                  f"{mode}, {max(o.fractions):.0%} of the labels, seed 0", where)
            results["subgroups"][mode] = {"worst_group": report["worst_group"], "report": str(where / "report.md"),
                                          **{k: report["groups"][report["worst_group"]][k] for k in ("accuracy", "accuracy_ci")}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _frozen_rows(o: DownstreamOptions, out: Path) -> tuple:
    """linear / knn on cached features: (rows, predictions kept for the subgroup report, test
    labels, test ids, test spec)."""
    cache = out / "features"
    train = embed_split(o.checkpoint, o.train, "data.train", cache, o.batch_size, o.on_error, o.seq_len)
    val = embed_split(o.checkpoint, o.val, "data.val", cache, o.batch_size, o.on_error, o.seq_len)
    if o.test:
        test, test_spec = embed_split(o.checkpoint, o.test, "data.test", cache, o.batch_size, o.on_error, o.seq_len), o.test
        pool, select = train, val
    else:
        held = selection_part(train.ids)
        pool = Split(train.features[~held], train.labels[~held], train.ids[~held])
        select = Split(train.features[held], train.labels[held], train.ids[held])
        test, test_spec = val, o.val
    rows: List[Dict[str, Any]] = []
    kept: Dict[str, np.ndarray] = {}
    for fraction in o.fractions:
        for seed in range(o.seeds):
            subset = balanced_subset(pool.labels, fraction, seed)
            labelled = (pool.features[subset], pool.labels[subset])
            for mode in o.modes:
                if mode == "linear":
                    predicted, chosen = linear_mode(labelled, (select.features, select.labels), test.features, o.grid, seed)
                else:
                    predicted, chosen = knn_mode(labelled, test.features, o.k, o.temperature), {"k": o.k, "temperature": o.temperature}
                accuracy = float(np.mean(predicted == test.labels))
                rows.append({"mode": mode, "fraction": fraction, "seed": seed, "labels": int(len(subset)),
                             "accuracy": accuracy, **{k: v for k, v in chosen.items() if k != "grid"}})
                if fraction == max(o.fractions) and seed == 0:
                    kept[mode] = predicted
    return rows, kept, test.labels, test.ids, test_spec


def _summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    summary = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for fraction in dict.fromkeys(r["fraction"] for r in rows):
            scores = [r["accuracy"] for r in rows if r["mode"] == mode and r["fraction"] == fraction]
            summary.append({"mode": mode, "fraction": fraction, "mean": float(np.mean(scores)),
                            "std": float(np.std(scores)), "seeds": len(scores)})
    return summary


def _write_tables(results: Dict[str, Any], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["mode", "fraction", "seed", "labels", "accuracy", "lr", "weight_decay",
                                                    "k", "temperature", "val_accuracy", "best_step"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in dict.fromkeys(s["mode"] for s in results["summary"]):
        points = [s for s in results["summary"] if s["mode"] == mode]
        ax.errorbar([p["fraction"] for p in points], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                    marker="o", capsize=3, label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training labels")
    ax.set_ylabel("test accuracy")
    ax.set_title("label efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "label_efficiency.png", dpi=100)
    plt.close(fig)


def format_table(results: Dict[str, Any]) -> str:
    fractions = list(dict.fromkeys(s["fraction"] for s in results["summary"]))
    lines = ["| mode | " + " | ".join(f"{f:.0%} of labels" for f in fractions) + " |", "|---|" + "--:|" * len(fractions)]
    for mode in dict.fromkeys(s["mode"] for s in results["summary"]):
        cells = {s["fraction"]: s for s in results["summary"] if s["mode"] == mode}
        lines.append(f"| {mode} | " + " | ".join(f"{cells[f]['mean']:.4f} ± {cells[f]['std']:.4f}" for f in fractions) + " |")
    return "\n".join(lines)
