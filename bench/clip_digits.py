"""Proof that CLIP (and SigLIP) learn: scikit-learn's digits as image-caption pairs.

1. The fixed 80/20 split of bench/digits.py. Every training image gets five captions (as COCO
   has), each from varied templates, naming the digit as a word or a numeral ("a handwritten
   seven", "the number 7 written by hand"), and for about half of them a measured attribute:
   "bold" or "thin" (the ink mass's terciles), "slanted left" or "slanted right" (the image's
   second moments). A held-out image gets one caption.
   Pairs -> ``pretrain shards pairs``' writer; a BPE tokenizer on the training captions.
2. ``pretrain fit --config configs/experiments/clip-digits.yaml`` (CLIP's loss), then the same
   with ``objective.loss=siglip`` on the same budget.
3. One table: zero-shot top-1 on the held-out images with prompt templates never used in
   training, image<->text retrieval R@1/R@5 on the held-out pairs, and a 10%-label linear
   probe of the image tower (bench/digits.py's probe) next to raw pixels and a random-init tower.

    .venv/bin/python bench/clip_digits.py                 # clip and siglip
    .venv/bin/python bench/clip_digits.py --losses clip   # one of them
    .venv/bin/python bench/clip_digits.py --prepare       # only write the pairs and the tokenizer
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from digits import as_model_input, digits_split, embed, png_bytes, probe_accuracy  # noqa: E402

WORK = REPO / "runs" / "clip-digits"
DATA = WORK / "data"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_TEMPLATES = [
    "a handwritten {}", "the digit {}", "a photo of the number {}", "{} written by hand", "a scan of a handwritten {}",
    "the number {} in pencil", "a small image of the digit {}", "a {} drawn by someone", "an image of a {}",
    "a picture of the number {}", "someone wrote the digit {}", "this is a handwritten {}",
]
# Never used in training: the zero-shot evaluation's prompts. New phrasings of the training
# captions' words (a word no caption holds is a token the text tower never saw: on 1,437
# captions that tests the vocabulary, not the method).
HELD_OUT_TEMPLATES = ["a picture of a {}.", "this is the number {}.", "an image of the digit {}, drawn by hand.",
                      "a photo of a {} written in pencil."]
SEED = 0
# As COCO: several captions per training image (one pair each), so that no single caption's wording
# can be learned by heart; the held-out images have one each.
CAPTIONS_PER_IMAGE = 5


def attributes(images: np.ndarray) -> list[str]:
    """'bold' / 'thin' by ink-mass terciles, 'slanted left' / 'slanted right' by the sign of the
    image's mixed second moment (strongly slanted thirds); '' for the middle."""
    ink = images.reshape(len(images), -1).sum(1).astype(float)
    low, high = np.quantile(ink, [1 / 3, 2 / 3])
    ys, xs = np.mgrid[0:8, 0:8]
    slants = []
    for image in images.astype(float):
        total = image.sum() + 1e-9
        cy, cx = (image * ys).sum() / total, (image * xs).sum() / total
        slants.append(((image * (ys - cy) * (xs - cx)).sum() / total))
    slant_low, slant_high = np.quantile(slants, [1 / 3, 2 / 3])
    words = []
    for mass, slant in zip(ink, slants):
        weight = "bold" if mass > high else "thin" if mass < low else ""
        lean = "slanted right" if slant < slant_low else "slanted left" if slant > slant_high else ""
        words.append((weight, lean))
    return words


def caption(label: int, weight: str, lean: str, rng: random.Random) -> str:
    name = WORDS[label] if rng.random() < 0.6 else str(label)
    text = rng.choice(TRAIN_TEMPLATES).format(name)
    extra = [w for w in (weight, lean) if w and rng.random() < 0.7]
    text = f"{text}, {' and '.join(extra)}" if extra else text
    return text + "." if rng.random() < 0.5 else text


