"""What a CLIP model can do without training a head: zero-shot classification and retrieval.

* Zero-shot: each class name is put into every prompt template ("a photo of a {}."); the
  text embeddings are normalised, averaged per class and normalised again (Radford et al.
  2021, Sec. 3.1.4); an image's class is the nearest class embedding. Top-1 and top-5.
* Retrieval: recall@1/5/10 from images to texts and from texts to images over a set of pairs.
  A hit is an item paired with an identical caption: with many images per caption (as in
  class-like captions), any image of that caption is right, and with unique captions this is
  the usual definition.

Both run online (``ClipEvaluation``: ``probe/zeroshot_top1``, ``probe/retrieval_i2t_r1`` ...)
and as commands (``pretrain eval zeroshot|retrieval``, ``evaluate_zeroshot`` /
``evaluate_retrieval`` here).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

from framework.errors import ConfigError, DataError
from framework.evaluate.probes import gather_uneven

log = logging.getLogger(__name__)
RECALL_AT = (1, 5, 10)


def class_embeddings(encode_text: Callable[[List[str]], torch.Tensor], classes: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """(num_classes, D): per class, the normalised mean of its normalised prompt embeddings."""
    if not classes:
        raise ConfigError("zero-shot classification needs class names")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(f"zero-shot templates must each hold '{{}}' for the class name: {bad or 'none given'}")
    rows = []
    for name in classes:
        prompts = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(prompts.mean(0), dim=-1))
    return torch.stack(rows)


def zeroshot_accuracy(images: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, top: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """Top-k accuracy of unit image embeddings (N, D) against class embeddings (C, D)."""
    scores = images.float() @ classes.float().T
    ranked = scores.topk(min(max(top), classes.shape[0]), dim=1).indices
    return {k: float((ranked[:, :k] == labels[:, None]).any(1).float().mean()) for k in top}


def caption_ids(tokens: torch.Tensor) -> torch.Tensor:
    """A 64-bit fingerprint of each caption's tokens (equal captions, equal ids)."""
    weights = torch.randint(1, 2**62, (tokens.shape[1],), generator=torch.Generator().manual_seed(0)).to(tokens.device)
    return (tokens.long() * weights).sum(1)  # wraps around in int64: still a fingerprint


def retrieval_recall(images: torch.Tensor, texts: torch.Tensor, captions: torch.Tensor,
                     at: Sequence[int] = RECALL_AT) -> Dict[str, float]:
    """Recall@k both ways over pairs (images[i], texts[i]); ``captions`` (N,) fingerprints say
    which texts are identical. Image i finds a hit when one of its k nearest texts has its
    caption; text i when one of its k nearest images was paired with its caption."""
    similarity = images.float() @ texts.float().T  # (N images, N texts)
    same = captions[:, None] == captions[None, :]
    results = {}
    for name, scores in (("i2t", similarity), ("t2i", similarity.T)):
        ranked = scores.topk(min(max(at), scores.shape[1]), dim=1).indices
        hits = same.gather(1, ranked)  # same is symmetric: row i, the captions of the ranked items
        for k in at:
            results[f"{name}_r{k}"] = float(hits[:, :k].any(1).float().mean())
    return results


class ClipEvaluation(Callback):
    """Online zero-shot accuracy and retrieval recall at every validation, from the embeddings
    the objective's ``validation_step`` returns; all ranks gather, rank 0 logs."""

    def __init__(self, classes: Sequence[str], templates: Sequence[str], retrieval: bool = True) -> None:
        self.classes, self.templates, self.retrieval = list(classes), list(templates), retrieval
        self._reset()

    def _reset(self) -> None:
        # (images, texts, captions, labels) per validation set (``dataloader_idx``)
        self._sets: Dict[int, tuple[List[torch.Tensor], ...]] = {}

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict) or "image" not in outputs:
            return
        images, texts, captions, labels = self._sets.setdefault(dataloader_idx, ([], [], [], []))
        images.append(outputs["image"].detach().float().clone())
        texts.append(outputs["text"].detach().float().clone())
        captions.append(caption_ids(batch["tokens"]))
        labels.append(batch["label"].clone())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Every rank walks every set (its own may be empty): the gathers inside must pair up.
        results: Dict[str, float] = {}
        for index, name in enumerate(getattr(pl_module, "val_names", [""])):
            results.update(self.score(pl_module, index, f"probe/{name}" if name else "probe"))
        self._reset()
        for name, value in results.items():
            pl_module.log(name, value, rank_zero_only=True)
        if results and trainer.is_global_zero:
            print(f"step {trainer.global_step}  " + "  ".join(f"{k.removeprefix('probe/')} {v:.4f}" for k, v in results.items()),
                  flush=True)

    def score(self, pl_module: LightningModule, dataloader_idx: int, prefix: str) -> Dict[str, float]:
        """Retrieval recall and zero-shot accuracy of one validation set, gathered from all ranks."""
        device = pl_module.device
        width = pl_module.cfg.objective.embed_dim
        local = [torch.cat(parts) if parts else torch.zeros((0, width) if i < 2 else 0, device=device,
                                                              dtype=torch.float if i < 2 else torch.long)
                 for i, parts in enumerate(self._sets.get(dataloader_idx, ([], [], [], [])))]
        images, texts, captions, labels = (gather_uneven(x.to(device)) for x in local)
        results: Dict[str, float] = {}
        if self.retrieval and images.shape[0] > 1:
            results.update({f"{prefix}/retrieval_{k}": v for k, v in retrieval_recall(images, texts, captions).items()})
        labelled = labels >= 0
        if self.classes and labelled.any():
            with torch.no_grad():
                classes = class_embeddings(lambda prompts: pl_module.encode_text(*_encode(pl_module, prompts)),
                                           self.classes, self.templates)
            top = zeroshot_accuracy(images[labelled], labels[labelled], classes)
            results.update({f"{prefix}/zeroshot_top{k}": v for k, v in top.items()})
        return results


