"""Per-subgroup results: accuracy and macro-F1 per value of a metadata field (fairlearn's
MetricFrame), with counts, bootstrap confidence intervals, the worst group, each group's gap to
the overall figure and the groups below a threshold; confusion matrices as images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def _interval(y_true: np.ndarray, y_pred: np.ndarray, metric, rounds: int, rng: np.random.Generator) -> list:
    """The 2.5 and 97.5 percentiles of ``metric`` over ``rounds`` bootstrap resamples."""
    n = len(y_true)
    draws = [metric(y_true[idx], y_pred[idx]) for idx in (rng.integers(0, n, n) for _ in range(rounds))]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def subgroup_report(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, threshold: Optional[float] = None,
                    bootstrap: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """{"overall": {...}, "groups": {name: {count, accuracy, accuracy_ci, macro_f1, macro_f1_ci,
    gap}}, "worst_group", "below_threshold"}; ``threshold`` defaults to overall accuracy - 0.05."""
    from fairlearn.metrics import MetricFrame

    frame = MetricFrame(metrics={"accuracy": _accuracy, "macro_f1": _macro_f1}, y_true=y_true, y_pred=y_pred,
                        sensitive_features=groups)
    rng = np.random.default_rng(seed)
    overall = {"count": int(len(y_true)), **{k: float(v) for k, v in frame.overall.items()}}
    overall["accuracy_ci"] = _interval(y_true, y_pred, _accuracy, bootstrap, rng)
    report: Dict[str, Any] = {"overall": overall, "groups": {}}
    for name, row in frame.by_group.iterrows():
        member = groups == name
        report["groups"][str(name)] = {
            "count": int(member.sum()), "accuracy": float(row["accuracy"]), "macro_f1": float(row["macro_f1"]),
            "accuracy_ci": _interval(y_true[member], y_pred[member], _accuracy, bootstrap, rng),
            "macro_f1_ci": _interval(y_true[member], y_pred[member], _macro_f1, bootstrap, rng),
            "gap": float(row["accuracy"]) - overall["accuracy"],
        }
    worst = min(report["groups"], key=lambda g: (report["groups"][g]["accuracy"], g))
    limit = overall["accuracy"] - 0.05 if threshold is None else threshold
    report.update(worst_group=worst, threshold=limit,
                  below_threshold=sorted(g for g, r in report["groups"].items() if r["accuracy"] < limit))
    return report


def confusion_png(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(labels), 0.6 + 0.45 * len(labels)))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_subgroup_report(report: Dict[str, Any], y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                          group_key: str, what: str, out: Path) -> None:
    """subgroups.json, report.md and confusion_overall.png / confusion_worst.png in ``out``."""
    labels = np.unique(y_true)
    worst = report["worst_group"]
    confusion_png(y_true, y_pred, labels, f"{what}: all", out / "confusion_overall.png")
    member = groups == worst
    confusion_png(y_true[member], y_pred[member], labels, f"{what}: {group_key}={worst}", out / "confusion_worst.png")
    (out / "subgroups.json").write_text(json.dumps({"group_key": group_key, "evaluated": what, **report}, indent=1))
    o = report["overall"]
    lines = [f"# Subgroups by `{group_key}`", "", f"{what}. 95% intervals: bootstrap over the group's samples.", "",
             "| group | samples | accuracy | 95% CI | macro-F1 | 95% CI | gap to overall |", "|---|--:|--:|--:|--:|--:|--:|",
             f"| **all** | {o['count']} | {o['accuracy']:.4f} | {o['accuracy_ci'][0]:.4f}-{o['accuracy_ci'][1]:.4f} | "
             f"{o['macro_f1']:.4f} |  |  |"]
    for name, r in sorted(report["groups"].items(), key=lambda item: item[1]["accuracy"]):
        mark = " (worst)" if name == worst else ""
        lines.append(f"| {name}{mark} | {r['count']} | {r['accuracy']:.4f} | {r['accuracy_ci'][0]:.4f}-{r['accuracy_ci'][1]:.4f} | "
                     f"{r['macro_f1']:.4f} | {r['macro_f1_ci'][0]:.4f}-{r['macro_f1_ci'][1]:.4f} | {r['gap']:+.4f} |")
    below = ", ".join(report["below_threshold"]) or "none"
    lines += ["", f"Worst group: **{worst}**, accuracy {report['groups'][worst]['accuracy']:.4f} "
              f"(95% CI {report['groups'][worst]['accuracy_ci'][0]:.4f}-{report['groups'][worst]['accuracy_ci'][1]:.4f}).",
              f"Below the threshold {report['threshold']:.4f}: {below}.", "",
              "![confusion matrix, all](confusion_overall.png) ![confusion matrix, worst group](confusion_worst.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
