"""Any pretrained model to ONNX, checked by ONNX Runtime before the export is kept.

What is exported is what a user serves:
* text (clm, mlm): token ids (batch, sequence) -> logits (batch, sequence, vocabulary);
* vision (every image objective's backbone): images (batch, C, H, W) in [0, 1] -> features;
* speech (wav2vec2, hubert): waveforms (batch, samples) -> frame features (batch, frames, dim),
  for unpadded batches (pad or bucket clips to one length per call).
Batch (and sequence, audio length) axes are dynamic. The graph is run by ONNX Runtime at two
batch sizes and compared with our own forward before the directory is committed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from framework.errors import ConfigError
from framework.evaluate.downstream.encoders import modality_of

OPSET = 18
TOLERANCE = 1e-4  # relative, against our forward


class _TextLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model(tokens))


class _AudioFrames(nn.Module):
    """An unpadded batch of waveforms -> the encoder's frames (B, T, dim)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((waveforms.shape[0],), waveforms.shape[1], dtype=torch.long)
        features, valid = self.encoder.encode(waveforms, lengths)
        return self.encoder.contextualize(self.encoder.feature_norm(features), valid)


def servable(objective: Any) -> Tuple[nn.Module, List[Tuple[torch.Tensor, ...]], Dict[str, Any]]:
    """(the module to export, example inputs at two batch sizes, names and dynamic axes)."""
    cfg = objective.cfg
    generator = torch.Generator().manual_seed(0)
    if modality_of(cfg.objective.name) == "text":
        length = min(16, cfg.model.max_seq_len)
        inputs = [(torch.randint(0, objective.model.vocab_size, (b, length), generator=generator),) for b in (2, 3)]
        return _TextLogits(objective.model), inputs, {
            "input_names": ["input_ids"], "output_names": ["logits"], "dims": {"input_ids": {0: "batch", 1: "sequence"}},
        }
    if modality_of(cfg.objective.name) == "audio":
        encoder = objective.export_backbone()
        samples = int(cfg.data.sample_rate)
        inputs = [(torch.randn(b, samples, generator=generator),) for b in (2, 3)]
        return _AudioFrames(encoder), inputs, {
            "input_names": ["waveforms"], "output_names": ["frames"], "dims": {"waveforms": {0: "batch", 1: "samples"}},
        }
    if hasattr(objective, "export_backbone"):
        from framework.evaluate.backbone import image_backbone

        backbone = image_backbone(objective)
        size, channels = cfg.data.image_size, cfg.data.channels
        inputs = [(torch.rand(b, channels, size, size, generator=generator),) for b in (2, 3)]
        return backbone, inputs, {
            "input_names": ["images"], "output_names": ["features"], "dims": {"images": {0: "batch"}},
        }
    raise ConfigError(f"objective.name={cfg.objective.name}: no model to export to ONNX")


def export_onnx(objective: Any, directory: Path) -> Dict[str, Any]:
    import onnxruntime

    module, inputs, names = servable(objective)
    module.eval()
    path = directory / "model.onnx"
    dims = names["dims"]
    dynamic_shapes = tuple({axis: torch.export.Dim.AUTO for axis in dims[name]} for name in names["input_names"])
    with torch.no_grad():
        torch.onnx.export(module, inputs[0], str(path), input_names=names["input_names"], output_names=names["output_names"],
                          opset_version=OPSET, dynamo=True, dynamic_shapes=dynamic_shapes, external_data=False, verify=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for example in inputs:
        with torch.no_grad():
            expected = module(*example).float()
        got = torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names["input_names"], example)})[0])
        if got.shape != expected.shape:
            raise ConfigError(f"export: ONNX Runtime gave shape {tuple(got.shape)} for input {tuple(example[0].shape)}, ours {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    if worst > TOLERANCE:
        raise ConfigError(f"export: ONNX Runtime's output differs from ours by {worst:.2e} (relative), above {TOLERANCE}")
    return {"architecture": f"ONNX opset {OPSET}", "files": ["model.onnx"], "max_relative_difference": worst,
            "inputs": names["input_names"], "outputs": names["output_names"]}
