"""Labelled samples of any modality, for fine-tuning and downstream evaluation.

Training and validation items both carry the label and a stable id of the sample key:
images (``ImageDecoder``), clips (``AudioDecoder``) and, here, documents cut to ``data.seq_len``
tokens (one sequence per sample, ending with the end-of-text token, padded per batch: no
packing, a class belongs to one document). A sample without a label is an error naming it.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from framework.config.schema import DataConfig
from framework.data.images import key_id, sample_label
from framework.data.loader import ShardDataMixin, train_loader, val_loader
from framework.data.tar import Sample
from framework.data.text import sample_text

MODALITIES = ("text", "image", "audio")


class TextClassifier:
    """The loader's processor: a document -> [(token ids, label, key id)]."""

    one_to_one = True

    def __init__(self, tokenizer_path: str, seq_len: int, text_key: str = "txt") -> None:
        self.tokenizer_path, self.seq_len, self.text_key = tokenizer_path, seq_len, text_key
        self._tokenizer, self._eos = None, -1  # loaded lazily, inside the dataloader worker

    def __call__(self, key: str, sample: Sample, shard: str) -> List[Any]:
        if self._tokenizer is None:
            from framework.text.tokenizer import load_tokenizer, special_token_ids

            self._tokenizer = load_tokenizer(self.tokenizer_path)
            self._eos = special_token_ids(self._tokenizer)["eos"]
        ids = self._tokenizer.encode(sample_text(sample, self.text_key)).ids[: self.seq_len - 1] + [self._eos]
        return [(np.asarray(ids, dtype=np.int64), sample_label(sample), key_id(key))]

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def collate_text(items: List[Any], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """Token sequences padded to the longest with ``pad_id``; ``valid`` marks real tokens."""
    sequences, labels, ids = zip(*items)
    longest = max(len(s) for s in sequences)
    tokens = torch.full((len(items), longest), pad_id, dtype=torch.long)
    valid = torch.zeros(len(items), longest, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.from_numpy(sequence)
        valid[row, : len(sequence)] = True
    return {"tokens": tokens, "valid": valid, "label": torch.tensor(labels, dtype=torch.long),
            "id": torch.tensor(ids, dtype=torch.long)}


def labelled_processor(modality: str, data: DataConfig, seed: int, train: bool, conv_layers: Any = None,
                       pad_id: int = 0) -> tuple[Any, Any]:
    """(processor, collate function) of labelled ``modality`` samples; ``train``: random crops (audio)."""
    import functools

    if modality == "text":
        return TextClassifier(data.tokenizer, data.seq_len), functools.partial(collate_text, pad_id=pad_id)
    if modality == "audio":
        from framework.data.audio import AudioDecoder, collate_audio

        return AudioDecoder(data, seed, crop=train, with_labels=True, conv_layers=conv_layers), collate_audio
    from framework.data.images import ImageDecoder, collate_labelled

    return ImageDecoder(data.image_size, data.channels, with_labels=True), collate_labelled


class LabelledDataModule(ShardDataMixin, LightningDataModule):
    """Train: an endless stream of labelled batches; val: one labelled pass (model selection)."""

    def __init__(self, data: DataConfig, seed: int, modality: str, conv_layers: Any = None, pad_id: int = 0) -> None:
        super().__init__()
        self.data, self.seed, self.modality, self.conv_layers, self.pad_id = data, seed, modality, conv_layers, pad_id
        self.row_modality = modality
        self.resolve_data(data)

    def processor(self) -> Any:
        """How a sample becomes items (``data inspect --verify`` decodes with it too)."""
        return labelled_processor(self.modality, self.data, self.seed, True, self.conv_layers, self.pad_id)[0]

    def train_dataloader(self):
        rank, world = self._rank_world()
        processor, collate = labelled_processor(self.modality, self.data, self.seed, True, self.conv_layers, self.pad_id)
        return train_loader(self.train_shards, processor, self.data, seed=self.seed, rank=rank, world_size=world,
                            collate_fn=collate, sources=self.sources)

    def val_dataloader(self):
        rank, world = self._rank_world()
        processor, collate = labelled_processor(self.modality, self.data, self.seed, False, self.conv_layers, self.pad_id)
        return self.val_loaders(lambda shards: val_loader(shards, processor, self.data, seed=self.seed, rank=rank,
                                                          world_size=world, collate_fn=collate))
