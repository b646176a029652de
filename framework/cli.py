"""The ``pretrain`` command. User errors end here as one line on stderr (exit code 2)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from framework.errors import UserError


def _cmd_fit(args: argparse.Namespace) -> None:
    from framework.config.load import load_config
    from framework.training.fit import fit

    fit(load_config(args.config, args.overrides))


def _cmd_shards_text(args: argparse.Namespace) -> None:
    from framework.data.writers.text import write_text_shards

    summary = write_text_shards(
        args.input,
        args.output,
        include=args.include,
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        max_chars_per_sample=args.max_chars,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    # Skipped files were already reported one by one as warnings.
    print(f"{summary['documents']} documents -> {summary['samples']} samples; {len(summary['skipped'])} files skipped")
    for split, info in summary["splits"].items():
        print(f"  {split}: {info['samples']} samples in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB -> {info['dir']}")


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from framework.text.tokenizer import train_tokenizer

    path = train_tokenizer(
        args.input, args.output, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        include=args.include, max_bytes=args.max_bytes,
    )
    print(f"wrote {path}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from framework.demo import run_text_demo

    run_text_demo(steps=args.steps, devices=args.devices, workdir=args.workdir)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (it may be replaced)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Distributed self-supervised pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train a model as a config says")
    fit.add_argument("--config", "-c", help="experiment YAML (may compose others through `defaults:`)")
    fit.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=200")
    fit.set_defaults(func=_cmd_fit)

    shards = sub.add_parser("shards", help="write webdataset tar shards from raw files").add_subparsers(dest="kind", required=True)
    text = shards.add_parser("text", help="text files -> shards of documents (one file, one document)")
    text.add_argument("--input", "-i", nargs="+", required=True, help="files, directories or globs")
    text.add_argument("--output", "-o", required=True, help="output directory")
    text.add_argument("--include", nargs="*", help="file name patterns to keep in directories, e.g. '*.py' '*.txt'")
    text.add_argument("--max-samples-per-shard", type=int, default=1000)
    text.add_argument("--max-shard-bytes", type=int, default=64 * 2**20)
    text.add_argument("--max-chars", type=int, default=20000, help="longer documents are split at line ends")
    text.add_argument("--val-fraction", type=float, default=0.0, help="documents held out into OUTPUT/val")
    text.add_argument("--seed", type=int, default=0)
    text.set_defaults(func=_cmd_shards_text)

    tokenizer = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="action", required=True)
    train = tokenizer.add_parser("train", help="train a byte-level BPE tokenizer")
    train.add_argument("--input", "-i", nargs="+", required=True, help="text files, directories, globs or shard directories")
    train.add_argument("--output", "-o", required=True, help="path of the tokenizer.json to write")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--include", nargs="*")
    train.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")
    train.set_defaults(func=_cmd_tokenizer_train)

    demo = sub.add_parser("demo", help="the built-in demo: GPT on the Python standard library's source")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--devices", type=int, default=2)
    demo.add_argument("--workdir", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # dataloader workers fork after tokenizing
    framework_log = logging.getLogger("framework")
    if not any(isinstance(h, _CurrentStderr) for h in framework_log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        framework_log.addHandler(handler)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
