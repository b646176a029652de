"""Proof that pretraining pays with few labels: fine-tuning and linear probes next to from-scratch,
in every modality, with a per-subgroup report (``pretrain eval finetune|linear``).

| modality | data | pretrained by | group key |
|---|---|---|---|
| vision | scikit-learn digits (bench/digits.py's split) | its SimCLR run (``runs/digits/simclr``) | stroke width (ink-mass terciles) |
| text | the standard library's source, labelled by top-level package (10 packages) | a GPT (clm) and a BERT (mlm) pretrained here on the standard library without the test files | file length (terciles) |
| audio | the spoken digits of bench/spoken_digits.py | its HuBERT iteration 1 (``runs/spoken-digits/hubert-1``) | accent (two held out of fine-tuning) |

Each modality: label fractions x seeds (class-balanced subsets), ``finetune`` (pretrained
weights), ``scratch`` (the same network from random weights, the same recipe) and ``linear``
(a probe on the frozen pretrained features). Model selection never sees the test split. One
table per modality (mean ± std over seeds) and where each subgroup report is.

    .venv/bin/python bench/downstream.py                        # all three (~1 h on 2 cores)
    .venv/bin/python bench/downstream.py --modalities vision    # one
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

WORK = REPO / "runs" / "downstream"
# Per modality: label fractions, seeds and fine-tuning steps (the CPU budget; a user's GPU takes more).
# Text has no 1%: its smallest package has 17 training files, so 1% would leave classes empty.
PLAN = {
    "vision": {"fractions": "0.01,0.1,1.0", "seeds": 3, "fit": ["trainer.max_steps=300", "trainer.val_every_steps=50"]},
    "text": {"fractions": "0.1,0.3,1.0", "seeds": 2, "fit": ["trainer.max_steps=150", "trainer.val_every_steps=30",
                                                            "data.batch_size=16"]},
    "audio": {"fractions": "0.01,0.1,1.0", "seeds": 1, "fit": ["trainer.max_steps=150", "trainer.val_every_steps=50"]},
}
PACKAGES = ["encodings", "distutils", "ctypes", "unittest", "asyncio", "tkinter", "email", "importlib", "multiprocessing", "xml"]


def run(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "WANDB_MODE": "disabled"}
    print(f"[downstream] pretrain {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "framework.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"[downstream] failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return result.stdout


def terciles(values: np.ndarray, reference: np.ndarray, names: tuple) -> list[str]:
    low, high = np.percentile(reference, [100 / 3, 200 / 3])
    return [names[0] if v <= low else names[2] if v > high else names[1] for v in values]


def vision_data() -> dict:
    """bench/digits.py's split as image shards whose json carries the stroke width."""
    from digits import DATA, digits_split, prepare

    from framework.data.writers.images import write_image_shards

    split = digits_split()
    prepare()  # the PNG folders
    out = WORK / "vision"
    ink_train = split["train"][0].reshape(len(split["train"][0]), -1).sum(1)
    for part, folder in (("train", "train"), ("test", "test")):
        images, labels = split[part]
        ink = images.reshape(len(images), -1).sum(1)
        strokes = terciles(ink, ink_train, ("thin", "medium", "thick"))
        table = out / f"{part}-metadata.tsv"
        table.parent.mkdir(parents=True, exist_ok=True)
        lines = ["path\tstroke\tink"] + [f"{DATA / 'png' / folder / str(label) / f'{i:05d}.png'}\t{s}\t{int(v)}"
                                         for i, (label, s, v) in enumerate(zip(labels, strokes, ink))]
        table.write_text("\n".join(lines) + "\n")
        if not (out / part / "manifest.json").exists():
            write_image_shards([str(DATA / "png" / folder)], str(out / part), max_samples_per_shard=256, seed=0,
                               overwrite=True, metadata=str(table))
    return {"train": out / "train", "test": out / "test", "checkpoints": {"SimCLR": REPO / "runs" / "digits" / "simclr"},
            "group": "stroke"}


def text_data() -> dict:
    """Package-labelled stdlib files split 80/20 by file; a GPT and a BERT pretrained on the stdlib
    without the test files."""
    import sysconfig

    from framework.data.writers.text import split_score, write_text_shards
    from framework.demo import SKIP
    from framework.text.tokenizer import train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    out = WORK / "text"
    files = {p: p.relative_to(root).parts[0] for package in PACKAGES for p in sorted((root / package).rglob("*.py"))
             if p.stat().st_size > 0}
    test = {p for p in files if split_score(str(p.relative_to(root)), 1) < 0.2}
    train = [p for p in files if p not in test]
    sizes = np.array([p.stat().st_size for p in files])
    train_sizes = np.array([p.stat().st_size for p in train])
    lengths = dict(zip(files, terciles(sizes, train_sizes, ("short", "medium", "long"))))
    for part, members in (("train", train), ("test", sorted(test))):
        table = out / f"{part}-metadata.tsv"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text("path\tlabel\tlength\n" + "".join(f"{p}\t{files[p]}\t{lengths[p]}\n" for p in members))
        if not (out / part / "manifest.json").exists():
            write_text_shards([str(p) for p in members], str(out / part), max_chars_per_sample=10**7, metadata=str(table),
                              overwrite=True)
    corpus = out / "corpus"
    if not (corpus / "val" / "manifest.json").exists():  # the standard library minus the test files
        everything = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & SKIP) and p not in test]
        write_text_shards([str(p) for p in sorted(everything)], str(corpus), max_samples_per_shard=250, val_fraction=0.05,
                          seed=0, overwrite=True)
    tokenizer = out / "tokenizer.json"
    if not tokenizer.exists():
        train_tokenizer([str(corpus / "train")], str(tokenizer), vocab_size=4096, max_bytes=8_000_000)
    checkpoints = {}
    for name, config in (("GPT", "gpt-tiny"), ("BERT", "bert-tiny")):
        run_dir = out / config
        if not list((run_dir / "checkpoints").glob("step-00000600.ckpt")):
            run(["fit", "--config", f"configs/experiments/{config}.yaml", f"data.train={corpus / 'train'}",
                 f"data.val={corpus / 'val'}", f"data.tokenizer={tokenizer}", "trainer.devices=1", "trainer.max_steps=600",
                 f"run.dir={run_dir}", "logging.wandb=disabled", "logging.progress=false"])
        checkpoints[name] = run_dir
    return {"train": out / "train", "test": out / "test", "checkpoints": checkpoints, "group": "length"}


