"""Proof that wav2vec 2.0 and HuBERT learn: spoken digits in eight English accents.

1. Synthesis: Debian's ``espeak-ng`` says "zero" ... "nine" in 8 accents x 6 voice variants x
   4 takes at a random speed (100-240 words/min) and pitch (0-99) = 1,920 clips (22.05 kHz WAV; the loader resamples them to 16 kHz with
   soxr). A fixed 80/20 split, stratified by digit and accent; ``pretrain shards audio`` writes
   each part with the digit as the label (its folder), the word as the transcript, and the
   accent, voice, speed and pitch in each sample's json (a metadata.jsonl list file).
2. Pretraining on the training clips (labels never read), a few CPU minutes each:
   wav2vec 2.0 (configs/experiments/wav2vec2-digits.yaml); HuBERT iteration 1 on 39-dim MFCC
   k-means targets (``pretrain audio targets --features mfcc``), then iteration 2 on k-means of
   its own layer features (``--features RUN --layer L``), from scratch, as the paper does.
3. The table: a logistic probe on mean-pooled frozen features with 10% of the training labels
   (mean +- std over 5 label subsets), on the fixed split and with two accents (``en-gb-scotland``
   and ``en-029``) held out of the probe's training set and tested alone; next to MFCC mean+std
   features and the random-init encoder. Plus each target set's purity and PNMI against the
   digits and wav2vec 2.0's codebook perplexity along the run.

    .venv/bin/python bench/spoken_digits.py                       # everything (~20 min on 2 cores)
    .venv/bin/python bench/spoken_digits.py --methods wav2vec2    # one method (and the baselines)
    .venv/bin/python bench/spoken_digits.py --prepare             # only synthesise and write the shards
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

from digits import SUBSETS, probe_accuracy  # noqa: E402  (the same 10%-label probe as the vision table)

WORK = REPO / "runs" / "spoken-digits"
DATA = WORK / "data"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VOICES = ["m1", "m3", "m5", "f1", "f3", "f5"]
TAKES = 4  # clips per (digit, accent, voice), each at a random speed and pitch
SPEED = (100, 240)  # words per minute
PITCH = (0, 99)
HELD_OUT = ["en-gb-scotland", "en-029"]
SEED = 0
SAMPLE_RATE = 16000


def clip_name(digit: int, accent: str, voice: str, speed: int, pitch: int) -> str:
    return f"{digit}/{accent}+{voice}_s{speed}_p{pitch}.wav"


def prepare() -> None:
    """Synthesise the clips and write the train / val shards (once)."""
    from framework.data.writers.audio import write_audio_shards

    done = DATA / "done.json"
    if done.exists():
        return
    if shutil.which("espeak-ng") is None:
        raise SystemExit("[spoken-digits] needs Debian's espeak-ng (apt-get install espeak-ng; `make test` installs it as root)")
    shutil.rmtree(DATA, ignore_errors=True)
    draw = random.Random(SEED)
    clips = [(d, a, v, draw.randint(*SPEED), draw.randint(*PITCH))
             for d in range(10) for a in ACCENTS for v in VOICES for _ in range(TAKES)]
    groups: dict[tuple[int, str], list] = {}
    for clip in clips:
        groups.setdefault(clip[:2], []).append(clip)
    rng = random.Random(SEED)
    split = {}
    for members in groups.values():  # 80/20 within every (digit, accent): stratified by both
        rng.shuffle(members)
        cut = int(round(0.8 * len(members)))
        split.update({clip: "train" if i < cut else "val" for i, clip in enumerate(members)})
    start = time.perf_counter()
    metadata: dict[str, list[str]] = {"train": [], "val": []}
    for clip in clips:
        digit, accent, voice, speed, pitch = clip
        path = DATA / "wav" / split[clip] / clip_name(*clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["espeak-ng", "-v", f"{accent}+{voice}", "-s", str(speed), "-p", str(pitch), "-w", str(path),
                        WORDS[digit]], check=True)
        path.with_suffix(".txt").write_text(WORDS[digit] + "\n")
        metadata[split[clip]].append(json.dumps({"path": clip_name(*clip), "accent": accent, "voice": voice,
                                                 "speed": speed, "pitch": pitch}))
    print(f"[spoken-digits] {len(clips)} clips synthesised in {time.perf_counter() - start:.0f} s", flush=True)
    for part in ("train", "val"):
        listing = DATA / "wav" / part / "metadata.jsonl"  # accent, voice, speed, pitch -> each sample's json
        listing.write_text("\n".join(metadata[part]) + "\n")
        summary = write_audio_shards([str(DATA / "wav" / part)], str(DATA / "shards" / part), labels_from_folders=True,
                                     transcripts=str(listing), max_samples_per_shard=200, seed=SEED, overwrite=True)
        print(f"[spoken-digits] {part}: {summary['samples']} clips, {summary['seconds']:.0f} s of audio -> "
              f"{summary['shards']} shards", flush=True)
    done.write_text("{}")


def read_part(part: str) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """A part's clips as the loader gives them (16 kHz, normalised), digits and accents, in key order."""
    from framework.data.audio import audio_member, decode_audio
    from framework.data.sources import open_shard, resolve_shards
    from framework.data.tar import iter_samples

    waves, labels, accents = [], [], []
    for shard in resolve_shards(str(DATA / "shards" / part)):
        with open_shard(shard.url) as stream:
            for key, sample, _ in iter_samples(stream):
                wave = decode_audio(bytes(audio_member(sample)), SAMPLE_RATE)
                waves.append((wave - wave.mean()) / (wave.std() + 1e-7))
                labels.append(int(bytes(sample["cls"])))
                accents.append(json.loads(bytes(sample["json"]))["accent"])
    return waves, np.array(labels), accents


