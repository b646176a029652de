"""Image files -> webdataset image shards: one ``.png``/``.jpg`` member per sample, plus ``.cls``.

Inputs are directories, files or globs (as for text), or a list file. In a directory whose
images sit in sub-folders (``root/<class>/<image>``), the sub-folder names are the classes:
sorted, numbered from 0, and written as a ``cls`` member (ASCII integer) with the class names
in the manifest. A list file has one image per line, ``path`` or ``path<TAB or space>label``
(an integer); relative paths are relative to the list file.

PNG and JPEG bytes are stored as they are (no re-encoding loss); other formats Pillow reads
are converted to PNG. Every image is decoded once to check it; unreadable ones are skipped
and reported. The manifest records ``image_size`` and ``channels`` when every image has the
same square size and the same colour mode, which is what ``data.image_size: 0`` and
``data.channels: 0`` read.
"""
from __future__ import annotations

import io
import json
import logging
import random
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

from framework.data.files import expand_inputs_with_names, file_progress
from framework.data.writers.shard_writer import ShardWriter, clear_existing_outputs
from framework.data.writers.text import split_score
from framework.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHARD_PREFIX = "shard"
IMAGE_PATTERNS = ["*.png", "*.jpg", "*.jpeg", "*.PNG", "*.JPG", "*.JPEG", "*.bmp", "*.webp", "*.gif", "*.tif", "*.tiff"]
_STORED_AS_IS = {"PNG": "png", "JPEG": "jpg"}


def _read_list(list_file: str) -> list[tuple[Path, str, Optional[int]]]:
    """(path, stable name, label or None) per non-empty, non-comment line of a list file."""
    path = Path(list_file)
    if not path.is_file():
        raise DataError(f"list file not found: {list_file}")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        label: Optional[int] = None
        if len(parts) >= 2:
            try:
                label = int(parts[-1])
            except ValueError:
                raise DataError(f"{list_file}:{number}: label {parts[-1]!r} is not an integer") from None
            name = line[: line.rfind(parts[-1])].strip()
        else:
            name = parts[0]
        image = Path(name) if Path(name).is_absolute() else path.parent / name
        if not image.is_file():
            raise DataError(f"{list_file}:{number}: image not found: {image}")
        entries.append((image, name, label))
    if not entries:
        raise DataError(f"list file {list_file} names no images")
    return entries


def _folder_labels(files: list[tuple[Path, str]]) -> tuple[list[Optional[int]], list[str]]:
    """Labels from class sub-folders: used only when every file sits exactly one folder deep."""
    folders = [name.split("/")[0] if name.count("/") == 1 else None for _, name in files]
    if any(f is None for f in folders):
        return [None] * len(files), []
    classes = sorted(set(folders))
    index = {c: i for i, c in enumerate(classes)}
    return [index[f] for f in folders], classes