def audio_data() -> dict:
    """The spoken digits, with two accents left out of the labelled training set."""
    from spoken_digits import DATA, HELD_OUT, WORK as SPOKEN

    from framework.data.images import key_id
    from framework.evaluate.downstream.finetune import write_subset

    if not (SPOKEN / "hubert-1" / "checkpoints").is_dir():
        raise SystemExit("[downstream] run bench/spoken_digits.py first (its HuBERT iteration 1 is the checkpoint)")
    from framework.data.sources import open_shard, resolve_shards
    from framework.data.tar import iter_samples

    seen = []
    for shard in resolve_shards(str(DATA / "shards" / "train")):
        with open_shard(shard.url) as stream:
            for key, sample, _ in iter_samples(stream):
                if json.loads(bytes(sample["json"]))["accent"] not in HELD_OUT:
                    seen.append(key_id(key))
    train = write_subset(str(DATA / "shards" / "train"), "data.train", np.array(seen), WORK / "audio" / "train-seen-accents")
    return {"train": Path(train), "test": DATA / "shards" / "val", "checkpoints": {"HuBERT": SPOKEN / "hubert-1"},
            "group": "accent"}


def evaluate(modality: str, data: dict, name: str, checkpoint: Path) -> dict:
    plan = PLAN[modality]
    base = WORK / modality / name
    common = ["--label-fraction", plan["fractions"], "--seeds", str(plan["seeds"]), "--group-key", data["group"]]
    shards = [f"data.train={data['train']}", f"data.val={data['test']}"]
    results = {}
    for mode in ("finetune", "linear"):
        options, overrides = (["--from-scratch"], plan["fit"]) if mode == "finetune" else ([], [])
        start = time.perf_counter()
        run(["eval", mode, "--checkpoint", str(checkpoint), "--output", str(base / mode), *common, *options, *shards, *overrides])
        results[mode] = json.loads((base / mode / "results.json").read_text())
        results[mode]["seconds"] = time.perf_counter() - start
    return results


def table(modality: str, name: str, results: dict) -> list[str]:
    summary = [s for mode in ("finetune", "linear") for s in results[mode]["summary"]]
    fractions = list(dict.fromkeys(s["fraction"] for s in summary))
    cell = {(s["mode"], s["fraction"]): s for s in summary}
    lines = [f"{modality}, pretrained by {name}: test accuracy (mean ± std over seeds), "
             f"{results['finetune']['test_samples']} test samples",
             "| | " + " | ".join(f"{f:.0%} of labels" for f in fractions) + " |", "|---|" + "--:|" * len(fractions)]
    names = {"finetune": "fine-tune (pretrained)", "scratch": "from scratch (same network, same recipe)",
             "linear": "linear probe (frozen pretrained)"}
    for mode in ("finetune", "scratch", "linear"):
        lines.append(f"| {names[mode]} | " + " | ".join(f"{cell[(mode, f)]['mean']:.4f} ± {cell[(mode, f)]['std']:.4f}"
                                                       for f in fractions) + " |")
    lines.append("| fine-tune - scratch | " + " | ".join(f"{cell[('finetune', f)]['mean'] - cell[('scratch', f)]['mean']:+.4f}"
                                                        for f in fractions) + " |")
    for mode in ("finetune", "scratch", "linear"):
        worst = results["finetune" if mode != "linear" else "linear"].get("subgroups", {}).get(mode)
        if worst:
            low, high = worst["accuracy_ci"]
            lines.append(f"- {names[mode]}, 100% of labels, seed 0: worst group {worst['worst_group']!r}: "
                         f"{worst['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}); {worst['report']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modalities", nargs="+", default=["vision", "text", "audio"], choices=list(PLAN))
    args = parser.parse_args(argv)
    builders = {"vision": vision_data, "text": text_data, "audio": audio_data}
    report: list[str] = []
    everything = {}
    for modality in args.modalities:
        data = builders[modality]()
        for name, checkpoint in data["checkpoints"].items():
            results = evaluate(modality, data, name, checkpoint)
            everything[f"{modality}/{name}"] = results
            lines = table(modality, name, results)
            print("\n".join(["", *lines]), flush=True)
            report += ["", *lines]
    (WORK / "results.json").write_text(json.dumps(everything, indent=1, default=str))
    print("\n".join(["", "=" * 20, *report]))


if __name__ == "__main__":
    main()
