"""Image-caption pairs (the shards ``pretrain shards pairs`` writes) -> image + caption tokens.

Each sample holds an image member and its caption (``txt``). The loader decodes the image
(as ``images.py`` does: augmentation happens batched on the device) and tokenizes the caption
with the run's BPE tokenizer into a fixed ``context_length``: truncated to leave room for the
end-of-text token, then padded. A pair without an image, with an image that does not decode,
or with an empty caption is a bad sample under ``data.on_error`` like any other.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from framework.config.schema import DataConfig
from framework.data.images import IMAGE_EXTS, decode_image, image_member, key_id, sample_label
from framework.data.loader import ShardDataMixin, train_loader, val_loader
from framework.data.tar import Sample
from framework.errors import ConfigError, SampleError

CAPTION_EXT = "txt"


class CaptionEncoder:
    """Text -> (``context_length`` token ids, number of real tokens): ids, then end-of-text,
    then padding. The same for training captions and for zero-shot prompts."""

    def __init__(self, tokenizer_path: str, context_length: int) -> None:
        if context_length < 2:
            raise ConfigError(f"objective.context_length must be >= 2 (a token and end-of-text), got {context_length}")
        self.tokenizer_path, self.context_length = tokenizer_path, context_length
        self._tokenizer = None

    def _load(self) -> None:
        from framework.text.tokenizer import load_tokenizer, special_token_ids

        self._tokenizer = load_tokenizer(self.tokenizer_path)
        ids = special_token_ids(self._tokenizer)
        self.eos, self.pad = ids["eos"], ids["pad"]

    def __call__(self, text: str) -> Tuple[np.ndarray, int]:
        if self._tokenizer is None:
            self._load()
        ids = self._tokenizer.encode(text).ids[: self.context_length - 1] + [self.eos]
        tokens = np.full(self.context_length, self.pad, dtype=np.int64)
        tokens[: len(ids)] = ids
        return tokens, len(ids)

    def batch(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        encoded = [self(text) for text in texts]
        return torch.from_numpy(np.stack([t for t, _ in encoded])), torch.tensor([n for _, n in encoded])

    def __getstate__(self) -> Dict[str, Any]:  # dataloader workers load their own tokenizer
        return {**self.__dict__, "_tokenizer": None}


class PairDecoder:
    """The loader's processor: a pair -> [(image, tokens, length)] (train) or, for evaluation,
    [(image, tokens, length, label, key id)] (label -1 when the pair has none)."""

    one_to_one = True

    def __init__(self, size: int, channels: int, captions: CaptionEncoder, with_labels: bool = False) -> None:
        self.size, self.channels, self.captions, self.with_labels = size, channels, captions, with_labels

    def __call__(self, key: str, sample: Sample, shard: str) -> List[Any]:
        data = image_member(sample)
        if data is None:
            raise SampleError(f"no image member (.{', .'.join(IMAGE_EXTS)}) in {sorted(sample)}")
        if CAPTION_EXT not in sample:
            raise SampleError(f"no caption (.{CAPTION_EXT} member) in {sorted(sample)}")
        try:
            caption = sample[CAPTION_EXT]
            caption = (caption if isinstance(caption, str) else str(caption, "utf-8")).strip()
        except UnicodeDecodeError as exc:
            raise SampleError(f"caption is not UTF-8: {exc}") from None
        if not caption:
            raise SampleError("empty caption")
        try:
            image = decode_image(data, self.channels, self.size)
            label = sample_label(sample) if self.with_labels else -1
        except Exception as exc:  # Pillow raises many types for corrupt files
            raise SampleError(f"cannot decode image: {exc}") from None
        tokens, length = self.captions(caption)
        return [(image, tokens, length, label, key_id(key)) if self.with_labels else (image, tokens, length)]

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def collate_pairs(items: List[Any]) -> Dict[str, torch.Tensor]:
    columns = list(zip(*items))
    batch = {
        "image": torch.from_numpy(np.stack(columns[0])),
        "tokens": torch.from_numpy(np.stack(columns[1])),
        "length": torch.tensor(columns[2], dtype=torch.long),
    }
    if len(columns) == 5:
        batch["label"] = torch.tensor(columns[3], dtype=torch.long)
        batch["id"] = torch.tensor(columns[4], dtype=torch.long)
    return batch


class PairsDataModule(ShardDataMixin, LightningDataModule):
    """Train: an endless stream of pair batches of ``batch_size``; val: one labelled pass.

    ``batch_size`` is the objective's: CLIP takes a whole accumulated batch per step and splits
    it itself, so that every micro-batch's negatives include all the others."""

    row_modality = "pairs"

    def __init__(self, data: DataConfig, seed: int, captions: CaptionEncoder, batch_size: int) -> None:
        super().__init__()
        if data.image_size < 1 or data.channels not in (1, 3):
            raise ConfigError("PairsDataModule needs data.image_size and data.channels resolved (see resolve_image_facts)")
        self.data, self.seed, self.captions, self.batch_size = data, seed, captions, batch_size
        self.resolve_data(data)

    def processor(self, with_labels: bool = False) -> PairDecoder:
        return PairDecoder(self.data.image_size, self.data.channels, self.captions, with_labels)

    def train_dataloader(self):
        rank, world = self._rank_world()
        from dataclasses import replace

        return train_loader(
            self.train_shards, self.processor(), replace(self.data, batch_size=self.batch_size),
            seed=self.seed, rank=rank, world_size=world, collate_fn=collate_pairs, sources=self.sources,
        )

    def val_dataloader(self):
        rank, world = self._rank_world()
        return self.val_loaders(lambda shards: val_loader(
            shards, self.processor(with_labels=True), self.data,
            seed=self.seed, rank=rank, world_size=world, collate_fn=collate_pairs,
        ))
