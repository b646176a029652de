"""Supervised fine-tuning of a pretrained run's whole network on labelled shards.

The encoder of ``objective.checkpoint`` (any modality: text clm/mlm, every vision objective and
CLIP's image tower, wav2vec2/hubert) gets a linear head over ``objective.num_classes`` and
trains end to end through the same Trainer, strategies and launchers as pretraining. The
recipe is MAE's fine-tuning (He et al. 2022, Appendix A.1): layer-wise lr decay
(``objective.layer_decay``), warmup and cosine (``optim``), label smoothing, mixup for images.
Validation on ``data.val`` logs ``val/accuracy`` and ``val/loss`` (named sets: ``val/<set>/...``
each); the best validation's weights (by the first set's accuracy) stay as ``best.ckpt`` and
``objective.patience`` stops a run that no longer improves.
``objective.from_scratch``: the same network randomly initialised, the baseline a pretrained
checkpoint must beat. ``pretrain eval finetune`` composes these runs for label fractions and
seeds; ``pretrain fit`` (any launcher) runs one.

The network is the pretrained run's: ``build`` takes ``model`` and the modality's data facts
(image size and channels, sample rate, tokenizer) from its config, so the checkpoint of a
fine-tuned run is self-contained except for the tokenizer file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import MISSING
from torch import nn
from torchmetrics import MeanMetric

from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.errors import ConfigError, DataError
from framework.evaluate.downstream.encoders import build_encoder, load_pretrained_weights, modality_of
from framework.losses.classification import mixed_cross_entropy
from framework.modules.step_rng import seeded, step_seed
from framework.training.callbacks.best import BestCheckpoint
from framework.training.metrics import ValidationLosses
from framework.training.optim import build_optimizer, layer_decay_groups

default_model = "vit"  # replaced by the pretrained run's model section in ``build``
DATA_FACTS = ("image_size", "channels", "sample_rate", "resample", "tokenizer")


@dataclass
class Config(ObjectiveConfig):
    name: str = "finetune"
    checkpoint: str = MISSING  # the pretrained run directory or checkpoint
    pretrained_objective: str = ""  # filled by build: which pretext objective made the encoder
    num_classes: int = 0  # labels must be in [0, num_classes)
    from_scratch: bool = False  # the same network, randomly initialised (the baseline)
    pooling: str = "mean"  # text: mean (over tokens) | last (the end token's state)
    layer_decay: float = 0.75  # lr of layer l: lr * layer_decay ** (layers + 1 - l); 1.0 disables
    label_smoothing: float = 0.1
    mixup: float = 0.0  # images: Beta(alpha, alpha) mixing of each batch with itself; 0 disables
    patience: int = 0  # validations without a better val/accuracy before stopping; 0: never stop early


class Objective(ValidationLosses, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: RunConfig = config_from_dict(config)
        o = self.cfg.objective
        pretrained = dataclasses.replace(self.cfg, objective=dataclasses.replace(self.cfg.objective, name=o.pretrained_objective))
        self.encoder = build_encoder(pretrained, o.pooling)
        self.head = nn.Linear(self.encoder.feature_dim, o.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head leaves the features intact at first
        nn.init.zeros_(self.head.bias)
        self.init_validation()
        self.val_accuracies = nn.ModuleList(MeanMetric() for _ in self.val_names)

    def forward(self, batch: dict) -> torch.Tensor:
        """Class logits (B, num_classes) of a labelled batch."""
        return self.head(self.encoder(batch))

    def health_features(self, batch: dict) -> torch.Tensor:
        """The encoder's features, for the representation-health monitor."""
        return self.encoder(batch)

    def _check_labels(self, labels: torch.Tensor) -> None:
        bad = (labels < 0) | (labels >= self.cfg.objective.num_classes)
        if bad.any():
            raise DataError(f"{int(bad.sum())} sample(s) of a batch have labels outside [0, objective.num_classes="
                            f"{self.cfg.objective.num_classes}) (e.g. {int(labels[bad][0])}; -1: no label)")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        o, labels = self.cfg.objective, batch["label"]
        self._check_labels(labels)
        permutation, lam = None, 1.0
        if o.mixup > 0 and self.encoder.modality == "image":
            with seeded(step_seed(self.cfg.run.seed, "mixup", self.global_step, batch_idx, self.global_rank), self.device):
                lam = float(torch.distributions.Beta(o.mixup, o.mixup).sample())
                permutation = torch.randperm(labels.shape[0], device=labels.device)
            images = batch["image"].float()
            batch = {**batch, "image": (lam * images + (1 - lam) * images[permutation]).round().to(batch["image"].dtype)}
        loss = mixed_cross_entropy(self(batch), labels, o.label_smoothing, permutation, lam)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        labels = batch["label"]
        self._check_labels(labels)
        logits = self(batch)
        self.record_val_loss(nn.functional.cross_entropy(logits.float(), labels), dataloader_idx, weight=labels.numel())
        self.val_accuracies[dataloader_idx].update((logits.argmax(-1) == labels).float())

    def on_validation_epoch_end(self) -> None:
        # Reduced over ranks, and logged on every rank: best-checkpoint and early stopping decide alike everywhere.
        for index, (accuracy_metric, loss_metric) in enumerate(zip(self.val_accuracies, self.val_losses)):
            accuracy, loss = accuracy_metric.compute(), loss_metric.compute()
            accuracy_metric.reset(), loss_metric.reset()
            if not torch.isnan(accuracy):
                self.log_dict({f"{self.val_prefix(index)}/accuracy": accuracy, f"{self.val_prefix(index)}/loss": loss})

    def configure_callbacks(self):
        selected = f"{self.val_prefix(0)}/accuracy"  # named sets: the first one selects and stops
        callbacks = [BestCheckpoint(self.cfg.run.dir, selected)] if self.cfg.data.val else []
        if self.cfg.data.val and self.cfg.objective.patience > 0:
            callbacks.append(EarlyStopping(selected, mode="max", patience=self.cfg.objective.patience,
                                           check_on_train_epoch_end=False, verbose=False))
        return callbacks

    def configure_optimizers(self):
        o = self.cfg.objective
        layers = self.encoder.num_layers
        groups = layer_decay_groups(self, self.cfg.optim.weight_decay, self.cfg.optim.lr,
                                    lambda name: layers + 1 if name.startswith("head.") else self.encoder.layer_of(name[len("encoder."):]),
                                    layers, o.layer_decay)
        return build_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps, groups)


