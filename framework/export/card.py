"""The ``README.md`` model card of an export: what was trained on what, how far, how it ended,
and how to load it in two lines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from framework.config.load import config_to_dict

_LOAD = {
    "hf": "from transformers import {auto_class}\nmodel = {auto_class}.from_pretrained(\"{path}\"{remote})",
    "onnx": "import onnxruntime\nsession = onnxruntime.InferenceSession(\"{path}/model.onnx\")",
    "safetensors": "from safetensors.torch import load_file\nweights = load_file(\"{path}/model.safetensors\")",
}


def _sources(spec: Any) -> List[str]:
    """Each training source with its sample count where a manifest gives one."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    lines = []
    for item in items:
        shards = item.get("shards") if isinstance(item, dict) else item
        weight = f" (weight {item.get('weight')})" if isinstance(item, dict) and "weight" in item else ""
        manifest = Path(str(shards)) / "manifest.json"
        count = ""
        if manifest.is_file():
            try:
                count = f": {json.loads(manifest.read_text())['total_samples']:,} samples"
            except (ValueError, KeyError, OSError):
                count = ""
        lines.append(f"- `{shards}`{weight}{count}")
    return lines


def _final_metrics(run_dir: Path) -> Dict[str, Any]:
    """The last value of every metric in the run's metrics.jsonl (a cut last line is skipped)."""
    metrics: Dict[str, Any] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return metrics
    for line in path.read_text().splitlines():
        try:
            metrics.update(json.loads(line))
        except ValueError:
            continue
    return metrics


def write_model_card(directory: Path, objective: Any, checkpoint: Path, fmt: str, summary: Dict[str, Any]) -> None:
    import yaml

    cfg = objective.cfg
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    metrics = _final_metrics(run_dir)
    step = getattr(objective, "checkpoint_step", None)
    shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "train/loss", "probe/", "zero_shot/"))}
    lines = [
        f"# {cfg.objective.name} {cfg.model.name}, pretrained with pretrain-framework",
        "",
        f"- objective: `{cfg.objective.name}`; model: `{cfg.model.name}`; exported as `{fmt}`"
        + (f" ({summary['architecture']})" if summary.get("architecture") else ""),
        f"- checkpoint: `{checkpoint}`" + (f", step {step}" if step is not None else ""),
        f"- steps planned: {cfg.trainer.max_steps}; batch {cfg.data.batch_size} per rank",
        "",
        "## Data",
        "",
        *_sources(cfg.data.train),
        "",
        "## Final metrics",
        "",
        *([f"- `{k}`: {v:.4g}" if isinstance(v, float) else f"- `{k}`: {v}" for k, v in sorted(shown.items())] or ["(no metrics.jsonl beside the checkpoint)"]),
        "",
        "## Load it",
        "",
        "```python",
        _LOAD[fmt].format(path="<this directory>", auto_class=summary.get("auto_class", "AutoModel"),
                          remote=", trust_remote_code=True" if summary.get("trust_remote_code") else ""),
        "```",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines))
