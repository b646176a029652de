"""Text samples -> fixed-length token blocks: tokenize each document, append EOS, pack.

Packing concatenates documents so no compute is spent on padding; the tokens left over
after the last full block carry into the next document and are part of the stream state.

Blocks waiting in the stream's mixing buffer are checkpointed as *origins*, not tokens: a
block is ``block_len`` tokens from (document number, token offset) on, across the documents
that follow in processing order, and the packer keeps where each recent document was read
(its sample locator). A resume re-reads and re-tokenizes those documents. 1,000 waiting
blocks of 2,048 tokens are 16 MB as int64 tokens, and a few tens of KB as origins and
locators (``bench/scale.py``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from framework.config.schema import DataConfig
from framework.data.loader import ShardDataMixin, train_loader, val_loader
from framework.data.tar import Sample
from framework.errors import SampleError

log = logging.getLogger(__name__)


def sample_text(sample: Sample, key: str) -> str:
    """The UTF-8 text of member ``key`` of a sample; a SampleError names what is wrong."""
    data = sample.get(key)
    if data is None:
        raise SampleError(f"no .{key} member (members: {sorted(sample)})")
    if isinstance(data, str):  # a row file's text column, decoded already
        return data
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(f"not UTF-8 text: {exc}") from None


Locator = Tuple[int, int, int]  # (shard number, sample index, byte offset), as in the stream
Origin = Tuple[int, int]  # (document number, token offset in it) of a block's first token


class DocumentTable:
    """Locators of the documents packed since the oldest one a waiting block still needs,
    by document number: a growing array whose head is dropped (``forget_before``)."""

    def __init__(self) -> None:
        self.rows = np.zeros((64, 3), dtype=np.int64)
        self.first, self.head, self.tail = 0, 0, 0  # number of rows[head]; rows[head:tail] live

    def __len__(self) -> int:
        return self.tail - self.head

    @property
    def next_number(self) -> int:
        return self.first + len(self)

    def append(self, locator: Optional[Locator]) -> int:
        if self.tail == len(self.rows):
            live = self.rows[self.head : self.tail]
            grown = np.zeros((max(64, 2 * len(live)), 3), dtype=np.int64)
            grown[: len(live)] = live
            self.rows, self.head, self.tail = grown, 0, len(live)
        self.rows[self.tail] = locator if locator is not None else (-1, -1, -1)
        self.tail += 1
        return self.next_number - 1

    def forget_before(self, number: int) -> None:
        drop = min(max(0, number - self.first), len(self))
        self.head += drop
        self.first += drop

    def locator(self, number: int) -> Locator:
        return tuple(int(v) for v in self.rows[self.head + number - self.first])  # type: ignore[return-value]

    def state_dict(self) -> Dict[str, Any]:
        return {"first": self.first, "rows": torch.from_numpy(self.rows[self.head : self.tail].copy())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        rows = state["rows"].numpy()
        self.rows = np.zeros((max(64, 2 * len(rows)), 3), dtype=np.int64)
        self.rows[: len(rows)] = rows
        self.first, self.head, self.tail = int(state["first"]), 0, len(rows)


class TokenPacker:
    one_to_one = False  # a document gives any number of blocks
    replays_items = True  # waiting blocks are checkpointed as origins (see the module docstring)

    def __init__(self, tokenizer_path: str, block_len: int, text_key: str = "txt") -> None:
        self.tokenizer_path = tokenizer_path
        self.block_len = block_len
        self.text_key = text_key
        self._tokenizer = None  # loaded lazily, inside the dataloader worker
        self._eos = -1
        self._carry = np.empty(0, dtype=np.int32)
        self._carry_origin: Origin = (0, 0)
        self.documents = DocumentTable()
        self.source: Optional[Locator] = None  # where the next document was read (set by the stream)
        self.last_origins: List[Origin] = []  # of the blocks of the last call

    def _load(self) -> None:
        from framework.text.tokenizer import load_tokenizer, special_token_ids

        self._tokenizer = load_tokenizer(self.tokenizer_path)
        self._eos = special_token_ids(self._tokenizer)["eos"]

    def _ids(self, sample: Sample) -> np.ndarray:
        if self._tokenizer is None:
            self._load()
        return np.asarray(self._tokenizer.encode(sample_text(sample, self.text_key)).ids + [self._eos], dtype=np.int32)

    def __call__(self, key: str, sample: Sample, shard: str) -> List[np.ndarray]:
        ids = self._ids(sample)
        number = self.documents.append(self.source)
        carried = len(self._carry)
        tokens = np.concatenate([self._carry, ids]) if carried else ids
        full = len(tokens) // self.block_len * self.block_len
        # Block 0 starts where the carry starts; later ones (and a new carry) inside this
        # document, since a carry is always shorter than a block.
        head = self._carry_origin if carried else (number, 0)
        self.last_origins = [head if b == 0 else (number, b - carried) for b in range(0, full, self.block_len)]
        if full:
            self._carry_origin = (number, full - carried)
        elif not carried:
            self._carry_origin = (number, 0)
        self._carry = tokens[full:]
        return [tokens[start : start + self.block_len].astype(np.int64) for start in range(0, full, self.block_len)]

    def oldest_needed(self) -> int:
        """The first document the carry needs (waiting blocks may need older ones)."""
        return self._carry_origin[0] if len(self._carry) else self.documents.next_number

    def rebuild(self, origins: Sequence[Origin], read: Callable[[List[Locator]], List[Tuple[Locator, str, Sample]]]) -> List[Optional[np.ndarray]]:
        """The blocks at ``origins``, from their documents re-read (``read``: locators -> the
        samples found) and re-tokenized; None for a block whose documents cannot be read."""
        if not origins:
            return []
        first = min(number for number, _ in origins)
        numbers = range(first, self.documents.next_number)
        locators = [self.documents.locator(n) for n in numbers]
        found = {locator: sample for locator, _, sample in read(list(dict.fromkeys(locators)))}
        ids = {n: self._ids(found[loc]) for n, loc in zip(numbers, locators) if loc in found}
        blocks: List[Optional[np.ndarray]] = []
        for number, offset in origins:
            pieces, have = [], 0
            while have < self.block_len and number in ids:
                piece = ids[number][offset : offset + self.block_len - have]
                pieces.append(piece)
                have += len(piece)
                number, offset = number + 1, 0
            blocks.append(np.concatenate(pieces).astype(np.int64) if have == self.block_len else None)
        return blocks

    def count_tokens(self, sample: Sample) -> int:
        """Tokens this document adds to the stream (its own, and the end-of-text), leaving the
        packing state alone (``data inspect --verify``)."""
        if self._tokenizer is None:
            self._load()
        return len(self._tokenizer.encode(sample_text(sample, self.text_key)).ids) + 1

    def state_dict(self) -> Dict[str, Any]:
        return {"carry": torch.from_numpy(self._carry.copy()), "carry_origin": self._carry_origin,
                "documents": self.documents.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._carry = np.asarray(state["carry"].numpy(), dtype=np.int32)
        self._carry_origin = tuple(state.get("carry_origin", (0, 0)))  # type: ignore[assignment]
        if "documents" in state:
            self.documents.load_state_dict(state["documents"])


class TextDataModule(ShardDataMixin, LightningDataModule):
    """Train: an endless packed token stream per rank; val: one pass over held-out shards (per
    named set: ``data.val: {old: ..., new: ...}``)."""

    def __init__(self, data: DataConfig, seed: int, block_len: int) -> None:
        super().__init__()
        self.data, self.seed, self.block_len = data, seed, block_len
        self.resolve_data(data)

    def processor(self) -> TokenPacker:
        """How a sample becomes items (``data inspect --verify`` decodes with it too)."""
        return TokenPacker(self.data.tokenizer, self.block_len)

    def train_dataloader(self):
        rank, world = self._rank_world()
        return train_loader(
            self.train_shards, self.processor(), self.data,
            seed=self.seed, rank=rank, world_size=world, sources=self.sources,
        )

    def val_dataloader(self):
        """One pass over ``data.val``; named sets give one loader each, in their order."""
        rank, world = self._rank_world()
        return self.val_loaders(lambda shards: val_loader(shards, self.processor(), self.data, seed=self.seed,
                                                          rank=rank, world_size=world))