def mfcc_features(waves: list[np.ndarray]) -> np.ndarray:
    """MFCC (13 + deltas + delta-deltas) mean and std over each clip: 78 numbers."""
    from framework.data.audio_targets import mfcc

    rows = []
    for wave in waves:
        frames = mfcc(wave, SAMPLE_RATE, n_fft=400, hop=160)
        rows.append(np.concatenate([frames.mean(0), frames.std(0)]))
    return np.stack(rows)


def encoder_features(encoder, waves: list[np.ndarray], batch: int = 64) -> np.ndarray:
    import torch

    from framework.data.audio import collate_audio

    rows = []
    with torch.no_grad():
        for start in range(0, len(waves), batch):
            padded = collate_audio([(w, len(w)) for w in waves[start : start + batch]])
            rows.append(encoder(padded["wave"], padded["length"]).float().numpy())
    return np.concatenate(rows)


def both_splits(features: dict, data: dict) -> dict:
    """{"random": probe on the fixed split, "accents": trained without HELD_OUT, tested on them alone}."""
    (train_y, train_a), (val_y, val_a) = data["train"][1:], data["val"][1:]
    seen = np.array([a not in HELD_OUT for a in train_a])
    held = np.concatenate([~seen, np.array([a in HELD_OUT for a in val_a])])
    everything, labels = np.concatenate([features["train"], features["val"]]), np.concatenate([train_y, val_y])
    # 3 folds: 152 labelled clips (10%) leave about 5 of a digit per fold
    return {"random": probe_accuracy(features["train"], train_y, features["val"], val_y, folds=3),
            "accents": probe_accuracy(features["train"][seen], train_y[seen], everything[held], labels[held], folds=3)}


