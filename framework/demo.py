"""``pretrain demo``: a real pretraining run on data every machine has.

Builds text shards from the Python standard library's own source files, trains a
byte-level BPE tokenizer, pretrains a tiny GPT with DDP on ``devices`` processes, and
prints its held-out perplexity next to a unigram model's on the same held-out text.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from framework.errors import UserError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "gpt-tiny.yaml"
# Third-party packages and the (huge) test suite are not "the standard library's source".
SKIP = {"site-packages", "dist-packages", "test", "idlelib", "turtledemo", "__pycache__", "lib2to3"}


def stdlib_sources() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(root.iterdir()) if p.name not in SKIP and (p.is_dir() or p.suffix == ".py")]


def prepare_data(data: Path) -> tuple[Path, Path, Path]:
    from framework.data.writers.text import write_text_shards
    from framework.text.tokenizer import train_tokenizer

    shards, tokenizer = data / "shards", data / "tokenizer.json"
    if not (shards / "val" / "manifest.json").exists():
        print(f"[demo] writing text shards of the standard library's .py files to {shards}", flush=True)
        summary = write_text_shards(
            stdlib_sources(), str(shards), include=["*.py"], max_samples_per_shard=250, val_fraction=0.05, seed=0
        )
        print(f"[demo] {summary['documents']} documents, {summary['samples']} samples", flush=True)
    if not tokenizer.exists():
        print(f"[demo] training a byte-level BPE tokenizer -> {tokenizer}", flush=True)
        train_tokenizer([str(shards / "train")], str(tokenizer), vocab_size=4096, max_bytes=8_000_000)
    return shards / "train", shards / "val", tokenizer


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_text_demo(steps: int = 600, devices: int = 2, workdir: str = "runs/demo") -> dict:
    work = Path(workdir)
    train, val, tokenizer = prepare_data(work / "data")
    run_dir = work / "gpt"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    command = [
        sys.executable, "-m", "framework.cli", "fit", "--config", str(CONFIG),
        f"data.train={train}", f"data.val={val}", f"data.tokenizer={tokenizer}",
        f"trainer.max_steps={steps}", f"trainer.devices={devices}", f"run.dir={run_dir}",
    ]
    print("[demo] " + " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        raise UserError("the demo's training run failed (see above)")
    elapsed = time.perf_counter() - start

    from framework.config.load import load_config
    from framework.evaluate.unigram import unigram_perplexity
    from framework.text.tokenizer import load_tokenizer

    cfg = load_config(str(run_dir / "config.yaml"), [])
    rows = read_metrics(run_dir / "metrics.jsonl")
    val_rows = [r for r in rows if "val/ppl" in r]
    if not val_rows:
        raise UserError(f"no validation perplexity in {run_dir / 'metrics.jsonl'}")
    model_ppl = val_rows[-1]["val/ppl"]
    step_times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]
    vocab = load_tokenizer(str(tokenizer)).get_vocab_size()
    print("[demo] fitting the unigram baseline on the training tokens", flush=True)
    unigram_ppl = unigram_perplexity(str(train), str(val), str(tokenizer), cfg.data.seq_len, vocab)
    steps_per_s = 1 / (sum(step_times) / len(step_times)) if step_times else float("nan")
    result = {"model_ppl": model_ppl, "unigram_ppl": unigram_ppl, "steps": steps, "steps_per_s": steps_per_s, "wall_s": elapsed}
    print()
    print(f"  held-out perplexity, GPT ({steps} steps, {devices} processes): {model_ppl:10.2f}")
    print(f"  held-out perplexity, unigram baseline:              {unigram_ppl:10.2f}")
    print(f"  training speed: {steps_per_s:.2f} steps/s, {elapsed:.0f} s wall clock in all")
    print(f"  run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, wandb/)")
    print()
    if not model_ppl < unigram_ppl:
        (work / "demo_result.json").write_text(json.dumps(result, indent=2))
        raise UserError(f"the model's perplexity {model_ppl:.2f} is not below the unigram baseline's {unigram_ppl:.2f}")
    result["export"] = export_demo_model(run_dir, work / "gpt-hf")
    (work / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result


def export_demo_model(run_dir: Path, output: Path) -> str:
    """The demo GPT as a transformers model (GPT-NeoX) with its tokenizer, and the lines that load it."""
    from framework.export.export import export

    print(f"[demo] pretrain export --checkpoint {run_dir} --format hf --output {output}", flush=True)
    summary = export(run_dir, "hf", output, overwrite=True)
    print(f"  exported as {summary['architecture']} to {output}; in transformers:")
    print("    from transformers import AutoModelForCausalLM, AutoTokenizer")
    print(f'    model, tokenizer = AutoModelForCausalLM.from_pretrained("{output}"), AutoTokenizer.from_pretrained("{output}")')
    print()
    return str(output)
