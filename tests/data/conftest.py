"""Synthetic shards of uneven sizes whose samples name themselves, and a 1:1 processor."""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

import io
import tarfile

from framework.data.sources import Shard
from framework.errors import SampleError


class KeyProcessor:
    """One item per sample: its key (so tests can check who read what)."""

    one_to_one = True

    def __init__(self, bad_keys=()) -> None:
        self.bad_keys = set(bad_keys)

    def __call__(self, key, sample, shard):
        if key in self.bad_keys:
            raise SampleError("cannot decode")
        return [str(sample["txt"], "utf-8")]  # bytes-like: bytes, or memoryviews under zero_copy

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def write_shards(directory: Path, sizes: List[int], prefix: str = "s") -> List[Shard]:
    shards = []
    for number, size in enumerate(sizes):
        path = directory / f"{prefix}-{number:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(size):
                key = f"{prefix}{number:03d}x{i:05d}"
                for ext, data in (("txt", key.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(Shard(str(path), size))
    return shards


@pytest.fixture
def uneven_shards(tmp_path) -> List[Shard]:
    return write_shards(tmp_path, [13, 2, 31, 7, 19, 5, 11])  # 7 uneven shards, 88 samples


@pytest.fixture(scope="module")
def shared_uneven_shards(tmp_path_factory) -> List[Shard]:
    """The same shards, shared by the tests of a module that only read them."""
    return write_shards(tmp_path_factory.mktemp("uneven"), [13, 2, 31, 7, 19, 5, 11])