def prepare() -> dict:
    from framework.data.writers.pairs import write_pair_shards
    from framework.text.tokenizer import train_tokenizer

    split = digits_split()
    done = DATA / "done.json"
    if done.exists():
        return split
    shutil.rmtree(DATA, ignore_errors=True)
    rng = random.Random(SEED)
    for name, (images, labels) in split.items():
        folder = DATA / "png" / name
        folder.mkdir(parents=True)
        rows = []
        for index, (image, label, (weight, lean)) in enumerate(zip(images, labels, attributes(images))):
            path = folder / f"{index:05d}.png"
            path.write_bytes(png_bytes(image))
            for _ in range(CAPTIONS_PER_IMAGE if name == "train" else 1):
                rows.append({"image": path.name, "caption": caption(int(label), weight, lean, rng), "label": int(label)})
        listing = folder / "pairs.jsonl"
        listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
        out = DATA / "shards" / ("train" if name == "train" else "val")
        write_pair_shards([str(listing)], str(out), max_samples_per_shard=256, seed=SEED, overwrite=True)
        (DATA / f"captions-{name}.txt").write_text("\n".join(row["caption"] for row in rows) + "\n")
        print(f"[clip-digits] {name}: {len(rows)} pairs -> {out}", flush=True)
    train_tokenizer([str(DATA / "captions-train.txt")], str(DATA / "tokenizer.json"), vocab_size=400)
    done.write_text("{}")
    return split


def pretrain(loss: str, extra: list[str]) -> tuple[Path, float]:
    run_dir = WORK / loss
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "framework.cli", "fit", "--config", "configs/experiments/clip-digits.yaml",
               f"objective.loss={loss}", f"run.dir={run_dir}", "logging.wandb=disabled", "logging.progress=false", *extra]
    print(f"[clip-digits] {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    if result.returncode != 0:
        raise SystemExit(f"[clip-digits] pretraining {loss} failed (exit code {result.returncode})")
    return run_dir, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    parser.add_argument("--prepare", action="store_true", help="only write the pairs and the tokenizer")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides for every fit, e.g. --set trainer.max_steps=100")
    args = parser.parse_args(argv)
    split = prepare()
    if args.prepare:
        return []
    import torch

    from framework import load_backbone
    from framework.config.load import load_config
    from framework.evaluate.zeroshot import evaluate_retrieval, evaluate_zeroshot
    from framework.objectives.vision_common import build_backbone

    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    rows: list[dict] = []
    raw = probe_accuracy(x_train.reshape(len(x_train), -1) / 255.0, y_train, x_test.reshape(len(x_test), -1) / 255.0, y_test)
    rows.append({"method": "raw pixels (64)", "probe": raw})
    for loss in args.losses:
        run_dir, seconds = pretrain(loss, args.overrides)
        cfg = load_config(str(run_dir / "config.yaml"), [])
        zeroshot = evaluate_zeroshot(run_dir, str(DATA / "shards" / "val"), WORDS, HELD_OUT_TEMPLATES)
        retrieval = evaluate_retrieval(run_dir, str(DATA / "shards" / "val"))
        train_in, test_in = as_model_input(x_train, cfg.data.image_size), as_model_input(x_test, cfg.data.image_size)
        backbone = load_backbone(run_dir)
        probe = probe_accuracy(embed(backbone, train_in), y_train, embed(backbone, test_in), y_test)
        rows.append({"method": f"{loss} ({cfg.model.name}, {cfg.trainer.max_steps} steps)", "zeroshot": zeroshot["top1"],
                     "retrieval": retrieval, "probe": probe, "seconds": seconds})
        print(f"[clip-digits] {loss}: zero-shot {zeroshot['top1']:.4f}, probe {probe[0]:.4f} ({seconds:.0f} s)", flush=True)
        if len(rows) == 2:  # the same image tower, untrained
            torch.manual_seed(SEED)
            tower = build_backbone(cfg).eval()
            rows.insert(1, {"method": f"random-init {cfg.model.name} tower", "probe": probe_accuracy(
                embed(tower, train_in), y_train, embed(tower, test_in), y_test)})
    print()
    print(f"digits as pairs: {len(x_train)} train / {len(x_test)} held-out; zero-shot with {len(HELD_OUT_TEMPLATES)} "
          "templates never used in training (chance 0.10); probe: logistic regression, 10% labels, mean ± std of 5 subsets")
    print("| method | zero-shot top-1 | I->T R@1 | I->T R@5 | T->I R@1 | T->I R@5 | probe (10% labels) | pretrain s |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        r = row.get("retrieval")
        cells = [f"{row['zeroshot']:.4f}" if "zeroshot" in row else ""]
        cells += [f"{r[k]:.4f}" for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")] if r else ["", "", "", ""]
        cells += [f"{row['probe'][0]:.4f} ± {row['probe'][1]:.4f}", f"{row['seconds']:.0f}" if "seconds" in row else ""]
        print(f"| {row['method']} | " + " | ".join(cells) + " |")
    (WORK / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