def _encode(pl_module: LightningModule, prompts: List[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoder = getattr(pl_module, "_prompt_encoder", None)
    if encoder is None:
        from framework.data.pairs import CaptionEncoder

        encoder = CaptionEncoder(pl_module.cfg.data.tokenizer, pl_module.cfg.objective.context_length)
        pl_module._prompt_encoder = encoder
    tokens, lengths = encoder.batch(prompts)
    return tokens.to(pl_module.device), lengths.to(pl_module.device)


# ---------------------------------------------------------------- the commands


def _embedded_shards(clip: Any, spec: Any, batch_size: int, with_text: bool, on_error: str) -> Dict[str, torch.Tensor]:
    """One pass over shards (pairs, or labelled images): image embeddings, labels, and for pairs
    caption embeddings and fingerprints."""
    from framework.data.images import ImageDecoder
    from framework.data.pairs import PairDecoder
    from framework.data.sources import check_shards, resolve_shards
    from framework.data.stream import ShardStream

    shards = check_shards(resolve_shards(spec, "data.val"), on_error, key="data.val")
    processor = (PairDecoder(clip.image_size, clip.channels, clip.captions, with_labels=True) if with_text
                 else ImageDecoder(clip.image_size, clip.channels, with_labels=True))
    stream = ShardStream(shards, processor, seed=0, endless=False, remainder="none", on_error=on_error)
    images, texts, captions, labels, batch = [], [], [], [], []

    def flush() -> None:
        columns = list(zip(*batch))
        images.append(clip.encode_image(torch.from_numpy(np.stack(columns[0])).float() / 255))
        if with_text:
            tokens = torch.from_numpy(np.stack(columns[1]))
            lengths = torch.tensor(columns[2])
            texts.append(clip.objective.encode_text(tokens, lengths))
            captions.append(caption_ids(tokens))
        labels.append(torch.tensor(columns[-2]))
        batch.clear()

    with torch.no_grad():
        for item in stream.reader_items(0, 1):
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    if not images:
        raise DataError(f"data.val: no sample could be read from {spec}")
    out = {"images": torch.cat(images), "labels": torch.cat(labels)}
    if with_text:
        out.update(texts=torch.cat(texts), captions=torch.cat(captions))
    return out


def evaluate_zeroshot(checkpoint: str | Path, shards: Any, classes: Sequence[str], templates: Sequence[str],
                      batch_size: int = 256, on_error: str = "skip") -> Dict[str, float]:
    """Zero-shot top-1/top-5 of a CLIP checkpoint on labelled image (or pair) shards."""
    from framework.evaluate.backbone import load_clip

    clip = load_clip(checkpoint)
    with torch.no_grad():
        class_embedding = class_embeddings(clip.encode_text, classes, templates)
    data = _embedded_shards(clip, shards, batch_size, with_text=False, on_error=on_error)
    labelled = data["labels"] >= 0
    if not labelled.any():
        raise DataError("data.val: no sample has a label (a 'cls' member, or 'label' in its json); zero-shot needs them")
    if int(data["labels"].max()) >= len(classes):
        raise ConfigError(f"--classes names {len(classes)} classes, the shards have label {int(data['labels'].max())}")
    top = zeroshot_accuracy(data["images"][labelled], data["labels"][labelled], class_embedding)
    return {"samples": int(labelled.sum()), **{f"top{k}": v for k, v in top.items()}}


def evaluate_retrieval(checkpoint: str | Path, shards: Any, batch_size: int = 256, on_error: str = "skip") -> Dict[str, float]:
    """Image<->text recall@1/5/10 of a CLIP checkpoint on pair shards."""
    from framework.evaluate.backbone import load_clip

    clip = load_clip(checkpoint)
    data = _embedded_shards(clip, shards, batch_size, with_text=True, on_error=on_error)
    return {"pairs": int(data["images"].shape[0]), **retrieval_recall(data["images"], data["texts"], data["captions"])}


def read_names(value: Optional[str], what: str) -> List[str]:
    """``--classes``/``--templates``: a file with one per line, or a comma-separated list
    (templates: separated by '|', since prompts may hold commas)."""
    if not value:
        raise ConfigError(f"--{what} is required")
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [part.strip() for part in value.split("|" if what == "templates" else ",") if part.strip()]
    if not names:
        raise ConfigError(f"--{what}: no names in {value!r}")
    return names
