"""Image backbones to Hugging Face transformers: ViT -> ``ViTModel``, ResNet -> ``ResNetModel``,
native classes (``AutoModel`` loads them), with an image-processor config that does the
normalisation our models do inside (users of ours feed [0, 1] images; transformers' models take
normalised ``pixel_values`` from ``AutoImageProcessor``).

ViT: our fixed 2-D sine-cosine positions become ViT's position table at the pretraining image
size (the class token has no position here: its row is zero); the attention output projection
has no bias here (a zero bias there); ``last_hidden_state`` is our encoded tokens, and our
features are their mean (``pool: mean``) or the class token (``pool: cls``). ``pooler_output``
of transformers' ViT (a tanh layer we never trained) is zero: use ``last_hidden_state``.
ResNet: the ImageNet stem, basic or bottleneck (v1.5) blocks; ``pooler_output`` flattened is
our features, ``last_hidden_state`` our feature map.

Refused, naming the key: ``model.pool=grid`` (no transformers pooling is a grid of region
means) and ``model.stem=cifar`` (ResNetConfig has no 3x3 stem without max-pool); ``--format
safetensors`` with ``load_backbone`` and ``--format onnx`` export both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from framework.errors import ConfigError


def check_backbone(cfg: Any) -> str:
    """The transformers class of this backbone; ConfigError naming the key if it has none."""
    model = cfg.model
    if model.name == "vit":
        if model.pool == "grid":
            raise ConfigError("model.pool=grid: no transformers ViT pools a grid of region means; export --format safetensors "
                              "(load_backbone) or onnx instead")
        return "ViTModel"
    if model.name == "resnet":
        if model.stem != "imagenet":
            raise ConfigError(f"model.stem={model.stem}: transformers' ResNetConfig has only the ImageNet stem (7x7, max-pool); "
                              "export --format safetensors (load_backbone) or onnx instead")
        return "ResNetModel"
    raise ConfigError(f"model.name={model.name}: no transformers export for this backbone")


def _vit(backbone: Any, cfg: Any) -> tuple[Any, Dict[str, torch.Tensor]]:
    from transformers import ViTConfig

    from framework.models.vit import sincos_2d

    m, size = cfg.model, cfg.data.image_size
    config = ViTConfig(
        hidden_size=m.dim, num_hidden_layers=m.depth, num_attention_heads=m.heads, intermediate_size=int(m.dim * m.mlp_ratio),
        hidden_act="gelu", layer_norm_eps=1e-5, image_size=size, patch_size=m.patch_size, num_channels=cfg.data.channels,
        qkv_bias=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, architectures=["ViTModel"],
    )
    state = backbone.state_dict()
    grid = size // m.patch_size
    positions = torch.cat([torch.zeros(1, m.dim), sincos_2d(grid, grid, m.dim)])[None]
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": positions,
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
        "pooler.dense.weight": torch.zeros(m.dim, m.dim),
        "pooler.dense.bias": torch.zeros(m.dim),
    }
    for i in range(m.depth):
        ours = f"blocks.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split(m.dim)
        ours_by_part = {
            "norm1.weight": state[ours + "norm1.weight"], "norm1.bias": state[ours + "norm1.bias"],
            "q": q, "k": k, "v": v, "o.weight": state[ours + "attn.proj.weight"], "o.bias": torch.zeros(m.dim),
            "norm2.weight": state[ours + "norm2.weight"], "norm2.bias": state[ours + "norm2.bias"],
            "fc1.weight": state[ours + "mlp.0.weight"], "fc1.bias": state[ours + "mlp.0.bias"],
            "fc2.weight": state[ours + "mlp.2.weight"], "fc2.bias": state[ours + "mlp.2.bias"],
        }
        out.update({name.format(i=i): ours_by_part[part] for part, name in _VIT_LAYER.items()})
    return config, out


# transformers 5's ViT layer names (4.x used encoder.layer.{i}.attention.attention.query, ...:
# from_pretrained converts those, so a directory written here loads in both).
_VIT_LAYER = {
    "norm1.weight": "layers.{i}.layernorm_before.weight", "norm1.bias": "layers.{i}.layernorm_before.bias",
    "q": "layers.{i}.attention.q_proj.weight", "k": "layers.{i}.attention.k_proj.weight",
    "v": "layers.{i}.attention.v_proj.weight", "o.weight": "layers.{i}.attention.o_proj.weight",
    "o.bias": "layers.{i}.attention.o_proj.bias",
    "norm2.weight": "layers.{i}.layernorm_after.weight", "norm2.bias": "layers.{i}.layernorm_after.bias",
    "fc1.weight": "layers.{i}.mlp.fc1.weight", "fc1.bias": "layers.{i}.mlp.fc1.bias",
    "fc2.weight": "layers.{i}.mlp.fc2.weight", "fc2.bias": "layers.{i}.mlp.fc2.bias",
}


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn(out: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], conv: str, bn: str, theirs: str) -> None:
    out[theirs + "convolution.weight"] = state[conv + ".weight"]
    for name in _BN:
        out[theirs + "normalization." + name] = state[f"{bn}.{name}"]


def _resnet(backbone: Any, cfg: Any) -> tuple[Any, Dict[str, torch.Tensor]]:
    from transformers import ResNetConfig

    m = cfg.model
    expansion = 4 if m.block == "bottleneck" else 1
    config = ResNetConfig(
        num_channels=cfg.data.channels, embedding_size=m.widths[0], hidden_sizes=[w * expansion for w in m.widths],
        depths=list(m.layers), layer_type=m.block, hidden_act="relu", downsample_in_first_stage=False,
        downsample_in_bottleneck=False, architectures=["ResNetModel"],
    )
    state = backbone.state_dict()
    out: Dict[str, torch.Tensor] = {}
    _conv_bn(out, state, "stem.0", "stem.1", "embedder.embedder.")
    convs = 3 if m.block == "bottleneck" else 2
    for s, count in enumerate(m.layers):
        for b in range(count):
            ours, theirs = f"stages.{s}.{b}.", f"encoder.stages.{s}.layers.{b}."
            for c in range(convs):
                _conv_bn(out, state, ours + f"conv{c + 1}", ours + f"bn{c + 1}", theirs + f"layer.{c}.")
            if ours + "shortcut.0.weight" in state:
                _conv_bn(out, state, ours + "shortcut.0", ours + "shortcut.1", theirs + "shortcut.")
    return config, out


def save_image_processor(cfg: Any, directory: Path) -> None:
    """Resize to the pretraining size, rescale to [0, 1], normalise as our models do inside."""
    from transformers import ViTImageProcessor

    channels, size = cfg.data.channels, cfg.data.image_size
    ViTImageProcessor(
        do_resize=True, size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[cfg.model.mean] * channels, image_std=[cfg.model.std] * channels,
    ).save_pretrained(str(directory))


def export_backbone_hf(objective: Any, directory: Path) -> Dict[str, Any]:
    import transformers

    from framework.evaluate.backbone import image_backbone

    cfg = objective.cfg
    architecture = check_backbone(cfg)
    backbone = image_backbone(objective)
    config, weights = (_vit if architecture == "ViTModel" else _resnet)(backbone, cfg)
    with torch.random.fork_rng(devices=[]):
        model = getattr(transformers, architecture)(config)
    missing, unexpected = model.load_state_dict({k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.clone()
                                                 for k, v in weights.items()}, strict=False)
    if missing or unexpected:
        raise ConfigError(f"export: the {architecture} mapping left out {missing[:3]} / unexpected {unexpected[:3]}")
    model.save_pretrained(str(directory))
    save_image_processor(cfg, directory)
    return {"architecture": architecture, "auto_class": "AutoModel"}
