"""Row files (Parquet, JSON Lines) -> tar shards, for users who want shards or must reshard.

``pretrain shards text|images|audio|pairs --input <row files>`` reads the files as training
does (framework/data/formats/: the same units, columns and checks), one unit per work item,
through the parallel, crash-resumable driver every writer uses. Each row becomes a sample:
its id (``--id-key``, made safe for tar names: ``.`` and ``/`` become ``_``) the key, the
text or caption column ``txt``, a Hugging Face ``{bytes, path}`` struct written under the
extension of its ``path``, an integer label ``cls``, every other column in the ``json``
member (the original id included). A bad row is skipped and named by file and row.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Union

from framework.data.formats import AUDIO, IMAGE, TEXT, RowFields
from framework.data.writers.parallel import Sample, Skip, write_parallel
from framework.errors import DataError, SampleError

_UNSAFE = re.compile(r"[./\\\0]")


class RowItem(NamedTuple):
    url: str
    rows: tuple
    split: str


def row_fields_for(modality: str, text_key: str = "text", image_key: str = "image", audio_key: str = "audio",
                   caption_key: str = "caption", id_key: str = "id", label_key: str = "label",
                   max_rows_per_read: int = 1024) -> RowFields:
    members = {"text": ((text_key, TEXT),), "images": ((image_key, IMAGE),), "audio": ((audio_key, AUDIO),),
               "pairs": ((image_key, IMAGE), (caption_key, TEXT))}[modality]
    return RowFields(members, id_key, label_key, None, max_rows_per_read, required=True)


def _process_rows(item: RowItem, fields: RowFields) -> Iterator[Union[Sample, Skip]]:
    from framework.data.sources import Shard, iter_shard

    seen: Dict[str, int] = {}
    for key, sample in iter_shard(Shard(item.url, item.rows[1] - item.rows[0], None, item.rows, fields), bad_rows=True):
        try:
            members = {ext: value.encode() if isinstance(value, str) else bytes(value) for ext, value in sample.items()}
        except SampleError as exc:
            yield Skip(f"{item.url}, row {key}", str(exc))
            continue
        safe = _UNSAFE.sub("_", key)
        repeat = seen.get(safe, 0)
        seen[safe] = repeat + 1
        yield Sample(safe if not repeat else f"{safe}_{repeat}", members, item.split)


def write_row_shards(inputs: List[str], output: str, modality: str, *, fields: RowFields, val_fraction: float = 0.0,
                     seed: int = 0, max_samples_per_shard: int = 1000, max_shard_bytes: int = 64 * 2**20,
                     workers: Optional[int] = None, shards_per_chunk: int = 8, overwrite: bool = False) -> Dict[str, Any]:
    """Write ``inputs`` (row files, directories or globs of them) as shards of ``modality``;
    ``val_fraction`` of the units (by a seeded hash) go to OUTPUT/val."""
    import random

    from framework.data.sources import resolve_shards
    from framework.data.writers.text import split_score

    shards = []
    for spec in inputs:
        found = resolve_shards(spec, "--input", fields)
        tars = [s.url for s in found if s.rows is None]
        if tars:
            raise DataError(f"--input {spec}: {tars[0]} is not a row file (.parquet, .jsonl, .jsonl.gz, .jsonl.zst); "
                            "mix row files with other inputs in separate commands")
        shards += found
    for shard in shards:
        if shard.fault is not None:
            from framework.data.faults import report_fault

            report_fault(f"{shard.url}", shard.fault, "skip")
    units = [s for s in shards if s.samples]
    out = Path(output)
    splits = {"train": out / "train", "val": out / "val"} if val_fraction > 0 else {"train": out}
    held = [split_score(f"{s.url}:{s.rows[0]}", seed) < val_fraction for s in units]
    if val_fraction > 0 and (all(held) or not any(held)) and len(units) > 1:
        held[0] = not held[0]  # both splits exist, as the text writer does
    items = [RowItem(s.url, s.rows, "val" if h else "train") for s, h in zip(units, held)]
    random.Random(seed).shuffle(items)  # so shards do not follow the files' order
    if not items:
        raise DataError(f"no rows to write in {', '.join(inputs)}")
    result = write_parallel(
        items, functools.partial(_process_rows, fields=fields), out, writer=f"rows-{modality}",
        modality={"text": "text", "images": "image", "audio": "audio", "pairs": "image-text"}[modality],
        options={"fields": repr(fields), "val_fraction": val_fraction, "seed": seed}, splits=splits,
        stale_dirs=[out / "train", out / "val"] if val_fraction <= 0 else [out],
        max_samples_per_shard=max_samples_per_shard, max_shard_bytes=max_shard_bytes,
        item_sizes=[(s.rows[1] - s.rows[0]) * 2048 for s in units], shards_per_chunk=shards_per_chunk,
        workers=workers, overwrite=overwrite, description=f"writing {modality} shards from rows", prefix="shard",
        manifest_extra=lambda name, split: {"source": "rows", "split": name, "inputs": [str(i) for i in inputs]},
    )
    return {"rows": sum(s.samples for s in units), "skipped": result.skipped, "output": str(out),
            "splits": {name: {"dir": str(split.directory), "samples": split.samples, "shards": len(split.shards),
                              "bytes": split.bytes} for name, split in result.splits.items()}}
