"""Checkpoints are read as data, never as code.

A ``.ckpt`` file is a pickle, and an unrestricted unpickle can run any command. Every
checkpoint the framework reads (resume, ``load_backbone``, ``pretrain consolidate|eval``, a
BEiT teacher, HuBERT targets from a run) goes through here: ``torch.load(weights_only=True)``,
which accepts tensors and plain containers and refuses every other global by name. Sharded
formats are checked before a loader that unpickles by itself touches them: an FSDP (DCP)
directory's ``.metadata`` with an unpickler that admits only DCP's metadata classes, and every
``.pt`` file of a DeepSpeed directory with the weights-only loader. A refused file is one line
naming it; nothing in it has run.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from framework.errors import ConfigError

# Modules whose classes a DCP ``.metadata`` pickle legitimately names (and nothing that acts).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner", "torch.distributed._shard.sharded_tensor.metadata",
                "torch.distributed._shard.metadata", "torch.distributed.checkpoint._extension")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("builtins", "set"), ("builtins", "frozenset"),
                ("builtins", "slice")}
# DeepSpeed's optimizer files hold three of its plain data classes besides tensors.
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"), ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))


class UntrustedCheckpoint(ConfigError):
    """A checkpoint whose pickle names something other than data."""


def _refusal(path: Path, exc: Exception) -> UntrustedCheckpoint:
    reason = str(exc).strip().splitlines()
    detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
    return UntrustedCheckpoint(f"{path}: refused: its pickle is not plain tensors and data ({detail.strip()[:200]}); "
                               "loading it could run code. Only load checkpoints from a source you trust")


def load_trusted(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs more is refused, naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location=kwargs.pop("map_location", "cpu"), weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_DCP_MODULES) or (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in checkpoint metadata")


def check_dcp_metadata(directory: Path) -> None:
    """Refuse an FSDP (DCP) checkpoint whose ``.metadata`` pickle names anything but DCP's classes
    (DCP reads it with a plain ``pickle.load``)."""
    metadata = directory / ".metadata"
    if not metadata.is_file():
        return
    try:
        _MetadataUnpickler(io.BytesIO(metadata.read_bytes())).load()
    except pickle.UnpicklingError as exc:
        raise _refusal(metadata, exc) from None


def check_deepspeed_dir(directory: Path) -> None:
    """Every ``.pt`` file of a DeepSpeed checkpoint must load weights-only, admitting DeepSpeed's
    own data classes by name (DeepSpeed unpickles the files freely)."""
    import importlib

    from framework.distributed.deepspeed import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    allowed = [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_GLOBALS]
    with torch.serialization.safe_globals(allowed):
        for file in sorted(directory.rglob("*.pt")):
            load_trusted(file, mmap=True)


def check_checkpoint(path: str | Path) -> None:
    """Refuse any checkpoint (file, DCP or DeepSpeed directory) that is not plain data."""
    path = Path(path)
    if path.is_file():
        load_trusted(path, mmap=True)
    elif (path / "meta.pt").is_file():
        load_trusted(path / "meta.pt")
        check_dcp_metadata(path)
    elif path.is_dir():
        check_deepspeed_dir(path)
