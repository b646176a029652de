"""``pretrain report``: one self-contained HTML page of one or several runs, for reading on a
cluster without a W&B server. Plots are matplotlib PNGs inlined as data URIs; no script, font
or style is fetched (the page works offline, and a test opens it in headless Chromium)."""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from framework.report.runs import RunData, check_comparable, config_differences, read_run

# (figure title, metric name prefixes or names); a figure appears when one of its metrics was logged
FIGURES = (
    ("Training loss and learning rate", ("train/",)),
    ("Validation", ("val/",)),
    ("Throughput", ("perf/samples_per_s", "perf/tokens_per_s")),
    ("MFU and data wait", ("perf/mfu", "perf/data_wait_frac")),
    ("Online probes and zero-shot", ("probe/", "zero_shot/", "retrieval/")),
    ("Representation health (RankMe, feature spread, teacher entropy)", ("health/",)),
    ("Skipped, repeated and filtered samples", ("data/skipped_samples", "data/skipped_shards", "data/repeated_samples",
                                                "data/filtered_samples")),
)


def _matching(runs: Sequence[RunData], patterns: Sequence[str]) -> List[str]:
    names = sorted({m for run in runs for m in run.metrics()})
    return [m for m in names if any(m == p or (p.endswith("/") and m.startswith(p)) for p in patterns)]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _events(axes, runs: Sequence[RunData]) -> None:
    """Preemptions (dashed) and requeues (dotted) on the step axis."""
    for run in runs:
        for event in run.preemptions:
            if "step" in event:
                axes.axvline(event["step"], color="tab:red", linestyle="--", linewidth=1, alpha=0.7)
        for event in run.requeues:
            if event.get("step") is not None:
                axes.axvline(event["step"], color="tab:purple", linestyle=":", linewidth=1, alpha=0.7)


def figure(title: str, runs: Sequence[RunData], metrics: Sequence[str]) -> Optional[str]:
    """One figure: a panel per metric, every run a line; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(run.series(m)[0] for run in runs)]
    if not metrics:
        return None
    columns = min(3, len(metrics))
    rows = (len(metrics) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.1 * rows), squeeze=False)
    for panel, metric in zip(axes.flat, metrics):
        for run in runs:
            steps, values = run.series(metric)
            if steps:
                panel.plot(steps, values, marker="." if len(steps) < 30 else None, label=run.name)
        _events(panel, runs)
        panel.set_title(metric, fontsize=10)
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
        values = [v for run in runs for v in run.series(metric)[1]]
        if metric.endswith(("loss", "ppl")) and min(values) > 0 and max(values) / min(values) > 10:
            panel.set_yscale("log")  # a loss falling over decades
        if len(runs) > 1:
            panel.legend(fontsize=8)
    for panel in list(axes.flat)[len(metrics):]:
        panel.axis("off")
    fig.tight_layout()
    encoded = _png(fig)
    plt.close(fig)
    return encoded


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def summary_rows(run: RunData) -> List[tuple[str, str]]:
    cfg = run.config
    trainer = cfg.get("trainer", {})
    steps, times = run.series("perf/step_time_s")
    trained = 0.0
    previous = 0
    for step, seconds in zip(steps, times):  # each value is the mean over the steps since the previous
        trained += seconds * (step - previous)
        previous = step
    rows = [
        ("objective / model", f"{run.objective} / {cfg.get('model', {}).get('name', '?')}"),
        ("steps done / planned", f"{run.last_step()} / {trainer.get('max_steps', '?')}"),
        ("training time (from perf/step_time_s)", _duration(trained) if trained else "not logged"),
        ("checkpoints", f"{len(run.checkpoints)}" + (f" (newest {run.checkpoints[-1]})" if run.checkpoints else "")),
        ("preemptions / requeues", f"{len(run.preemptions)} / {len(run.requeues)}"),
    ]
    for metric in run.metrics():
        if metric.startswith(("train/loss", "val/", "probe/", "zero_shot/", "retrieval/")):
            values = run.series(metric)[1]
            if values:
                best = min(values) if metric.endswith(("loss", "ppl")) else max(values)
                rows.append((metric, f"final {_fmt(values[-1])}, best {_fmt(best)}"))
    if run.skipped_lines:
        rows.append(("unreadable metrics.jsonl lines (skipped)", ", ".join(map(str, run.skipped_lines))))
    return rows


def render(runs: Sequence[RunData]) -> str:
    import yaml

    check_comparable(list(runs))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>pretrain report: {html.escape(', '.join(r.name for r in runs))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}img{max-width:100%;display:block;"
        "margin:1em 0}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style></head><body>",
        f"<h1>{html.escape(', '.join(r.name for r in runs))}</h1>",
        f"<p>{html.escape(', '.join(str(r.directory) for r in runs))} · rendered {time.strftime('%Y-%m-%d %H:%M:%S')}"
        " · dashed red lines: preemptions, dotted purple: requeues</p>",
        "<h2>Summary</h2>",
    ]
    for run in runs:
        parts.append(f"<table><tr><th colspan='2'>{html.escape(run.name)}</th></tr>")
        parts += [f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in summary_rows(run)]
        parts.append("</table>")
    for title, patterns in FIGURES:
        metrics = _matching(runs, patterns)
        if title.startswith("Training"):
            metrics += _matching(runs, ("optim/lr",))
        encoded = figure(title, runs, metrics)
        if encoded:
            parts.append(f"<h2>{html.escape(title)}</h2><img class='plot' alt='{html.escape(title)}' "
                         f"src='data:image/png;base64,{encoded}'>")
    parts.append("<h2>Config</h2>")
    if len(runs) == 1:
        parts.append(f"<pre>{html.escape(yaml.safe_dump(runs[0].config, sort_keys=False))}</pre>")
    else:
        differences = config_differences(list(runs))
        parts.append("<table><tr><th>key</th>" + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) + "</tr>")
        parts += [f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>"
                  for k, values in differences.items()]
        parts.append("</table>" if differences else "</table><p>The configs are the same (run.dir aside).</p>")
    # Tells a headless browser (the test) how many plots decoded; the page needs no script otherwise.
    parts.append("<script>window.addEventListener('load', () => { const images = [...document.images]; "
                 "document.title = 'plots ' + images.filter(i => i.complete && i.naturalWidth > 0).length + '/' + images.length; });"
                 "</script></body></html>")
    return "\n".join(parts)


def write_report(run_dirs: Sequence[str | Path], output: str | Path) -> dict:
    """Render the runs to ``output`` (written aside, then renamed: a reader never sees half a page)."""
    runs = [read_run(d) for d in run_dirs]
    page = render(runs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-{output.name}")
    tmp.write_text(page)
    tmp.replace(output)
    return {"runs": len(runs), "bytes": len(page), "plots": page.count("class='plot'"),
            "skipped_lines": {str(r.directory): r.skipped_lines for r in runs if r.skipped_lines}}


def watch(run_dirs: Sequence[str | Path], output: str | Path, interval: float,
          report: Callable[[str], None] = print, rounds: Optional[int] = None) -> None:
    """Re-render whenever a run's metrics change (Ctrl-C stops)."""
    seen = None
    done = 0
    while rounds is None or done < rounds:
        stamp = tuple((Path(d) / "metrics.jsonl").stat().st_mtime_ns if (Path(d) / "metrics.jsonl").exists() else 0
                      for d in run_dirs)
        if stamp != seen:
            summary = write_report(run_dirs, output)
            report(f"{time.strftime('%H:%M:%S')} wrote {output} ({summary['plots']} plots)")
            seen = stamp
        done += 1
        if rounds is None or done < rounds:
            time.sleep(interval)