def run_cli(args: list[str]) -> float:
    print(f"[spoken-digits] pretrain {' '.join(args)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    result = subprocess.run([sys.executable, "-m", "framework.cli", *args], cwd=REPO, env=env)
    if result.returncode != 0:
        raise SystemExit(f"[spoken-digits] `pretrain {' '.join(args)}` failed (exit code {result.returncode})")
    return time.perf_counter() - start


def fit(name: str, config: str, extra: list[str]) -> tuple[Path, float]:
    run_dir = WORK / name
    shutil.rmtree(run_dir, ignore_errors=True)  # from scratch: one run, one budget
    seconds = run_cli(["fit", "--config", config, f"run.dir={run_dir}", "logging.wandb=disabled",
                       "logging.progress=false", *extra])
    return run_dir, seconds


def targets(name: str, features: list[str]) -> tuple[Path, dict, float]:
    out = WORK / f"targets-{name}"
    seconds = run_cli(["audio", "targets", "--shards", str(DATA / "shards" / "train"), "--output", str(out),
                       "--features", *features, "--clusters", "100", "--overwrite"])
    return out, json.loads((out / "meta.json").read_text())["quality"], seconds


def perplexities(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["train/code_perplexity"] for row in rows if "train/code_perplexity" in row]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["wav2vec2", "hubert"], choices=["wav2vec2", "hubert"])
    parser.add_argument("--prepare", action="store_true", help="only synthesise the clips and write the shards")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides for every fit, e.g. --set trainer.max_steps=100")
    args = parser.parse_args(argv)
    prepare()
    if args.prepare:
        return []
    import torch

    from framework import load_backbone
    from framework.config.load import load_config
    from framework.models.audio_encoder import AudioEncoder

    data = {part: read_part(part) for part in ("train", "val")}
    print(f"[spoken-digits] {len(data['train'][0])} training clips, {len(data['val'][0])} held-out", flush=True)
    rows = [{"method": "MFCC mean+std (78)", **both_splits({p: mfcc_features(data[p][0]) for p in data}, data)}]
    quality: list[dict] = []

    def evaluate(label: str, run_dir: Path, seconds: float, **extra) -> None:
        encoder = load_backbone(run_dir)
        row = {"method": label, "seconds": seconds, **extra,
               **both_splits({p: encoder_features(encoder, data[p][0]) for p in data}, data)}
        rows.append(row)
        print(f"[spoken-digits] {label}: random split {row['random'][0]:.4f}, accents held out {row['accents'][0]:.4f}",
              flush=True)
        if len(rows) == 2:  # the same encoder, untrained
            torch.manual_seed(SEED)
            cfg = load_config(str(run_dir / "config.yaml"), [])
            untrained = AudioEncoder(cfg.model).eval()
            rows.insert(1, {"method": "random-init encoder", **both_splits(
                {p: encoder_features(untrained, data[p][0]) for p in data}, data)})

    if "wav2vec2" in args.methods:
        run_dir, seconds = fit("wav2vec2", "configs/experiments/wav2vec2-digits.yaml", args.overrides)
        curve = perplexities(run_dir)
        evaluate("wav2vec 2.0", run_dir, seconds, perplexity=(min(curve), curve[-1]) if curve else None)
    if "hubert" in args.methods:
        first, q1, s1 = targets("mfcc", ["mfcc", "--config", "configs/experiments/hubert-digits.yaml"])
        quality.append({"targets": "iteration 1: MFCC k-means", **q1})
        run_dir, seconds = fit("hubert-1", "configs/experiments/hubert-digits.yaml", [f"objective.targets={first}", *args.overrides])
        evaluate("HuBERT iteration 1", run_dir, seconds + s1)
        layer = load_config(str(run_dir / "config.yaml"), []).model.depth // 2 + 1
        second, q2, s2 = targets("it2", [str(run_dir), "--layer", str(layer)])
        quality.append({"targets": f"iteration 2: layer {layer} of iteration 1, k-means", **q2})
        run_dir, seconds = fit("hubert-2", "configs/experiments/hubert-digits.yaml", [f"objective.targets={second}", *args.overrides])
        evaluate("HuBERT iteration 2", run_dir, seconds + s2)

    print()
    print(f"spoken digits: {len(data['train'][0])} training / {len(data['val'][0])} held-out clips, 8 accents; "
          f"probe: logistic regression on mean-pooled frozen features, 10% labels, mean ± std of {SUBSETS} subsets; "
          f"accents held out: trained without {' and '.join(HELD_OUT)}, tested on them alone")
    print("| features | random split | accents held out | pretrain s |")
    print("|---|--:|--:|--:|")
    for row in rows:
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else ""
        print(f"| {row['method']} | {row['random'][0]:.4f} ± {row['random'][1]:.4f} | "
              f"{row['accents'][0]:.4f} ± {row['accents'][1]:.4f} | {seconds} |")
    for row in rows:
        if row.get("perplexity"):
            low, last = row["perplexity"]
            print(f"{row['method']}: code perplexity lowest {low:.1f}, last {last:.1f} (of 2 x 64 entries)")
    if quality:
        print("| k-means targets (100 clusters) | purity | PNMI |")
        print("|---|--:|--:|")
        for q in quality:
            print(f"| {q['targets']} | {q['purity']:.4f} | {q['pnmi']:.4f} |")
    (WORK / "results.json").write_text(json.dumps({"rows": rows, "targets": quality}, indent=2))
    return rows


if __name__ == "__main__":
    main()
