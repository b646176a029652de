"""Checks shared by the shard-writer tests: manifest vs tar contents vs webdataset, tree equality."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from framework.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def check_output(directory: Path) -> dict[str, dict[str, bytes]]:
    """Assert the manifest matches the tars (read with tarfile and webdataset); return the samples.

    Returns {key: {ext: data}}; fails on a duplicate key anywhere, a stray .tmp or a count mismatch.
    """
    import webdataset as wds

    manifest = read_manifest(directory)
    assert manifest is not None, f"no manifest in {directory}"
    tars = sorted(p.name for p in directory.glob("*.tar"))
    assert [s["path"] for s in manifest["shards"]] == tars
    assert not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    for entry in manifest["shards"]:
        path = directory / entry["path"]
        assert entry["bytes"] == path.stat().st_size
        keys_here: list[str] = []
        for name, data in read_tar(path):
            key, ext = name.split(".", 1)
            if key not in keys_here:
                assert key not in samples, f"duplicate key {key} in {path}"
                keys_here.append(key)
                samples[key] = {}
            samples[key][ext] = data
        assert entry["samples"] == len(keys_here)
        order.extend(keys_here)
    assert manifest["total_samples"] == len(samples) == sum(s["samples"] for s in manifest["shards"])
    assert manifest["total_bytes"] == sum(s["bytes"] for s in manifest["shards"])
    urls = [str(directory / name) for name in tars]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in read] == order
    for s in read:
        members = {k: v for k, v in s.items() if not k.startswith("__")}
        assert members == samples[s["__key__"]]
    return samples


def output_files(directory: Path) -> dict[str, bytes]:
    """Every shard and manifest under ``directory`` (not the writer's state) by relative path."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and ".writer-state" not in p.parts
    }


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m framework.cli ARGS`` in a fresh process (so it can be killed for real)."""
    return subprocess.run(
        [sys.executable, "-m", "framework.cli", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **(env or {})},
    )
