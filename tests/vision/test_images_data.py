"""Image shards: the writer (class folders, list files, caps, manifest), `pretrain shards images`,
decoding to one size and channel count, and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vision_helpers import png, run_cli
from framework.data.images import ImageDecoder, decode_image, image_facts
from framework.data.sources import resolve_shards
from framework.data.tar import iter_samples
from framework.data.writers.images import write_image_shards
from framework.errors import ConfigError, DataError, SampleError


def samples(directory) -> list[tuple[str, dict]]:
    out = []
    for shard in resolve_shards(str(directory)):
        with open(shard.url, "rb") as stream:
            out += [(key, sample) for key, sample, _ in iter_samples(stream)]
    return out


def rgb_png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_class_folders_become_labels_and_manifest(digit_shards):
    written = samples(digit_shards["train"])
    assert len(written) == 192 and all(set(s) == {"png", "cls"} for _, s in written)
    manifest = json.loads((digit_shards["train"] / "manifest.json").read_text())
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["image_size"] == 8 and manifest["channels"] == 1 and manifest["labelled"]
    assert image_facts(resolve_shards(str(digit_shards["train"]))) == (8, 1)
    labels = sorted(int(s["cls"]) for _, s in written)
    assert labels[0] == 0 and labels[-1] == 9


def test_list_file_cap_split_and_bad_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(12):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(rgb_png(10 + i % 3, 12))
        lines.append(f"imgs/{i}.png {i % 2}")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    lines.append("imgs/broken.png 1")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    summary = write_image_shards([], str(tmp_path / "out"), list_file=str(tmp_path / "list.txt"), max_samples=13,
                                 val_fraction=0.3, seed=1)
    assert summary["images"] == 12 and len(summary["skipped"]) == 1
    assert summary["splits"]["train"]["samples"] > 0 and summary["splits"]["val"]["samples"] > 0
    capped = write_image_shards([], str(tmp_path / "capped"), list_file=str(tmp_path / "list.txt"), max_samples=5)
    assert capped["images"] + len(capped["skipped"]) == 5
    manifest = json.loads((tmp_path / "capped" / "manifest.json").read_text())
    assert "image_size" not in manifest, "sizes differ: no single image_size to record"


def test_list_file_errors_name_the_line(tmp_path):
    (tmp_path / "list.txt").write_text("missing.png 3\n")
    with pytest.raises(DataError, match=r"list.txt:1: image not found"):
        write_image_shards([], str(tmp_path / "o"), list_file=str(tmp_path / "list.txt"))


def test_decoder_resizes_converts_and_labels():
    rgb = rgb_png(20, 10)
    image = decode_image(rgb, 1, 8)
    assert image.shape == (1, 8, 8) and image.dtype == np.uint8
    assert decode_image(png(np.zeros((4, 4), np.uint8)), 3, 4).shape == (3, 4, 4)
    train = ImageDecoder(8, 3)
    (item,) = train("k1", {"png": rgb, "cls": b"7"}, "shard.tar")
    assert isinstance(item, np.ndarray) and item.shape == (3, 8, 8), "training items carry no label"
    (image, label, key) = ImageDecoder(8, 3, with_labels=True)("k1", {"png": rgb, "cls": b"7"}, "shard.tar")[0]
    assert label == 7 and key >= 0
    viewed = ImageDecoder(8, 3, with_labels=True)("k1", {"png": memoryview(rgb), "cls": memoryview(b"7")}, "s.tar")[0]
    assert np.array_equal(viewed[0], image) and viewed[1] == 7, "data.zero_copy hands out memoryviews"
    with pytest.raises(SampleError, match="no image member"):
        train("k2", {"txt": b"x"}, "shard.tar")
    with pytest.raises(SampleError, match="cannot decode"):
        train("k3", {"png": b"garbage"}, "shard.tar")


def test_cli_shards_images_and_mae_needs_a_vit(tmp_path, digit_shards):
    output = run_cli(["shards", "images", "--input", str(digit_shards["root"] / "png" / "val"), "--output",
                      str(tmp_path / "shards"), "--val-fraction", "0.25"])
    assert "64 images, 10 classes" in output
    with pytest.raises(ConfigError, match="model.name=vit"):
        from framework.config.load import load_config
        from framework.objectives import objective_module

        cfg = load_config(None, ["objective.name=mae", "model.name=resnet", f"data.train={tmp_path / 'shards' / 'train'}"])
        objective_module("mae").build(cfg)
