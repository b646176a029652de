"""Proof that the vision objectives learn: scikit-learn's digits, pretrain, linear probe with 10% of labels.

1. scikit-learn's ``load_digits`` (1797 labelled 8x8 grayscale images) -> PNG files in class
   folders -> image shards (``pretrain shards images``' writer) under ``runs/digits/data``:
   ``shards/train`` (80%, stratified, fixed seed) and ``shards/val`` (the held-out 20% test split).
   The training shards carry labels too, but pretraining never reads them.
2. Each method is pretrained on the training images with
   ``pretrain fit --config configs/experiments/<method>-digits.yaml`` (a fixed step budget, CPU).
3. Its backbone is loaded with ``framework.load_backbone`` and frozen; a logistic-regression
   probe (standardised features, C chosen by 5-fold CV on the labelled subset) is fitted on a
   stratified 10% of the training images and scored on the test split; mean over 5 subsets.
4. One table: every method, raw pixels, and randomly initialised backbones.

``beit`` takes its visual tokens from the SimCLR run's backbone (``tokenizer: teacher``), so it
runs after ``simclr``; ``beit-pixels`` (on request) is BEiT with the teacher-free k-means tokenizer.

    .venv/bin/python bench/digits.py                      # all six methods
    .venv/bin/python bench/digits.py --methods simclr     # some of them
    .venv/bin/python bench/digits.py --prepare            # only write the shards
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Names of configs/experiments/<name>-digits.yaml, in run order (beit reads simclr's run);
# the default run is the six methods, beit-pixels on request.
METHODS = ("simclr", "moco_v3", "byol", "dino", "mae", "beit", "beit-pixels")
DEFAULT_METHODS = METHODS[:6]
TEACHER_OF = {"beit": "simclr"}
WORK = REPO / "runs" / "digits"
DATA = WORK / "data"
TEST_FRACTION = 0.2
LABEL_FRACTION = 0.1
SUBSETS = 5
SEED = 0


def digits_split() -> dict:
    """The fixed split: uint8 images (N, 8, 8) in [0, 255] and labels, train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, random_state=SEED, stratify=digits.target
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image, mode="L").save(out, format="PNG")
    return out.getvalue()


def prepare(data: Path = DATA) -> dict:
    """Write the PNG folders and the shards (once; an existing complete write is kept)."""
    from framework.data.writers.images import write_image_shards

    split = digits_split()
    shards = data / "shards"
    if (shards / "train" / "manifest.json").exists() and (shards / "val" / "manifest.json").exists():
        return split
    for name, (images, labels) in split.items():
        folder = data / "png" / name
        shutil.rmtree(folder, ignore_errors=True)
        for index, (image, label) in enumerate(zip(images, labels)):
            path = folder / str(label) / f"{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(image))
        out = shards / ("train" if name == "train" else "val")
        summary = write_image_shards([str(folder)], str(out), max_samples_per_shard=256, seed=SEED, overwrite=True)
        print(f"[digits] {name}: {summary['images']} images, {len(summary['classes'])} classes -> {out}", flush=True)
    return split


