"""CLIP: an image tower and a text tower trained to agree on which caption belongs to which image.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML
2021 (https://arxiv.org/abs/2103.00020); ``loss: siglip``: Zhai et al., "Sigmoid Loss for
Language Image Pre-Training", ICCV 2023 (https://arxiv.org/abs/2303.15343); ``lock_image``:
Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022.

* Image tower: any backbone of ``framework.models`` (``model.*``), its features projected to
  ``embed_dim`` and L2-normalised. Views: a random resized crop at high scale (0.9-1), as
  OpenCLIP trains; the loader only decodes.
* Text tower: the framework's transformer (``objective.text.*``; causal, or bidirectional with
  padding masked out), pooled at the end-of-text token or as the mean of the real tokens, so
  padding never reaches the feature; projected and normalised like the images.
* A learnable temperature stored as its log, initialised to ln(1/0.07) (CLIP) or ln 10 with a
  bias of -10 (SigLIP), excluded from weight decay (a 1-element tensor), and clamped to at
  most ln 100 after every optimizer step (under deepspeed, whose optimizer keeps its own
  master copy, the value used is clamped in the forward pass instead).
* Losses (``framework/losses/clip.py``) are exact across ranks: features gathered with
  gradients and a local loss (CLIP), or texts passed round the ring of ranks (SigLIP).
* ``trainer.accumulate_grad_batches=k`` keeps the contrastive batch: the loader gives k x b
  pairs per step, each tower runs on the k micro-batches with ``torch.utils.checkpoint`` (its
  activations are dropped in the forward and recomputed, one micro-batch at a time, in the
  backward: GradCache's memory), and the loss sees all k x b pairs at once. One backward, one
  gradient all-reduce, and the logit scale and bias get their gradient once (OpenCLIP's
  ``--accum-freq`` adds it k times). BatchNorm statistics stay per micro-batch, and the
  recomputation does not update the running statistics twice.

Deviations: AdamW with warmup + cosine (``optim.*``), sizes for small data; the text tower's
vocabulary is the run's BPE tokenizer (``data.tokenizer``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, List, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.data.images import resolve_image_facts
from framework.data.pairs import CaptionEncoder, PairsDataModule
from framework.distributed.blocks import find_blocks
from framework.errors import ConfigError
from framework.losses.clip import clip_loss, siglip_loss
from framework.models.transformer import Transformer, TransformerConfig
from framework.objectives.vision_common import (
    ProbeConfig, VisionObjectiveHooks, batch_rng, build_backbone, check_patch_size, count_flops,
)
from framework.training.metrics import ValidationLosses

default_model = "vit"
LOSSES = ("clip", "siglip")
POOLS = ("eot", "mean")


def clip_view() -> ViewConfig:
    # OpenCLIP's training transform: RandomResizedCrop(scale=(0.9, 1.0)), nothing else.
    return ViewConfig(scale=[0.9, 1.0], hflip=0.0, jitter=0.0, grayscale=0.0)


@dataclass
class TextTowerConfig:
    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    position: str = "learned"  # learned | rope
    causal: bool = True  # CLIP's text tower is causal; false: bidirectional with padding masked
    pool: str = "eot"  # eot: the end-of-text token's state | mean: of the real tokens
    dropout: float = 0.0
    max_seq_len: int = 0  # 0: objective.context_length
    vocab_size: int = 0  # 0: the tokenizer's, rounded up to a multiple of 64 (filled in at build)


@dataclass
class ZeroShotConfig:
    """Online zero-shot classification of the labelled validation pairs (a ``cls`` member or a
    ``label`` in their json): class names in label order, and prompt templates with ``{}``."""

    classes: List[str] = field(default_factory=list)  # empty: no zero-shot evaluation
    templates: List[str] = field(default_factory=lambda: ["a photo of a {}."])


@dataclass
class Config(ObjectiveConfig):
    name: str = "clip"
    loss: str = "clip"  # clip (softmax, both directions) | siglip (pairwise sigmoid)
    embed_dim: int = 256  # the joint embedding's width
    context_length: int = 32  # caption tokens, end-of-text included; longer ones are cut
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    init_logit_scale: float = 0.0  # log of the temperature multiplier; 0: ln(1/0.07) for clip, ln 10 for siglip
    init_logit_bias: float = -10.0  # siglip only
    max_logit_scale: float = 100.0
    image_init: Optional[str] = None  # a vision run's checkpoint (or run dir) for the image tower
    text_init: Optional[str] = None  # a clm/mlm run's checkpoint (or run dir) for the text tower
    lock_image: bool = False  # LiT: the image tower is frozen, BatchNorm statistics included (its projection learns)
    lock_image_unlocked_blocks: int = 0  # with lock_image: this many last blocks stay trainable
    view: ViewConfig = field(default_factory=clip_view)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: bool = True  # online image<->text recall@1/5/10 on the validation pairs
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def text_transformer_config(o: Config) -> TransformerConfig:
    t = o.text
    return TransformerConfig(dim=t.dim, depth=t.depth, heads=t.heads, mlp_ratio=t.mlp_ratio,
                             max_seq_len=t.max_seq_len or o.context_length, position=t.position, dropout=t.dropout,
                             tie_embeddings=True, vocab_size=t.vocab_size)


class TextTower(nn.Module):
    """Caption tokens (B, L) and their lengths -> pooled features (B, dim); padding is never read."""

    def __init__(self, cfg: TransformerConfig, causal: bool, pool: str) -> None:
        super().__init__()
        self.transformer, self.pool = Transformer(cfg, cfg.vocab_size, causal=causal), pool
        self.feature_dim = cfg.dim

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        # A causal tower needs no mask: real tokens come first and never look ahead to padding.
        hidden = self.transformer(tokens, None if self.transformer.causal else valid)
        if self.pool == "eot":
            return hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        weights = valid.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1)


@contextlib.contextmanager
def batchnorm_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise as in training but leave their running statistics alone: a
    recomputed forward pass must not count its batch twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) x running + 0 x batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class Objective(ValidationLosses, VisionObjectiveHooks, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        o, data = self.cfg.objective, self.cfg.data
        check_clip_config(self.cfg)
        check_patch_size(o.view.size or data.image_size, self.cfg, "objective.view.size")
        self.image_tower = build_backbone(self.cfg)
        self.text_tower = TextTower(text_transformer_config(o), o.text.causal, o.text.pool)
        self.image_projection = nn.Linear(self.image_tower.feature_dim, o.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_tower.feature_dim, o.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=self.image_tower.feature_dim ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=self.text_tower.feature_dim ** -0.5)
        siglip = o.loss == "siglip"
        scale = o.init_logit_scale or (math.log(10.0) if siglip else math.log(1 / 0.07))
        # 1-element tensors: excluded from weight decay (parameter_groups decays matrices only)
        self.logit_scale = nn.Parameter(torch.full((1,), scale))
        self.logit_bias = nn.Parameter(torch.full((1,), o.init_logit_bias)) if siglip else None
        self.max_log_scale = math.log(o.max_logit_scale)
        self.micro_batches = self.cfg.trainer.accumulate_grad_batches
        self.augment = ViewAugment(o.view, data.channels, data.image_size, "objective.view")
        self.init_validation()
        if o.lock_image:
            lock_tower(self.image_tower, o.lock_image_unlocked_blocks)

    # -- the towers ---------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (N, C, H, W) -> unit-length embeddings (N, embed_dim)."""
        return F.normalize(self.image_projection(self.image_tower(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Caption tokens (N, L) and lengths (N,) -> unit-length embeddings (N, embed_dim)."""
        return F.normalize(self.text_projection(self.text_tower(tokens, lengths)), dim=-1)

    def embed(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings of a batch; a training batch of k micro-batches runs the towers one
        micro-batch at a time, recomputed in the backward (see the module docstring)."""
        k = self.micro_batches if torch.is_grad_enabled() else 1
        if self.cfg.objective.lock_image and not self.cfg.objective.lock_image_unlocked_blocks:
            with torch.no_grad():  # a locked tower keeps no activations: nothing to split
                features = self.image_tower(images)
            image = F.normalize(self.image_projection(features), dim=-1)  # the projection still learns
        elif k == 1:
            image = self.encode_image(images)
        else:
            frozen = lambda: (contextlib.nullcontext(), batchnorm_frozen(self.image_tower))  # noqa: E731
            image = torch.cat([checkpoint(self.encode_image, chunk, use_reentrant=False, context_fn=frozen)
                               for chunk in images.chunk(k)])
        if k == 1:
            return image, self.encode_text(tokens, lengths)
        text = torch.cat([checkpoint(self.encode_text, t, n, use_reentrant=False)
                          for t, n in zip(tokens.chunk(k), lengths.chunk(k))])
        return image, text

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def loss(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, gather: bool = True) -> torch.Tensor:
        image, text = self.embed(images, tokens, lengths)
        if self.logit_bias is not None:
            return siglip_loss(image, text, self.scale(), self.logit_bias, gather=gather)
        return clip_loss(image, text, self.scale(), gather=gather)

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with batch_rng(self, batch_idx, "train"):
            images = self.augment(to_float_images(batch["image"]))
        loss = self.loss(images, batch["tokens"], batch["length"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.scale().detach().reshape(()))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: the stored log-scale itself never exceeds ln(max_logit_scale).
        # DeepSpeed's optimizer keeps its own master copy (it would undo this): there the clamp
        # in ``scale()`` bounds the value used.
        if getattr(self.trainer.strategy, "strategy_name", "") != "deepspeed":
            with torch.no_grad():
                self.logit_scale.clamp_(max=self.max_log_scale)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        images = to_float_images(batch["image"])  # no augmentation: the whole image at its size
        image, text = self.embed(images, batch["tokens"], batch["length"])
        scale = self.scale()
        # Ranks may hold different numbers of validation batches: no collective here.
        loss = (siglip_loss(image, text, scale, self.logit_bias, gather=False) if self.logit_bias is not None
                else clip_loss(image, text, scale, gather=False))
        self.record_val_loss(loss, dataloader_idx)
        return {"image": image, "text": text}


    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the online probes and ``load_backbone`` see: the image tower's features."""
        return self.image_tower(images)

    def export_backbone(self) -> torch.nn.Module:
        return self.image_tower

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        if self.cfg.objective.lock_image:  # LiT: the locked tower's BatchNorm statistics stay as loaded
            for name, module in self.image_tower.named_modules():
                if not any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.train(False)
        return self

    def flops_per_sample(self, batch: dict) -> float:
        sample = {key: value[:2] for key, value in batch.items()}
        return count_flops(self, lambda: self.loss(self.augment(to_float_images(sample["image"])), sample["tokens"],
                                                   sample["length"]), 2)

    def configure_callbacks(self):
        from framework.evaluate.zeroshot import ClipEvaluation

        callbacks = super().configure_callbacks()
        o = self.cfg.objective
        if self.cfg.data.val and (o.retrieval or o.zeroshot.classes):
            callbacks.append(ClipEvaluation(o.zeroshot.classes, o.zeroshot.templates, o.retrieval))
        return callbacks


def lock_tower(tower: nn.Module, unlocked_blocks: int) -> None:
    """Freeze ``tower`` except its last ``unlocked_blocks`` repeated blocks and what follows them
    (a final norm): LiT's locked image tower, or its partly unlocked variant."""
    for param in tower.parameters():
        param.requires_grad_(False)
    if unlocked_blocks <= 0:
        return
    blocks = find_blocks(tower)
    if unlocked_blocks > len(blocks):
        raise ConfigError(f"objective.lock_image_unlocked_blocks={unlocked_blocks}, but the image tower has {len(blocks)} blocks")
    first = blocks[-unlocked_blocks]
    after = False
    for module in tower.modules():  # pre-order: the unlocked blocks, then what is registered after them
        if module is first:
            after = True
        if after and not list(module.children()):
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)


def check_clip_config(cfg: RunConfig) -> None:
    o = cfg.objective
    if o.loss not in LOSSES:
        raise ConfigError(f"objective.loss must be one of {', '.join(LOSSES)}, not {o.loss!r}")
    if o.text.pool not in POOLS:
        raise ConfigError(f"objective.text.pool must be one of {', '.join(POOLS)}, not {o.text.pool!r}")
    if o.text.max_seq_len and o.text.max_seq_len < o.context_length:
        raise ConfigError(f"objective.context_length={o.context_length} exceeds objective.text.max_seq_len={o.text.max_seq_len}")
    if o.max_logit_scale <= 1 or o.embed_dim < 1:
        raise ConfigError("objective.max_logit_scale must be > 1 and objective.embed_dim >= 1")
    if o.lock_image_unlocked_blocks and not o.lock_image:
        raise ConfigError("objective.lock_image_unlocked_blocks needs objective.lock_image=true")
    for template in o.zeroshot.templates:
        if "{}" not in template:
            raise ConfigError(f"objective.zeroshot.templates: {template!r} has no '{{}}' for the class name")
    if cfg.trainer.strategy == "deepspeed" and cfg.trainer.accumulate_grad_batches > 1 and cfg.trainer.deepspeed.stage == 3:
        raise ConfigError("objective clip with trainer.accumulate_grad_batches > 1 under deepspeed stage 3 is not supported "
                          "(ZeRO-3 gathers weights in hooks the per-micro-batch recomputation re-enters); use stage 1/2, ddp or fsdp")


def _adopt_init_configs(cfg: RunConfig) -> RunConfig:
    """With ``image_init`` / ``text_init``, each tower takes the architecture its checkpoint was
    trained with (and says so in the run's saved config)."""
    from framework.evaluate.backbone import read_run_config
    from framework.objectives import objective_module

    o = cfg.objective
    if o.image_init:
        source = read_run_config(o.image_init, "objective.image_init")
        if not hasattr(objective_module(source.objective.name).Objective, "export_backbone"):
            raise ConfigError(f"objective.image_init: {o.image_init} is a '{source.objective.name}' run, not a vision one")
        if cfg.data.channels and cfg.data.channels != source.data.channels:
            raise ConfigError(f"objective.image_init: {o.image_init} takes {source.data.channels}-channel images, "
                              f"data.channels is {cfg.data.channels}")
        cfg = replace(cfg, model=source.model, data=replace(cfg.data, channels=source.data.channels))
    if o.text_init:
        source = read_run_config(o.text_init, "objective.text_init")
        if source.objective.name not in ("clm", "mlm"):
            raise ConfigError(f"objective.text_init: {o.text_init} is a '{source.objective.name}' run; the text tower "
                              "comes from a clm or mlm run")
        m = source.model
        text = replace(o.text, dim=m.dim, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio, position=m.position,
                       max_seq_len=m.max_seq_len, causal=source.objective.name == "clm", vocab_size=m.vocab_size)
        if source.data.tokenizer and cfg.data.tokenizer and source.data.tokenizer != cfg.data.tokenizer:
            raise ConfigError(f"objective.text_init: that run used the tokenizer {source.data.tokenizer}, "
                              f"data.tokenizer is {cfg.data.tokenizer}; a text tower needs the tokenizer it was trained with")
        cfg = replace(cfg, objective=replace(o, text=text))
    return cfg


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    from framework.text.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is required by objective 'clip' (a tokenizer.json for the captions)")
    cfg = _adopt_init_configs(cfg)
    vocab = load_tokenizer(cfg.data.tokenizer).get_vocab_size()
    text = cfg.objective.text
    if text.vocab_size and text.vocab_size < vocab:
        raise ConfigError(f"objective.text.vocab_size={text.vocab_size} is smaller than the tokenizer's {vocab}")
    cfg = replace(cfg, objective=replace(cfg.objective, text=replace(text, vocab_size=text.vocab_size or (vocab + 63) // 64 * 64)))
    resolve_image_facts(cfg.data)  # fills data.image_size / data.channels the model needs
    check_patch_size(cfg.data.image_size, cfg, "data.image_size")
    captions = CaptionEncoder(cfg.data.tokenizer, cfg.objective.context_length)
    # The loader gives a whole accumulated batch per step (the objective splits it, see above).
    datamodule = PairsDataModule(cfg.data, cfg.run.seed, captions, cfg.data.batch_size * cfg.trainer.accumulate_grad_batches)
    objective = Objective(config_to_dict(cfg))
    load_tower_weights(objective, cfg)
    return objective, datamodule


def load_tower_weights(objective: Objective, cfg: RunConfig) -> None:
    """``image_init`` / ``text_init`` weights into the towers (once, at the start of a run)."""
    from framework.evaluate.backbone import load_backbone, read_run_weights

    o = cfg.objective
    if o.image_init:
        objective.image_tower.load_state_dict(load_backbone(o.image_init).state_dict())
        if o.lock_image:
            lock_tower(objective.image_tower, o.lock_image_unlocked_blocks)
    if o.text_init:
        weights = read_run_weights(o.text_init, "objective.text_init")
        state = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
        missing, unexpected = objective.text_tower.transformer.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith("rope_")]
        if missing:
            raise ConfigError(f"objective.text_init: {o.text_init} lacks text tower weights {missing[:3]}")