def adopt_pretrained(cfg: RunConfig, pretrained: RunConfig | None = None) -> RunConfig:
    """``cfg`` with the pretrained run's model section and data facts, and its objective's name
    (``pretrained``: that run's config, read from ``objective.checkpoint`` when not given)."""
    from framework.evaluate.backbone import read_run_config

    o = cfg.objective
    pretrained = pretrained or read_run_config(o.checkpoint, key="objective.checkpoint")
    modality_of(pretrained.objective.name)  # a fine-tuned run is refused with a clear message
    data = dataclasses.replace(cfg.data, **{k: getattr(pretrained.data, k) for k in DATA_FACTS})
    longest = getattr(pretrained.model, "max_seq_len", None)
    if longest is not None and cfg.data.seq_len > longest:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the pretrained model.max_seq_len={longest}")
    objective = dataclasses.replace(o, pretrained_objective=pretrained.objective.name)
    return dataclasses.replace(cfg, model=pretrained.model, data=data, objective=objective)


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    from framework.data.labelled import LabelledDataModule

    o = cfg.objective
    if o.num_classes < 2:
        raise ConfigError(f"objective.num_classes must be at least 2, not {o.num_classes}")
    if not 0 < o.layer_decay <= 1 or not 0 <= o.label_smoothing < 1 or o.mixup < 0 or o.patience < 0:
        raise ConfigError("objective: need 0 < layer_decay <= 1, 0 <= label_smoothing < 1, mixup >= 0 and patience >= 0")
    cfg = adopt_pretrained(cfg)
    modality = modality_of(cfg.objective.pretrained_objective)
    if o.mixup > 0 and modality != "image":
        raise ConfigError(f"objective.mixup mixes images; this checkpoint's encoder is a {modality} one")
    objective = Objective(config_to_dict(cfg))
    if not o.from_scratch:
        load_pretrained_weights(objective.encoder, o.checkpoint)
    conv_layers = getattr(cfg.model, "conv_layers", None)
    return objective, LabelledDataModule(cfg.data, cfg.run.seed, modality, conv_layers, objective.encoder.pad_id)
