"""Fine-tuning's parts: layer-wise lr decay, the smoothed / mixed cross-entropy, pooled text
features that padding does not change, label subsets written as shards, the run config of one
fine-tuning run, and the writers' metadata list files that give labels and groups."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from framework.errors import ConfigError


def tiny_vit_encoder():
    from framework.evaluate.downstream.encoders import DownstreamEncoder
    from framework.models.vit import ViT, ViTConfig

    return DownstreamEncoder(ViT(ViTConfig(patch_size=2, dim=16, depth=2, heads=2), 1), "image")


def test_layer_decay_gives_each_layer_its_rate():
    from framework.training.optim import layer_decay_groups

    encoder = tiny_vit_encoder()
    model = torch.nn.ModuleDict({"encoder": encoder, "head": torch.nn.Linear(16, 3)})
    layers = encoder.num_layers
    assert layers == 2

    def layer_of(name: str) -> int:
        return layers + 1 if name.startswith("head.") else encoder.layer_of(name[len("encoder."):])

    groups = layer_decay_groups(model, 0.05, 1.0, layer_of, layers, 0.5)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(rate) == len(named)  # every parameter in exactly one group
    assert rate[id(named["encoder.core.patch_embed.weight"])] == (0.125, 0.05)  # embeddings: 0.5 ** 3
    assert rate[id(named["encoder.core.blocks.0.attn.qkv.weight"])] == (0.25, 0.05)
    assert rate[id(named["encoder.core.blocks.1.mlp.0.bias"])] == (0.5, 0.0)  # 1-d: no weight decay
    assert rate[id(named["encoder.core.norm.weight"])] == (1.0, 0.0)
    assert rate[id(named["head.weight"])] == (1.0, 0.05)


def test_cross_entropy_with_smoothing_and_mixup():
    from framework.losses.classification import mixed_cross_entropy

    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    assert torch.allclose(mixed_cross_entropy(logits, labels, 0.1), F.cross_entropy(logits, labels, label_smoothing=0.1))
    permutation, lam = torch.tensor([5, 4, 3, 2, 1, 0]), 0.3
    mixed = mixed_cross_entropy(logits, labels, 0.0, permutation, lam)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[permutation])
    assert torch.allclose(mixed, expected)


@pytest.mark.parametrize("causal,pooling", [(False, "mean"), (True, "last")])
def test_text_features_do_not_depend_on_padding(causal, pooling):
    from framework.evaluate.downstream.encoders import DownstreamEncoder
    from framework.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    core = Transformer(TransformerConfig(dim=16, depth=2, heads=2, max_seq_len=32), 50, causal=causal)
    encoder = DownstreamEncoder(core, "text", pooling, pad_id=0).eval()
    short = torch.tensor([[5, 6, 7]])
    padded = {"tokens": torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]),
              "valid": torch.tensor([[True, True, True, False, False], [True] * 5])}
    alone = encoder({"tokens": short, "valid": torch.ones_like(short, dtype=torch.bool)})
    together = encoder(padded)
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    hidden = core(short)
    assert torch.allclose(alone[0], hidden[0, -1] if pooling == "last" else hidden[0].mean(0), atol=1e-5)


def test_subset_shards_hold_exactly_the_chosen_samples(tmp_path):
    from framework.data.images import key_id
    from framework.data.writers.shard_writer import ShardWriter
    from framework.evaluate.downstream.finetune import scan_labels, write_subset

    with ShardWriter(tmp_path / "all", modality="text", max_samples=4) as writer:
        for i in range(10):
            writer.write(f"doc{i}", {"txt": f"text {i}".encode(), "cls": str(i % 2).encode()})
    index = scan_labels(str(tmp_path / "all"), "data.train")
    assert index.labels.tolist() == [i % 2 for i in range(10)]
    keep = np.array([key_id(f"doc{i}") for i in (1, 4, 7)])
    out = write_subset(str(tmp_path / "all"), "data.train", keep, tmp_path / "subset")
    subset = scan_labels(out, "data.train")
    assert sorted(subset.ids.tolist()) == sorted(keep.tolist()) and sorted(subset.labels.tolist()) == [0, 1, 1]
    assert write_subset(str(tmp_path / "all"), "data.train", keep[:1], tmp_path / "subset") == out  # written once


def test_run_config_of_one_finetuning(tmp_path):
    from framework.config.load import load_config
    from framework.evaluate.downstream.finetune import check_overrides, run_config

    pretrained = load_config("configs/experiments/simclr-digits.yaml", ["data.image_size=8", "data.channels=1"])
    cfg = run_config(pretrained, tmp_path / "ckpt", "train/", "val/", 10, 12, 2, True, tmp_path / "run",
                     ["optim.lr=0.01", "objective.layer_decay=0.5"])
    assert cfg.objective.name == "finetune" and cfg.objective.from_scratch and cfg.objective.num_classes == 10
    assert cfg.model == pretrained.model and cfg.data.image_size == 8 and cfg.run.seed == 2
    assert cfg.data.batch_size == 12, "a 12-sample subset cannot fill the default batch of 32"
    assert cfg.optim.lr == 0.01 and cfg.objective.layer_decay == 0.5 and cfg.trainer.max_steps == 300
    with pytest.raises(ConfigError, match="unknown key 'objective.layer_decy'"):
        run_config(pretrained, tmp_path, "t", "v", 10, 12, 0, False, tmp_path, ["objective.layer_decy=0.5"])
    with pytest.raises(ConfigError, match="run.dir is set by `pretrain eval finetune` itself"):
        check_overrides(["run.dir=/elsewhere"])


def test_text_writer_takes_labels_and_groups_from_a_metadata_file(tmp_path):
    from framework.data.writers.text import write_text_shards

    for name, text in (("a.py", "import os\n"), ("b.py", "import sys\n"), ("c.py", "x = 1\n"), ("d.py", "y = 2\n")):
        (tmp_path / name).write_text(text)
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(row) for row in (
        {"path": "a.py", "label": "zeta", "length": "short"}, {"path": "b.py", "label": "alpha", "length": "long"},
        {"path": "c.py", "label": "zeta", "length": "long"})) + "\n")
    summary = write_text_shards([str(tmp_path / f"{n}.py") for n in "abcd"], str(tmp_path / "out"),
                                metadata=str(tmp_path / "meta.jsonl"), workers=1)
    assert summary["samples"] == 4
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == ["alpha", "zeta"]
    members = {}
    for path in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    texts = {members[n].decode(): n.rsplit(".", 1)[0] for n in members if n.endswith(".txt")}
    key_of = {text.split()[-1]: key for text, key in texts.items()}
    assert members[f"{key_of['os']}.cls"] == b"1" and members[f"{key_of['sys']}.cls"] == b"0"
    assert json.loads(members[f"{key_of['sys']}.json"]) == {"label": "alpha", "length": "long", "source": "b.py"}
    assert f"{key_of['2']}.json" not in members and f"{key_of['2']}.cls" not in members  # d.py is not listed


def test_image_writer_puts_metadata_columns_into_the_json(tmp_path):
    from run_helpers import png

    from framework.data.writers.images import write_image_shards

    for i in range(3):
        (tmp_path / "imgs" / "0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / "0" / f"{i}.png").write_bytes(png(np.full((8, 8), 40 * i, np.uint8)))
    (tmp_path / "meta.tsv").write_text("path\tstroke\n" + "".join(f"{tmp_path}/imgs/0/{i}.png\t{'thin' if i else 'thick'}\n"
                                                                  for i in range(3)))
    write_image_shards([str(tmp_path / "imgs")], str(tmp_path / "out"), metadata=str(tmp_path / "meta.tsv"))
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        strokes = sorted(json.loads(tar.extractfile(m).read())["stroke"] for m in tar.getmembers() if m.name.endswith(".json"))
    assert strokes == ["thick", "thin", "thin"]
    (tmp_path / "bad.tsv").write_text("path\tsource\nx.png\t1\n")
    with pytest.raises(Exception, match="column 'source' is a field the image writer sets itself"):
        write_image_shards([str(tmp_path / "imgs")], str(tmp_path / "out2"), metadata=str(tmp_path / "bad.tsv"))
