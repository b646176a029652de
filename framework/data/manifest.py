"""The manifest.json written next to a directory of shards: what is there and how much.

Its presence marks a completed write: writers only create it after every shard has been
renamed to its final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from framework.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_TOP_KEYS = ("version", "modality", "total_samples", "total_bytes", "shards")
_SHARD_KEYS = ("path", "samples", "bytes")


def write_manifest(
    directory: str | os.PathLike[str],
    shards: list[dict[str, Any]],
    modality: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``directory/manifest.json`` describing ``shards``; returns its path.

    Each shard is ``{"path": <name relative to directory>, "samples": int, "bytes": int}``.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_TOP_KEYS))
    if clash:
        raise ValueError(f"manifest extra keys clash with reserved keys: {clash}")
    for shard in shards:
        missing = [k for k in _SHARD_KEYS if k not in shard]
        if missing:
            raise ValueError(f"shard entry {shard!r} lacks {missing}")
    manifest = {
        "version": MANIFEST_VERSION,
        "modality": modality,
        "total_samples": sum(int(s["samples"]) for s in shards),
        "total_bytes": sum(int(s["bytes"]) for s in shards),
        "shards": [dict(s) for s in shards],
        **extra,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / MANIFEST_NAME
    # Temp file in the same directory so os.replace is an atomic rename on one filesystem.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read ``directory/manifest.json``; None when absent, DataError naming it when unusable."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read manifest {path}: {err}") from err
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"corrupt manifest {path}: invalid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise DataError(f"corrupt manifest {path}: expected a JSON object")
    missing = [k for k in _TOP_KEYS if k not in manifest]
    if missing:
        raise DataError(f"corrupt manifest {path}: missing keys {missing}")
    if manifest["version"] != MANIFEST_VERSION:
        raise DataError(f"manifest {path} has unsupported version {manifest['version']!r} (expected {MANIFEST_VERSION})")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise DataError(f"corrupt manifest {path}: 'shards' must be a list")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or any(k not in shard for k in _SHARD_KEYS):
            raise DataError(f"corrupt manifest {path}: shard entry {i} must have keys {list(_SHARD_KEYS)}")
        if not all(isinstance(shard[k], int) for k in ("samples", "bytes")):
            raise DataError(f"corrupt manifest {path}: shard entry {i} has non-integer counts")
    if manifest["total_samples"] != sum(s["samples"] for s in shards):
        raise DataError(f"corrupt manifest {path}: total_samples does not match the sum over shards")
    return manifest