def as_model_input(images: np.ndarray, size: int) -> "torch.Tensor":
    """The same decode + resize the training loader applies, as float (N, 1, size, size) in [0, 1]."""
    import torch

    from framework.data.images import decode_image

    arrays = [decode_image(png_bytes(image), 1, size) for image in images]
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def embed(backbone, images: "torch.Tensor") -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.cat([backbone(images[i : i + 512]) for i in range(0, len(images), 512)]).numpy()


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   folds: int = 5) -> tuple[float, float]:
    """Mean and std of test accuracy over SUBSETS stratified 10% label subsets of the training split."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import warnings

    # scikit-learn >= 1.8 announces changes of LogisticRegressionCV's defaults on every fit.
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    scores = []
    for subset in range(SUBSETS):
        x, _, y, _ = train_test_split(train_x, train_y, train_size=LABEL_FRACTION, random_state=subset, stratify=train_y)
        probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=folds, max_iter=5000))
        probe.fit(x, y)
        scores.append(probe.score(test_x, test_y))
    return float(np.mean(scores)), float(np.std(scores))


def pretrain(method: str, extra: list[str]) -> tuple[Path, float]:
    run_dir = WORK / method
    shutil.rmtree(run_dir, ignore_errors=True)  # always from scratch: one run, one budget
    command = [sys.executable, "-m", "framework.cli", "fit", "--config", f"configs/experiments/{method}-digits.yaml",
               f"run.dir={run_dir}", "logging.wandb=disabled", "logging.progress=false", *extra]
    print(f"[digits] {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    # The cores split between the processes: oversubscribed threads make small convolutions
    # tens of times slower. (One process is the faster choice here: these models are so small
    # that DDP's gradient all-reduce over gloo costs more than the second core gives.)
    from framework.config.load import load_config

    devices = load_config(f"configs/experiments/{method}-digits.yaml", list(extra)).trainer.devices
    threads = str(max(1, (os.cpu_count() or 1) // max(devices, 1)))
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": threads})
    if result.returncode != 0:
        raise SystemExit(f"[digits] pretraining {method} failed (exit code {result.returncode})")
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    return checkpoints[-1], time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--prepare", action="store_true", help="only write the shards")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides for every fit, e.g. --set trainer.max_steps=100")
    args = parser.parse_args(argv)

    methods = [m for m in METHODS if m in args.methods]  # run order: a teacher before its student
    for method in methods:
        teacher = TEACHER_OF.get(method)
        if teacher and teacher not in methods and not list((WORK / teacher / "checkpoints").glob("step-*.ckpt")):
            parser.error(f"{method} needs a {teacher} run first (its tokenizer's teacher): add --methods {teacher}")
    split = prepare()
    if args.prepare:
        return []
    import torch

    from framework import load_backbone
    from framework.config.load import load_config
    from framework.objectives.vision_common import build_backbone

    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    rows: list[dict] = []
    raw = probe_accuracy(x_train.reshape(len(x_train), -1) / 255.0, y_train, x_test.reshape(len(x_test), -1) / 255.0, y_test)
    rows.append({"method": "raw pixels (64)", "acc": raw, "seconds": 0.0})
    random_done: set[str] = set()
    for method in methods:
        checkpoint, seconds = pretrain(method, args.overrides)
        cfg = load_config(str(WORK / method / "config.yaml"), [])
        size = cfg.data.image_size
        train_in, test_in = as_model_input(x_train, size), as_model_input(x_test, size)
        backbone = load_backbone(str(checkpoint))
        acc = probe_accuracy(embed(backbone, train_in), y_train, embed(backbone, test_in), y_test)
        rows.append({"method": f"{method} ({cfg.model.name}, {cfg.trainer.max_steps} steps)", "acc": acc, "seconds": seconds})
        print(f"[digits] {method}: probe accuracy {acc[0]:.4f} ± {acc[1]:.4f}  ({seconds:.0f} s)", flush=True)
        architecture = repr(cfg.model)  # the dataclass repr lists every field
        if architecture not in random_done:  # the same architecture, untrained
            random_done.add(architecture)
            torch.manual_seed(SEED)
            random_backbone = build_backbone(cfg).eval()
            acc = probe_accuracy(embed(random_backbone, train_in), y_train, embed(random_backbone, test_in), y_test)
            rows.append({"method": f"random-init {cfg.model.name} (as {method})", "acc": acc, "seconds": 0.0})

    labelled = int(round(len(x_train) * LABEL_FRACTION))
    print()
    print(f"digits: {len(x_train)} train / {len(x_test)} test images; probe: logistic regression on frozen features, "
          f"{labelled} labels (10%), mean ± std over {SUBSETS} label subsets")
    print(f"| {'method':<40} | {'probe accuracy':>15} | {'pretrain s':>10} |")
    print(f"|{'-' * 42}|{'-' * 16}:|{'-' * 11}:|")
    for row in rows:
        mean, std = row["acc"]
        seconds = f"{row['seconds']:.0f}" if row["seconds"] else ""
        print(f"| {row['method']:<40} | {mean:.4f} ± {std:.4f} | {seconds:>10} |")
    (WORK / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
