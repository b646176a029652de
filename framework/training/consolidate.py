"""``pretrain consolidate``: any checkpoint (ddp file, FSDP2 DCP directory, DeepSpeed ZeRO 1-3
directory) -> one safetensors file of full weights, loadable without any strategy.

The file holds the LightningModule's state dict (keys as in ``objective.state_dict()``, e.g.
``model.blocks.0.attn.qkv.weight``) and, as metadata, the objective's constructor arguments
(``hyper_parameters``: the resolved run config, vocabulary size, ...) as JSON. Consolidation
is offline (one process, no process group): it is the one place where the full model is
assembled in one memory, by design.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from framework.errors import ConfigError

FORMAT = "pretrain-weights-v1"
_DS_PREFIXES = ("_forward_module.", "module.")  # Lightning's wrapper inside the DeepSpeed engine


def checkpoint_kind(path: Path) -> str:
    """``file`` (ddp / single device), ``dcp`` (fsdp) or ``deepspeed``."""
    if path.is_file():
        return "file"
    if path.is_dir() and (path / "meta.pt").is_file():
        return "dcp"
    if path.is_dir() and (path / "latest").is_file():
        return "deepspeed"
    raise ConfigError(f"{path}: not a checkpoint (expected a .ckpt file, an FSDP or a DeepSpeed checkpoint directory)")


def _strip(state: Dict[str, torch.Tensor], prefixes: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def read_full_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(full state dict on CPU, the objective's hyperparameters) from any checkpoint."""
    path = Path(path)
    kind = checkpoint_kind(path)
    from framework.training.trusted import check_dcp_metadata, check_deepspeed_dir, load_trusted

    if kind == "file":
        checkpoint = load_trusted(path)
        return dict(checkpoint["state_dict"]), dict(checkpoint.get("hyper_parameters", {}))
    if kind == "dcp":
        check_dcp_metadata(path)  # DCP unpickles it freely
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        # Reads only the model entries (not the optimizer's) from every rank's shard file, in this
        # one process (DCP warns that no process group exists: that is the intent here).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            loaded = _load_state_dict_from_keys("state_dict", checkpoint_id=str(path))
        meta = load_trusted(path / "meta.pt")
        return dict(loaded["state_dict"]), dict(meta.get("hyper_parameters", {}))
    # DeepSpeed: its own tool rebuilds fp32 weights from the ZeRO partitions of every rank.
    from framework.distributed.deepspeed import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (path / "latest").read_text().strip()
    check_deepspeed_dir(path / tag)  # DeepSpeed unpickles its files freely: each must load weights-only first
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    model_states = sorted((path / tag).glob("*model_states.pt"))
    meta = load_trusted(model_states[0]) if model_states else {}
    return _strip(dict(state), _DS_PREFIXES), dict(meta.get("hyper_parameters", {}))


def consolidate(checkpoint: Path, out: Path) -> Dict[str, Any]:
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out)
    state, hparams = read_full_weights(checkpoint)
    # Own, contiguous storage per tensor: safetensors refuses shared (tied) tensors, and a
    # loader restores ties itself (both names are present, with equal values).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = {"format": FORMAT, "source": str(checkpoint), "hyper_parameters": json.dumps(hparams, default=str)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()), "kind": checkpoint_kind(checkpoint)}


def load_consolidated(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, hyperparameters) of a consolidated file; needs only safetensors and torch."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if FORMAT not in (metadata.get("format"), metadata.get("framework_format")):  # `pretrain export --format safetensors` keeps "pt"
        raise ConfigError(f"{path}: not a file written by `pretrain consolidate` or `pretrain export --format safetensors`")
    return load_file(str(path)), json.loads(metadata.get("hyper_parameters", "{}"))


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load consolidated weights into a freshly built (unwrapped) objective; every key must match."""
    state, _ = load_consolidated(path)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"run.init_from: {path} does not fit this objective/model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def build_objective(path: str | Path) -> nn.Module:
    """The objective (a LightningModule, plain PyTorch underneath) with the consolidated weights."""
    from framework.config.load import config_from_dict
    from framework.objectives import objective_module

    _, hparams = load_consolidated(path)
    cfg = config_from_dict(hparams["config"])
    objective = objective_module(cfg.objective.name).Objective(**hparams)
    load_weights(objective, path)
    return objective
