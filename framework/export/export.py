"""``pretrain export``: a checkpoint of any strategy (ddp file, FSDP or DeepSpeed directory, a
run directory's newest, or a consolidated ``.safetensors``) to where its user works next.

* ``hf``: a directory that transformers loads natively (``from_pretrained``), tokenizer included;
* ``onnx``: ``model.onnx`` with dynamic batch (and sequence) axes, checked by ONNX Runtime;
* ``safetensors``: the full weights with the run's config (``load_backbone`` and ``run.init_from``
  read them), keeping the ``format: pt`` metadata transformers requires.

Every format gets a ``README.md`` model card. A config that a format cannot express is refused
in one line naming the key, before anything is written; the output is written beside the
target and renamed into place, so a failed export never leaves a half-written directory.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch

from framework.errors import ConfigError

FORMATS = ("hf", "onnx", "safetensors")


def read_objective(checkpoint: str | Path) -> Tuple[Any, Path]:
    """(the objective with its weights, in eval mode on the CPU; the checkpoint it came from)."""
    from framework.config.load import config_from_dict
    from framework.evaluate.backbone import read_checkpoint, resolve_checkpoint
    from framework.objectives import objective_module

    path = resolve_checkpoint(checkpoint)
    state, hparams = read_checkpoint(path)
    cfg = config_from_dict(hparams["config"])
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the caller's RNG stream
        objective = objective_module(cfg.objective.name).Objective(**hparams)
    missing, _ = objective.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"{path}: the checkpoint lacks weights {missing[:3]}")
    objective.checkpoint_step = _step_of(path)
    return objective.eval(), path


def _step_of(path: Path) -> int | None:
    from framework.training.checkpoint import checkpoint_step

    try:
        return checkpoint_step(path)
    except ConfigError:
        return None


def _exporter(objective: Any, fmt: str) -> Callable[[Any, Path], Dict[str, Any]]:
    """The function that writes ``fmt`` for this objective; ConfigError (naming the key) if none."""
    name = objective.cfg.objective.name
    if fmt == "safetensors":
        return export_safetensors
    if fmt == "onnx":
        from framework.export.onnx import export_onnx

        return export_onnx
    if name == "clm":
        from framework.export.text import check_causal_lm, export_causal_lm

        check_causal_lm(objective.cfg)
        return export_causal_lm
    if name in ("wav2vec2", "hubert"):
        from framework.export.speech import check_speech, export_speech_hf

        check_speech(objective.cfg)
        return export_speech_hf
    if name == "mlm":
        from framework.export.text import export_masked_lm

        return export_masked_lm
    if hasattr(objective, "export_backbone") and objective.cfg.model.name in ("vit", "resnet"):
        from framework.export.vision import check_backbone, export_backbone_hf

        check_backbone(objective.cfg)
        return export_backbone_hf
    raise ConfigError(
        f"objective.name={name}: no transformers export for this objective yet (clm goes to GPT-NeoX or Llama, mlm to a "
        "remote-code model, speech to Wav2Vec2Model or HubertModel, image backbones to ViTModel or ResNetModel); use --format safetensors or onnx"
    )


def export_safetensors(objective: Any, directory: Path) -> Dict[str, Any]:
    from safetensors.torch import save_file

    from framework.training.consolidate import FORMAT

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in objective.state_dict().items()}
    metadata = {"format": "pt", "framework_format": FORMAT, "hyper_parameters": json.dumps(dict(objective.hparams), default=str)}
    save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
    return {"architecture": type(objective).__module__.rsplit(".", 1)[-1], "files": ["model.safetensors"]}


def export(checkpoint: str | Path, fmt: str, output: str | Path, overwrite: bool = False) -> Dict[str, Any]:
    """Write the export of ``checkpoint`` in format ``fmt`` to the directory ``output``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    output = Path(output)
    if output.exists() and not overwrite and any(output.iterdir() if output.is_dir() else [output]):
        raise ConfigError(f"--output {output} exists and is not empty (pass --overwrite to replace it)")
    objective, path = read_objective(checkpoint)
    write = _exporter(objective, fmt)  # refuses before anything is written
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-export-{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = write(objective, tmp)
        from framework.export.card import write_model_card

        write_model_card(tmp, objective, path, fmt, summary)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(f".old-export-{output.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)
    return {"checkpoint": str(path), "format": fmt, "output": str(output), **summary}
