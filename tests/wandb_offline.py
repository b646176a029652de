"""Read back what W&B wrote in an offline run file (``run-<id>.wandb``).

The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of records with a
7-byte header each: crc32, little-endian length, type) of ``wandb_internal_pb2.Record``s."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from wandb.proto import wandb_internal_pb2

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> List[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pieces, out = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            pieces = payload
        elif kind == _MIDDLE:
            pieces += payload
        elif kind == _LAST:
            out.append(pieces + payload)
    parsed = []
    for raw in out:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history(path: Path) -> List[Dict[str, object]]:
    """Each logged history row as a dict of key -> value."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows
