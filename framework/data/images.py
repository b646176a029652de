"""Image samples -> uint8 arrays (C, H, W) of one size, plus the label for evaluation.

Decoding (PNG/JPEG with Pillow; never pickle) and resizing happen in the loader workers;
augmentation happens batched on the training device (``framework.augment``). Training
items are the image only: labels never reach a pretext loss. Validation items also carry
the label (from the sample's ``cls`` member, -1 when absent) and a stable id of the sample
key, which the online probes use to split the validation set the same way on any number of ranks.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from framework.config.schema import DataConfig
from framework.data.faults import report_fault
from framework.data.loader import ShardDataMixin, train_loader, val_loader
from framework.data.manifest import read_manifest
from framework.data.sources import Shard, is_remote, open_reader, resolve_shards
from framework.data.tar import Sample, TarFormatError
from framework.errors import ConfigError, DataError, SampleError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
LABEL_EXT = "cls"
_MODES = {1: "L", 3: "RGB"}


def decode_image(data: bytes, channels: int, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (channels, size, size). A non-square image is resized so its
    short side is ``size`` and centre-cropped (random crops then happen on the device)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert(_MODES[channels])
        if img.size != (size, size):
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def image_member(sample: Sample) -> Optional[bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def sample_label(sample: Sample) -> int:
    """A sample's class: its ``cls`` member (image shards), else an integer ``label`` field of its
    ``json`` member (pair shards keep a list file's extra columns there); -1 when it has none."""
    if LABEL_EXT in sample:
        return int(str(sample[LABEL_EXT], "ascii").strip())
    if "json" in sample:
        import json

        label = json.loads(str(sample["json"], "utf-8")).get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            return label
    return -1


def key_id(key: str) -> int:
    """A stable 62-bit id of a sample key (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 2


class ImageDecoder:
    """The loader's processor: one sample -> [uint8 image] (train) or [(image, label, key id)] (eval)."""

    one_to_one = True  # one item per sample: the stream can replace an undecodable one and keep counts equal

    def __init__(self, size: int, channels: int, with_labels: bool = False) -> None:
        if channels not in _MODES:
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        if size < 1:
            raise ConfigError(f"data.image_size must be >= 1, got {size}")
        self.size, self.channels, self.with_labels = size, channels, with_labels

    def __call__(self, key: str, sample: Sample, shard: str) -> List[Any]:
        data = image_member(sample)
        if data is None:
            raise SampleError(f"no image member (.{', .'.join(IMAGE_EXTS)}) in {sorted(sample)}")
        try:
            image = decode_image(data, self.channels, self.size)
            label = sample_label(sample)
        except Exception as exc:  # Pillow raises many types for corrupt files; the stream's on_error decides
            raise SampleError(f"cannot decode image: {exc}") from None
        if not self.with_labels:
            return [image]
        return [(image, label, key_id(key))]

    def state_dict(self) -> Dict[str, Any]:
        return {}  # stateless: nothing carries from one sample to the next

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def collate_labelled(items: List[Any]) -> Dict[str, torch.Tensor]:
    images, labels, ids = zip(*items)
    return {
        "image": torch.from_numpy(np.stack(images)),
        "label": torch.tensor(labels, dtype=torch.long),
        "id": torch.tensor(ids, dtype=torch.long),
    }


def image_facts(shards: List[Shard], key: str = "data.train", on_error: str = "skip") -> tuple[int, int]:
    """(image side, channels) of a shard set: from the manifest the image writer leaves, else
    from the first image that decodes (bad shards and images follow ``on_error``). Used when
    ``data.image_size`` / ``data.channels`` are 0."""
    directory = Path(shards[0].url).parent if shards and not is_remote(shards[0].url) else None
    manifest = read_manifest(directory) if directory is not None and directory.is_dir() else None
    if manifest and manifest.get("image_size") and manifest.get("channels"):
        return int(manifest["image_size"]), int(manifest["channels"])
    from PIL import Image

    for shard in shards:
        try:
            with open_reader(shard) as reader:
                for sample_key, sample, _ in reader.samples(0):
                    try:
                        data = image_member(sample)
                    except SampleError as exc:  # a bad row of a row file
                        report_fault(f"{key}: shard {shard.url}, sample {sample_key}", str(exc), on_error)
                        continue
                    if data is None:
                        continue
                    try:
                        with Image.open(io.BytesIO(data)) as img:
                            w, h = img.size
                            channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
                    except Exception as exc:  # Pillow raises many types for corrupt files
                        report_fault(f"{key}: shard {shard.url}, sample {sample_key}", f"cannot decode its image: {exc}", on_error)
                        continue
                    return min(w, h), channels
        except (TarFormatError, OSError) as exc:
            report_fault(f"{key}: shard {shard.url}", str(exc), on_error)
    raise DataError(f"{key}: found no decodable image sample (.png/.jpg) in {len(shards)} shard(s) such as "
                    f"{shards[0].url if shards else '(none)'}; set data.image_size and data.channels, or check the shards")


class ImageDataModule(ShardDataMixin, LightningDataModule):
    """Train: an endless stream of uint8 image batches (no labels); val: one labelled pass."""

    row_modality = "image"

    def __init__(self, data: DataConfig, seed: int) -> None:
        super().__init__()
        if data.image_size < 1 or data.channels not in (1, 3):
            raise ConfigError("ImageDataModule needs data.image_size and data.channels resolved (see resolve_image_facts)")
        self.data, self.seed = data, seed
        self.resolve_data(data)

    def train_dataloader(self):
        rank, world = self._rank_world()
        return train_loader(
            self.train_shards, ImageDecoder(self.data.image_size, self.data.channels), self.data,
            seed=self.seed, rank=rank, world_size=world, sources=self.sources,
        )

    def val_dataloader(self):
        rank, world = self._rank_world()
        return self.val_loaders(lambda shards: val_loader(
            shards, ImageDecoder(self.data.image_size, self.data.channels, with_labels=True), self.data,
            seed=self.seed, rank=rank, world_size=world, collate_fn=collate_labelled,
        ))


def resolve_image_facts(data: DataConfig) -> None:
    """Fill ``data.image_size`` / ``data.channels`` when 0 (in place), so the run's saved config,
    and every checkpoint, records the values the model was built for."""
    if data.channels not in (0, 1, 3):
        raise ConfigError(f"data.channels must be 1 or 3 (or 0 to read it from the shards), got {data.channels}")
    if data.image_size < 0:
        raise ConfigError(f"data.image_size must be >= 1 (or 0 to read it from the shards), got {data.image_size}")
    if data.image_size and data.channels:
        return
    from framework.data.formats import row_fields

    shards = resolve_shards(data.train, "data.train", row_fields(data, "image"))
    size, channels = image_facts(shards, "data.train", data.on_error)
    data.image_size = data.image_size or size
    data.channels = data.channels or channels