def _encode(path: Path) -> tuple[str, bytes, tuple[int, int], str]:
    """(member extension, bytes to store, (width, height), Pillow mode); raises on bad images."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # a full decode: truncated files fail here, not during training
        size, mode, fmt = img.size, img.mode, img.format
        if fmt in _STORED_AS_IS:
            return _STORED_AS_IS[fmt], data, size, mode
        out = io.BytesIO()
        img.convert("RGB" if mode not in ("L", "RGB") else mode).save(out, format="PNG")
        return "png", out.getvalue(), size, mode


def write_image_shards(
    inputs: list[str],
    output: str,
    list_file: Optional[str] = None,
    include: Optional[list[str]] = None,
    val_fraction: float = 0.0,
    max_samples: Optional[int] = None,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 64 * 2**20,
    seed: int = 0,
    overwrite: bool = False,
    metadata: Optional[str] = None,
) -> dict[str, Any]:
    """Write images (``inputs``: folders/files/globs, or ``list_file``) as shuffled shards.

    ``metadata``: a .tsv (with header) or .jsonl list file of per-image columns (a writer, a
    stroke width, a source) keyed by path, written into each sample's ``json`` with its source.

    With ``val_fraction > 0`` shards go to ``output/train`` and ``output/val`` (split by a
    stable hash of each image's relative path), else to ``output``. ``max_samples`` caps the
    number of images (a seeded random subset). Returns a summary like ``write_text_shards``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    if max_samples_per_shard < 1:
        raise ConfigError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    if list_file:
        entries = _read_list(list_file)
        files = [(p, name) for p, name, _ in entries]
        labels = [label for _, _, label in entries]
        classes: list[str] = []
    else:
        if not inputs:
            raise DataError("no inputs given (pass folders/files/globs, or a list file)")
        files = expand_inputs_with_names(inputs, include or IMAGE_PATTERNS)
        labels, classes = _folder_labels(files)

    columns: dict[int, tuple] = {}
    if metadata:
        from framework.data.writers.list_file import NAME_FIELDS, metadata_columns

        columns = metadata_columns(metadata, "image", files, ("source", "label"), ("image", *NAME_FIELDS))
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)  # shards are not sorted by class folder
    if max_samples is not None:
        order = order[:max_samples]

    out = Path(output)
    if val_fraction > 0:
        split_dirs = {"train": out / "train", "val": out / "val"}
        stale = [out]
    else:
        split_dirs = {"train": out}
        stale = [out / "train", out / "val"]
    for directory in stale:
        clear_existing_outputs(directory, SHARD_PREFIX, overwrite)

    skipped: list[tuple[str, str]] = []
    sizes: set[tuple[int, int]] = set()
    modes: set[str] = set()
    counts = {name: 0 for name in split_dirs}
    extra = {"source": "images", "seed": seed, "val_fraction": val_fraction, "classes": classes}
    with ExitStack() as stack:
        writers = {
            name: stack.enter_context(ShardWriter(
                directory, modality="image", prefix=SHARD_PREFIX, max_samples=max_samples_per_shard,
                max_bytes=max_shard_bytes, manifest_extra={**extra, "split": name}, overwrite=overwrite,
            ))
            for name, directory in split_dirs.items()
        }
        with file_progress("writing image shards", total=len(order)) as update:
            for index in order:
                path, name = files[index]
                try:
                    ext, data, size, mode = _encode(path)
                except Exception as exc:  # Pillow raises many types for unreadable files
                    log.warning("skipping %s: %s", path, exc)
                    skipped.append((str(path), str(exc)))
                    update()
                    continue
                sizes.add(size)
                modes.add("L" if mode in ("1", "L", "I", "I;16", "F") else "RGB")
                members = {ext: data}
                if labels[index] is not None:
                    members["cls"] = str(labels[index]).encode("ascii")
                if columns.get(index):
                    members["json"] = json.dumps({"source": name, **dict(columns[index])}, sort_keys=True).encode()
                split = "val" if val_fraction > 0 and split_score(name, seed) < val_fraction else "train"
                writers[split].write(f"i{index:09d}", members)
                counts[split] += 1
                update()
        if sum(counts.values()) == 0:
            raise DataError(f"no readable images in {list_file or ', '.join(map(str, inputs))}")
        uniform = len(sizes) == 1 and len(modes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1]
        for writer in writers.values():
            writer.manifest_extra["labelled"] = any(label is not None for label in labels)
            if uniform:
                writer.manifest_extra["image_size"] = next(iter(sizes))[0]
                writer.manifest_extra["channels"] = 1 if next(iter(modes)) == "L" else 3
    if skipped:
        log.warning("skipped %d of %d image(s) that could not be decoded", len(skipped), len(order))
    splits = {
        name: {"dir": str(w.directory), "samples": counts[name], "shards": len(w.shards),
               "bytes": sum(s["bytes"] for s in w.shards)}
        for name, w in writers.items()
    }
    return {"images": sum(counts.values()), "skipped": skipped, "classes": classes, "output": str(out), "splits": splits}
