"""Continual pretraining with replay: does a little of the old data keep the old domain?

1. Pretrain the demo GPT on the standard library's source (the old domain).
2. Continue it on English prose (the new domain: the copyright files and changelogs under
   /usr/share/doc, sharded with `pretrain shards text`), from its consolidated weights
   (`run.init_from`), with a fresh optimizer whose learning rate re-warms and re-decays
   (Ibrahim et al. 2024, arXiv:2403.08763), and a replay mix of the old shards by weight
   (`data.mode=resampled`, `data.train: [{shards: new, weight: 1-r}, {shards: old, weight: r}]`,
   one document a draw: `data.draw_samples=1`, so the replay is spread over every batch) for
   r = 0, 5% and 25%, each for the same number of steps.
3. Train one model from scratch on the union for the base + continued steps.

Prints one table of held-out perplexity on both domains (the same evaluation for every model:
every held-out token block of each domain) and the two goals: replay cuts the old-domain
perplexity increase at least in half against no replay, and the new-domain perplexity stays
within 10% of the no-replay run's.

    .venv/bin/python bench/continual.py [--base-steps 600] [--steps 300] [--devices 2]
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "runs" / "continual"
REPLAY = (0.0, 0.05, 0.25)


def prose_corpus(out: Path) -> Path:
    """The new domain: /usr/share/doc's copyright files and (decompressed) changelogs, as shards."""
    from framework.data.writers.text import write_text_shards

    shards = out / "shards"
    if (shards / "val" / "manifest.json").exists():
        return shards
    texts = out / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path("/usr/share/doc").glob("*/*")):
        if not path.is_file():
            continue
        name = f"{path.parent.name}-{path.name}"
        if path.name == "copyright":
            (texts / f"{name}.txt").write_bytes(path.read_bytes())
        elif path.name.startswith("changelog") and path.suffix == ".gz":
            try:
                (texts / f"{name[:-3]}.txt").write_bytes(gzip.decompress(path.read_bytes()))
            except (OSError, EOFError):
                continue
    write_text_shards([str(texts)], str(shards), include=["*.txt"], max_samples_per_shard=250, val_fraction=0.05, seed=0)
    return shards


def fit(run_dir: Path, steps: int, devices: int, *overrides: str) -> None:
    command = [sys.executable, "-m", "framework.cli", "fit", "--config", str(REPO / "configs/experiments/gpt-tiny.yaml"),
               f"trainer.max_steps={steps}", f"trainer.devices={devices}", f"trainer.val_every_steps={steps}",
               "trainer.val_batches=4", f"trainer.checkpoint_every_steps={steps}", "logging.wandb=disabled",
               "logging.progress=false", f"run.dir={run_dir}", *overrides]
    print("[continual] " + " ".join(command[4:]), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"the run {run_dir} failed")


def weights(run_dir: Path) -> Path:
    from framework.training.checkpoint import newest_checkpoint
    from framework.training.consolidate import consolidate

    out = run_dir / "weights.safetensors"
    consolidate(newest_checkpoint(run_dir), out)
    return out


def held_out_ppl(weights_file: Path, shards: Path, tokenizer: Path, blocks: int) -> float:
    """Perplexity over the first ``blocks`` held-out blocks of a domain, in the validation order
    (the same blocks for every model; token-weighted, one process)."""
    import torch

    from framework.config.schema import DataConfig
    from framework.data.loader import val_loader
    from framework.data.sources import resolve_shards, with_counts
    from framework.data.text import TokenPacker
    from framework.losses.language import next_token_loss
    from framework.training.consolidate import build_objective

    objective = build_objective(weights_file)
    model = objective.model.eval()
    data = DataConfig(train=str(shards), batch_size=8, num_workers=0)
    loader = val_loader(with_counts(resolve_shards(str(shards))), TokenPacker(str(tokenizer), objective.cfg.data.seq_len), data,
                        seed=0, rank=0, world_size=1)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index * 8 >= blocks:
                break
            count = batch[:, 1:].numel()
            total += float(next_token_loss(model.logits(model(batch)), batch)) * count
            tokens += count
    return math.exp(total / tokens)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="steps of each continued run")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--eval-blocks", type=int, default=2000, help="held-out blocks per domain in the table")
    args = parser.parse_args(argv)
    from framework.demo import prepare_data

    start = time.perf_counter()
    old_train, old_val, tokenizer = prepare_data(REPO / "runs" / "demo" / "data")
    new = prose_corpus(WORK / "prose")
    new_train, new_val = new / "train", new / "val"
    common = [f"data.tokenizer={tokenizer}", f"data.val={{old: {old_val}, new: {new_val}}}"]
    base = WORK / "base"
    if not (base / "weights.safetensors").exists():
        fit(base, args.base_steps, args.devices, f"data.train={old_train}", *common)
        weights(base)
    results = {"base (old domain only)": base / "weights.safetensors"}
    for replay in REPLAY:
        run = WORK / f"replay-{int(replay * 100)}"
        if not (run / "weights.safetensors").exists():
            train = (f"data.train=[{{shards: {new_train}, weight: {1 - replay}}}, {{shards: {old_train}, weight: {replay}}}]"
                     if replay else f"data.train=[{{shards: {new_train}, weight: 1.0}}]")
            fit(run, args.steps, args.devices, train, "data.mode=resampled", "data.draw_samples=1",
                f"run.init_from={base / 'weights.safetensors'}",
                "optim.warmup_steps=30", *common)  # a fresh optimizer: re-warm, then re-decay
            weights(run)
        results[f"continued, replay {replay:.0%}"] = run / "weights.safetensors"
    scratch = WORK / "scratch-union"
    if not (scratch / "weights.safetensors").exists():
        sizes = [json.loads((d / "manifest.json").read_text())["total_bytes"] for d in (new_train, old_train)]
        share = sizes[0] / sum(sizes)  # the union: each domain drawn in proportion to its size
        fit(scratch, args.base_steps + args.steps, args.devices, "data.mode=resampled", "data.draw_samples=1",
            f"data.train=[{{shards: {new_train}, weight: {share:.4f}}}, {{shards: {old_train}, weight: {1 - share:.4f}}}]", *common)
        weights(scratch)
    results[f"from scratch on the union ({args.base_steps + args.steps} steps)"] = scratch / "weights.safetensors"

    table = {name: (held_out_ppl(w, old_val, tokenizer, args.eval_blocks), held_out_ppl(w, new_val, tokenizer, args.eval_blocks))
             for name, w in results.items()}
    print(f"\nheld-out perplexity (base {args.base_steps} steps on the standard library; continued {args.steps} steps "
          f"on /usr/share/doc prose; {args.devices} processes; the first {args.eval_blocks} held-out blocks of each domain):")
    print(f"  {'model':45s} {'old (stdlib)':>13s} {'new (prose)':>12s}")
    for name, (old_ppl, new_ppl) in table.items():
        print(f"  {name:45s} {old_ppl:13.2f} {new_ppl:12.2f}")
    base_old = table["base (old domain only)"][0]
    no_replay_old, no_replay_new = table["continued, replay 0%"]
    print()
    for replay in REPLAY[1:]:
        old_ppl, new_ppl = table[f"continued, replay {replay:.0%}"]
        cut = 1 - (old_ppl - base_old) / max(no_replay_old - base_old, 1e-9)
        print(f"  replay {replay:.0%}: old-domain increase cut by {cut:.0%} (goal >= 50%); new-domain perplexity "
              f"{new_ppl / no_replay_new:.3f}x the no-replay run's (goal <= 1.10)")
    print(f"\n  {time.perf_counter() - start:.0f} s in all")
    return {name: {"old_ppl": o, "new_ppl": n} for name, (o, n) in table.items()}


if __name__ == "__main__":
    main()
