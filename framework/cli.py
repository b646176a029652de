"""The ``pretrain`` command. User errors end here as one line on stderr (exit code 2)."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import List, Optional

from framework.errors import UserError


def _cmd_fit(args: argparse.Namespace) -> None:
    from framework.config.load import load_config
    from framework.training.fit import fit

    fit(load_config(args.config, args.overrides))


def _cmd_export(args: argparse.Namespace) -> None:
    from framework.export.export import export

    summary = export(args.checkpoint, args.format, args.output, overwrite=args.overwrite)
    print(f"exported {summary['checkpoint']} as {summary['format']} ({summary.get('architecture', '')}) to {summary['output']}")
    if summary["format"] == "hf":
        auto = summary.get("auto_class", "AutoModel")
        print(f"load it with:\n  from transformers import {auto}, AutoTokenizer\n"
              f"  model = {auto}.from_pretrained(\"{summary['output']}\"{', trust_remote_code=True' if summary.get('trust_remote_code') else ''})\n"
              f"  tokenizer = AutoTokenizer.from_pretrained(\"{summary['output']}\")")


def _cmd_report(args: argparse.Namespace) -> None:
    from framework.report.page import watch, write_report

    if args.watch:
        watch(args.runs, args.output, args.interval)
        return
    summary = write_report(args.runs, args.output)
    for run, lines in summary["skipped_lines"].items():
        print(f"warning: {run}/metrics.jsonl line(s) {', '.join(map(str, lines))} are not JSON (a row cut by a crash?): skipped")
    print(f"wrote {args.output}: {summary['runs']} run(s), {summary['plots']} plots, {summary['bytes'] / 1e3:.0f} KB, self-contained")


def _cmd_consolidate(args: argparse.Namespace) -> None:
    from framework.training.consolidate import consolidate

    summary = consolidate(args.checkpoint, args.output)
    print(f"{args.checkpoint} ({summary['kind']}) -> {args.output}: {summary['tensors']} tensors, {summary['parameters']:,} values")


def _row_inputs(inputs: Optional[List[str]], parquet_only: bool = False) -> bool:
    """Whether ``--input`` names row files (Parquet, and for text JSON Lines): files, globs or
    folders of them. Images, audio and pairs take JSON Lines as list files of paths, not rows."""
    from pathlib import Path

    from framework.data.formats import is_parquet, is_row_file

    kind = is_parquet if parquet_only else is_row_file

    def rows(item: str) -> bool:
        path = Path(item)
        return kind(item) or (path.is_dir() and any(kind(p.name) for p in path.iterdir()))

    return bool(inputs) and any(rows(i) for i in inputs)


def _shards_from_rows(args: argparse.Namespace, modality: str) -> None:
    from framework.data.writers.rows import row_fields_for, write_row_shards

    fields = row_fields_for(modality, args.text_key, args.image_key, args.audio_key, args.caption_key, args.id_key)
    summary = write_row_shards(
        args.input, args.output, modality, fields=fields, val_fraction=getattr(args, "val_fraction", 0.0),
        seed=getattr(args, "seed", 0), max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes, workers=getattr(args, "workers", None),
        shards_per_chunk=getattr(args, "shards_per_chunk", 8), overwrite=args.overwrite)
    print(f"{summary['rows']} rows; {len(summary['skipped'])} skipped")
    for split, info in summary["splits"].items():
        print(f"  {split}: {info['samples']} samples in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB -> {info['dir']}")


def _cmd_shards_text(args: argparse.Namespace) -> None:
    from framework.data.writers.text import write_text_shards

    if _row_inputs(args.input):
        return _shards_from_rows(args, "text")

    summary = write_text_shards(
        args.input,
        args.output,
        include=args.include,
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        max_chars_per_sample=args.max_chars,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        workers=args.workers,
        shards_per_chunk=args.shards_per_chunk,
        metadata=args.metadata,
    )
    # Skipped files were already reported one by one as warnings.
    print(f"{summary['documents']} documents -> {summary['samples']} samples; {len(summary['skipped'])} files skipped")
    for split, info in summary["splits"].items():
        print(f"  {split}: {info['samples']} samples in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB -> {info['dir']}")


def _cmd_shards_images(args: argparse.Namespace) -> None:
    from framework.data.writers.images import write_image_shards

    if _row_inputs(args.input, parquet_only=True):
        return _shards_from_rows(args, "images")

    summary = write_image_shards(
        args.input or [], args.output, list_file=args.list, include=args.include, val_fraction=args.val_fraction,
        max_samples=args.max_samples, max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes, seed=args.seed, overwrite=args.overwrite, metadata=args.metadata,
    )
    classes = f", {len(summary['classes'])} classes" if summary["classes"] else ""
    print(f"{summary['images']} images{classes}; {len(summary['skipped'])} skipped")
    for split, info in summary["splits"].items():
        print(f"  {split}: {info['samples']} samples in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB -> {info['dir']}")


def _print_written(summary: dict, what: str) -> None:
    """The closing lines of `pretrain shards pairs|audio` (skips were already warned one by one)."""
    print(f"{summary['samples']} samples from {summary['inputs']} {what}; {len(summary['skipped'])} skipped")
    print(f"  {summary['shards']} shards, {summary['bytes'] / 2**20:.1f} MiB -> {summary['output']}")


def _cmd_shards_pairs(args: argparse.Namespace) -> None:
    from framework.data.writers.pairs import write_pair_shards

    if _row_inputs(args.input, parquet_only=True):
        return _shards_from_rows(args, "pairs")

    summary = write_pair_shards(
        args.input,
        args.output,
        image_key=args.image_key,
        caption_key=args.caption_key,
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        seed=args.seed,
        verify=args.verify,
        overwrite=args.overwrite,
        workers=args.workers,
        shards_per_chunk=args.shards_per_chunk,
    )
    _print_written(summary, "rows")


def _cmd_shards_audio(args: argparse.Namespace) -> None:
    from framework.data.writers.audio import write_audio_shards

    if _row_inputs(args.input, parquet_only=True):
        return _shards_from_rows(args, "audio")

    summary = write_audio_shards(
        args.input,
        args.output,
        include=args.include,
        transcripts=args.transcripts,
        labels_from_folders=args.labels_from_folders,
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        seed=args.seed,
        verify=args.verify,
        overwrite=args.overwrite,
        workers=args.workers,
        shards_per_chunk=args.shards_per_chunk,
    )
    _print_written(summary, "audio files")
    seconds = summary["seconds"]
    length = f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"
    print(f"  {length} of audio, {summary['with_transcript']} with transcript"
          + (f", {len(summary['classes'])} classes" if summary["classes"] else ""))


def _add_row_args(parser: argparse.ArgumentParser) -> None:
    """Columns of row-file inputs (.parquet, .jsonl, .jsonl.gz, .jsonl.zst)."""
    have = {a.dest for a in parser._actions}
    for flag, default, what in (("--text-key", "text", "the text"), ("--image-key", "image", "the image (bytes or "
                                "an HF {bytes, path} struct)"), ("--audio-key", "audio", "the audio (bytes or an HF "
                                "{bytes, path} struct)"), ("--caption-key", "caption", "the caption"),
                                ("--id-key", "id", "the sample key")):
        if flag.lstrip("-").replace("-", "_") not in have:
            parser.add_argument(flag, default=default, help=f"row files: the column of {what}")


def _add_writer_args(parser: argparse.ArgumentParser) -> None:
    """Options every shard writer shares: caps, parallelism, resume/overwrite."""
    parser.add_argument("--max-samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=64 * 2**20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the order samples are written in")
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: min(4, CPUs))")
    parser.add_argument(
        "--shards-per-chunk", type=int, default=8,
        help="inputs are cut into chunks of about this many shards: the unit of parallel work and of resume",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace shards of a different earlier write in OUTPUT (rerunning the same command resumes)",
    )


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from framework.text.tokenizer import train_tokenizer

    path = train_tokenizer(
        args.input, args.output, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        include=args.include, max_bytes=args.max_bytes, on_error=args.on_error,
    )
    print(f"wrote {path}")


def _cmd_data_inspect(args: argparse.Namespace) -> None:
    from framework.config.load import load_config
    from framework.data.inspect import inspect_data
    from framework.objectives import objective_module

    cfg = load_config(args.config, args.overrides)
    processor, fields = None, None
    if args.verify:
        from framework.data.faults import silenced

        with silenced():  # inspect lists every bad shard itself
            _, datamodule = objective_module(cfg.objective.name).build(cfg)
        processor = datamodule.processor() if hasattr(datamodule, "processor") else None
        fields = getattr(datamodule, "row_fields", None)
    world = args.world_size or cfg.trainer.devices * cfg.trainer.num_nodes
    workers = cfg.data.num_workers if args.workers is None else args.workers
    summary = inspect_data(
        cfg.data.train, seed=cfg.run.seed, batch_size=cfg.data.batch_size, remainder=cfg.data.remainder,
        world_size=world, num_workers=workers, epochs=args.epochs, processor=processor, verify=args.verify, zero_copy=cfg.data.zero_copy,
        on_error=cfg.data.on_error, per_rank=args.per_rank, jobs=args.jobs, fields=fields,
    )
    if summary["bad"] or summary["missing"] or summary["duplicates"]:
        raise SystemExit(1)


def _cmd_data_index(args: argparse.Namespace) -> None:
    from framework.data.formats.jsonl import index_files

    index_files(args.paths, args.rows_per_point, args.workers, args.force)


_EVAL_KEYS = {"data.train": str, "data.val": str, "data.test": str, "data.batch_size": int, "data.on_error": str,
              "data.seq_len": int}


def _eval_options(overrides: List[str], rest: Optional[List[str]] = None) -> dict:
    """The evaluation keys of ``overrides``; others go to ``rest`` when given (fit's options of a
    fine-tuning run), else are an error."""
    from framework.errors import ConfigError

    options = {"data.batch_size": 256, "data.on_error": "skip"}
    for item in overrides:
        key, sep, value = item.partition("=")
        if rest is not None and sep and key not in ("data.train", "data.val", "data.test", "data.on_error"):
            rest.append(item)
            continue
        if not sep or key not in _EVAL_KEYS:
            raise ConfigError(f"command line: unknown option {item!r} (known: {', '.join(f'{k}=...' for k in _EVAL_KEYS)})")
        try:
            options[key] = _EVAL_KEYS[key](value)
        except ValueError:
            raise ConfigError(f"command line: {key} must be {_EVAL_KEYS[key].__name__}, not {value!r}") from None
    if "data.val" not in options:
        raise ConfigError("data.val=<shards> is required: the labelled images or pairs to evaluate on")
    if options["data.on_error"] not in ("skip", "raise"):
        raise ConfigError(f"data.on_error must be skip or raise, not {options['data.on_error']!r}")
    return options


def _cmd_eval_zeroshot(args: argparse.Namespace) -> None:
    from framework.evaluate.zeroshot import evaluate_zeroshot, read_names

    options = _eval_options(args.overrides)
    result = evaluate_zeroshot(args.checkpoint, options["data.val"], read_names(args.classes, "classes"),
                               read_names(args.templates, "templates"), options["data.batch_size"], options["data.on_error"])
    print(f"zero-shot on {result['samples']} images: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}")


def _cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from framework.evaluate.zeroshot import evaluate_retrieval

    options = _eval_options(args.overrides)
    result = evaluate_retrieval(args.checkpoint, options["data.val"], options["data.batch_size"], options["data.on_error"])
    print(f"retrieval over {result['pairs']} pairs:")
    for direction, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        print(f"  {name}: " + "  ".join(f"R@{k} {result[f'{direction}_r{k}']:.4f}" for k in (1, 5, 10)))


def _cmd_eval_downstream(args: argparse.Namespace) -> None:
    from framework.errors import ConfigError
    from framework.evaluate.downstream.modes import LinearGrid
    from framework.evaluate.downstream.report import DownstreamOptions, format_table, run_downstream

    fit_overrides: List[str] = []
    options = _eval_options(args.overrides, fit_overrides if args.mode == "finetune" else None)
    if "data.train" not in options:
        raise ConfigError("data.train=<labelled shards> is required: the labels the probe learns from")
    if args.mode == "finetune":
        from framework.evaluate.downstream.finetune import check_overrides

        check_overrides(fit_overrides)
    try:
        fractions = [float(f) for f in args.label_fraction.split(",")]
    except ValueError:
        raise ConfigError(f"--label-fraction must be numbers separated by commas, not {args.label_fraction!r}") from None
    results = run_downstream(DownstreamOptions(
        checkpoint=args.checkpoint, train=options["data.train"], val=options["data.val"], test=options.get("data.test"),
        modes=[args.mode], fractions=fractions, seeds=args.seeds, output=args.output, group_key=args.group_key,
        group_threshold=args.group_threshold, k=getattr(args, "k", 20), temperature=getattr(args, "temperature", 0.07),
        grid=LinearGrid(batchnorm=not getattr(args, "no_batchnorm", False)), batch_size=options["data.batch_size"],
        on_error=options["data.on_error"], seq_len=options.get("data.seq_len"), from_scratch=getattr(args, "from_scratch", False), overrides=fit_overrides))
    if not results:  # a rank other than 0 of a distributed fine-tuning
        return
    what = "fine-tuned from" if args.mode == "finetune" else "on frozen features of"
    print(f"{args.mode} {what} {args.checkpoint}: test accuracy on {results['test_samples']} samples "
          f"(mean ± std over {args.seeds} label subset(s))")
    print(format_table(results))
    for mode, worst in results.get("subgroups", {}).items():
        low, high = worst["accuracy_ci"]
        print(f"{mode}: worst {args.group_key} group {worst['worst_group']!r}: accuracy {worst['accuracy']:.4f} "
              f"(95% CI {low:.4f}-{high:.4f}); report: {worst['report']}")
    print(f"results.json, results.csv, label_efficiency.png -> {args.output}")


def _cmd_audio_targets(args: argparse.Namespace) -> None:
    from framework.data.writers.audio_targets import write_audio_targets

    meta = write_audio_targets(args.shards, args.output, features=args.features, layer=args.layer,
                               clusters=args.clusters, config=args.config, fit_frames=args.fit_frames, seed=args.seed,
                               workers=args.workers, overwrite=args.overwrite)
    where = "MFCC" if meta["features"] == "mfcc" else f"layer {meta['layer']} of {meta['features']}"
    print(f"{meta['frames']} frame targets for {meta['clips']} clips: {meta['clusters']} clusters of {where} "
          f"({meta['used_clusters']} used) -> {args.output}")
    quality = meta["quality"]
    if quality:
        print(f"  against the shards' labels: purity {quality['purity']:.4f}  PNMI {quality['pnmi']:.4f}  "
              f"cluster entropy {quality['cluster_entropy_bits']:.2f} bits")


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

    consolidate = sub.add_parser("consolidate", help="any checkpoint (ddp, fsdp, deepspeed) -> one safetensors file of weights")
    consolidate.add_argument("checkpoint", help="a step-XXXXXXXX.ckpt file or directory")
    consolidate.add_argument("output", help="the .safetensors file to write (the run config goes in its metadata)")
    consolidate.set_defaults(func=_cmd_consolidate)

    report = sub.add_parser("report", help="one self-contained HTML page of one or several runs (plots, summary, config)")
    report.add_argument("runs", nargs="+", help="run directories (config.yaml + metrics.jsonl)")
    report.add_argument("--output", required=True, help="the .html file to write")
    report.add_argument("--watch", action="store_true", help="re-render whenever a run's metrics change (Ctrl-C stops)")
    report.add_argument("--interval", type=float, default=30.0, help="seconds between checks with --watch")
    report.set_defaults(func=_cmd_report)

    export = sub.add_parser("export", help="a checkpoint -> Hugging Face transformers, ONNX or safetensors, with a model card")
    export.add_argument("--checkpoint", required=True, help="a checkpoint file or directory (any strategy), a run directory (its newest) or a consolidated .safetensors")
    export.add_argument("--format", required=True, choices=("hf", "onnx", "safetensors"))
    export.add_argument("--output", required=True, help="the directory to write (written aside, then renamed into place)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output directory")
    export.set_defaults(func=_cmd_export)

    shards = sub.add_parser("shards", help="write webdataset tar shards from raw files or row files (Parquet, JSON "
                            "Lines)").add_subparsers(dest="kind", required=True)
    text = shards.add_parser("text", help="text files -> shards of documents (one file, one document)")
    text.add_argument("--input", "-i", nargs="+", required=True, help="files, directories or globs")
    text.add_argument("--output", "-o", required=True, help="output directory")
    text.add_argument("--include", nargs="*", help="file name patterns to keep in directories, e.g. '*.py' '*.txt'")
    text.add_argument("--max-chars", type=int, default=20000, help="longer documents are split at line ends")
    text.add_argument("--val-fraction", type=float, default=0.0, help="documents held out into OUTPUT/val")
    text.add_argument("--metadata", help="a .tsv (with header) or .jsonl list file: a path column and any others "
                      "(a label, a source) into each sample's json; 'label' becomes the class")
    _add_writer_args(text)
    _add_row_args(text)
    text.set_defaults(func=_cmd_shards_text)

    images = shards.add_parser("images", help="image files -> shards (class sub-folders or a list file give labels)")
    source = images.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "-i", nargs="+", help="folders (root/<class>/<image> gives labels), files or globs")
    source.add_argument("--list", help="a text file: one 'path [integer label]' per line, paths relative to it")
    images.add_argument("--output", "-o", required=True, help="output directory")
    images.add_argument("--include", nargs="*", help="file name patterns to keep in folders (default: common image types)")
    images.add_argument("--val-fraction", type=float, default=0.0, help="images held out into OUTPUT/val")
    images.add_argument("--metadata", help="a .tsv (with header) or .jsonl list file: a path column and any others "
                        "(a writer, a source) into each sample's json, for per-group evaluation")
    images.add_argument("--max-samples", type=int, default=None, help="write at most this many images (a seeded random subset)")
    images.add_argument("--max-samples-per-shard", type=int, default=1000)
    images.add_argument("--max-shard-bytes", type=int, default=64 * 2**20)
    images.add_argument("--seed", type=int, default=0)
    images.add_argument("--overwrite", action="store_true", help="replace shards an earlier write left in OUTPUT")
    _add_row_args(images)
    images.set_defaults(func=_cmd_shards_images)

    pairs = shards.add_parser("pairs", help="image-text pairs listed in .jsonl/.csv/.tsv files -> shards")
    pairs.add_argument("--input", "-i", nargs="+", required=True, help="list files: one row per pair")
    pairs.add_argument("--output", "-o", required=True, help="output directory")
    pairs.add_argument("--image-key", default="image", help="column/key of the image path (relative to the list file)")
    pairs.add_argument("--caption-key", default="caption", help="column/key of the caption")
    pairs.add_argument("--verify", action="store_true", help="decode every image with Pillow; skip those that fail")
    _add_writer_args(pairs)
    _add_row_args(pairs)
    pairs.set_defaults(func=_cmd_shards_pairs)

    audio = shards.add_parser("audio", help="wav/flac files -> shards (optional transcripts or folder labels)")
    audio.add_argument("--input", "-i", nargs="+", required=True, help="files, directories or globs")
    audio.add_argument("--output", "-o", required=True, help="output directory")
    audio.add_argument("--include", nargs="*", help="file name patterns to keep in directories (default: wav and flac)")
    audio.add_argument("--transcripts", "--metadata", help="a .tsv (audio<TAB>text, or a header with a path column) "
                       "or .jsonl list file: its transcript column becomes the txt member, its other columns (speaker, "
                       "accent, ...) go into each sample's json; a sibling FILE.txt next to an audio file is used too")
    audio.add_argument("--labels-from-folders", action="store_true", help="class label = the parent folder's name")
    audio.add_argument("--verify", action="store_true", help="decode every file fully; skip those that fail")
    _add_writer_args(audio)
    _add_row_args(audio)
    audio.set_defaults(func=_cmd_shards_audio)

    tokenizer = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="action", required=True)
    train = tokenizer.add_parser("train", help="train a byte-level BPE tokenizer")
    train.add_argument("--input", "-i", nargs="+", required=True, help="text files, directories, globs or shard directories")
    train.add_argument("--output", "-o", required=True, help="path of the tokenizer.json to write")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--include", nargs="*")
    train.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")
    train.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                       help="a damaged shard or non-UTF-8 text: name and skip it (default), or stop")
    train.set_defaults(func=_cmd_tokenizer_train)

    data = sub.add_parser("data", help="look at a run's data before training").add_subparsers(dest="action", required=True)
    inspect = data.add_parser("inspect", help="sources, counts and each rank's and worker's share of an epoch")
    inspect.add_argument("--config", "-c", help="experiment YAML")
    inspect.add_argument("--world-size", type=int, default=None, help="ranks to simulate (default: devices x nodes)")
    inspect.add_argument("--workers", type=int, default=None, help="dataloader workers per rank (default: data.num_workers)")
    inspect.add_argument("--epochs", type=int, default=1)
    inspect.add_argument("--per-rank", action="store_true", help="list every rank and worker (default: the min/max spread)")
    inspect.add_argument("--jobs", type=int, default=1, help="--verify: shards read by this many processes")
    inspect.add_argument("--verify", action="store_true", help="read and decode every sample, report bad ones by name")
    inspect.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.train=shards/")
    inspect.set_defaults(func=_cmd_data_inspect)

    index = data.add_parser("index", help="JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst): one pass writing line counts and "
                                          "seek points beside the files, reused by every run (resumable)")
    index.add_argument("paths", nargs="+", help="files, directories or globs of JSON Lines files")
    index.add_argument("--rows-per-point", type=int, default=1024, help="lines between seek points (a unit of reading)")
    index.add_argument("--workers", type=int, default=1, help="files indexed in parallel")
    index.add_argument("--force", action="store_true", help="index again files whose index is current")
    index.set_defaults(func=_cmd_data_index)

    evaluate = sub.add_parser("eval", help="evaluate a pretrained checkpoint").add_subparsers(dest="mode", required=True)
    zeroshot = evaluate.add_parser("zeroshot", help="CLIP: classify labelled images by prompts, no training")
    zeroshot.add_argument("--checkpoint", required=True, help="a clip run's checkpoint or run directory")
    zeroshot.add_argument("--classes", required=True, help="class names in label order: a file (one per line) or a,b,c")
    zeroshot.add_argument("--templates", default="a photo of a {}.",
                          help="prompt templates with {}: a file (one per line) or 'a {}.|a photo of {}.'")
    zeroshot.add_argument("overrides", nargs="*", help="data.val=<labelled image or pair shards> [data.batch_size=256] [data.on_error=skip]")
    zeroshot.set_defaults(func=_cmd_eval_zeroshot)
    retrieval = evaluate.add_parser("retrieval", help="CLIP: image <-> text recall@1/5/10 on pair shards")
    retrieval.add_argument("--checkpoint", required=True, help="a clip run's checkpoint or run directory")
    retrieval.add_argument("overrides", nargs="*", help="data.val=<pair shards> [data.batch_size=256] [data.on_error=skip]")
    retrieval.set_defaults(func=_cmd_eval_retrieval)

    audio_cmd = sub.add_parser("audio", help="speech data tools").add_subparsers(dest="action", required=True)
    targets = audio_cmd.add_parser("targets", help="HuBERT: k-means frame targets of MFCC or a run's layer features")
    targets.add_argument("--shards", required=True, help="the audio shards (a directory, glob or list) to label")
    targets.add_argument("--output", "-o", required=True, help="the targets directory (objective.targets)")
    targets.add_argument("--features", required=True, help="mfcc (iteration 1) or a hubert/wav2vec2 run dir or checkpoint")
    targets.add_argument("--layer", type=int, default=-1, help="with a checkpoint: the transformer layer (0: its input)")
    targets.add_argument("--clusters", type=int, default=100, help="k of k-means (HuBERT: 100, then 500)")
    targets.add_argument("--config", help="with mfcc: the experiment config whose sample rate and conv layers "
                         "set the frame rate (default: 16 kHz, wav2vec 2.0 Base)")
    targets.add_argument("--fit-frames", type=int, default=200_000, help="frames sampled to fit k-means")
    targets.add_argument("--seed", type=int, default=0)
    targets.add_argument("--workers", type=int, default=None, help="feature processes (default: min(4, CPUs))")
    targets.add_argument("--overwrite", action="store_true", help="replace targets of another run in --output")
    targets.set_defaults(func=_cmd_audio_targets)

    for mode, description in (("linear", "a linear probe on frozen features (grid chosen on validation, never test)"),
                              ("knn", "weighted kNN on frozen features (DINO's k=20, T=0.07)"),
                              ("finetune", "fine-tune the whole network through fit (best validation checkpoint)")):
        probe = evaluate.add_parser(mode, help=f"{description}, with few labels and per-subgroup results")
        probe.add_argument("--checkpoint", required=True, help="a checkpoint or run directory (text, vision, CLIP, speech)")
        probe.add_argument("--label-fraction", default="1.0", help="comma-separated fractions of data.train's labels, "
                           "each class-balanced (e.g. 0.01,0.1,1.0)")
        probe.add_argument("--seeds", type=int, default=1, help="label subsets per fraction (mean ± std)")
        probe.add_argument("--group-key", help="a field of each sample's json (an accent, a writer): per-group report")
        probe.add_argument("--group-threshold", type=float, help="groups below this accuracy are named "
                           "(default: overall - 0.05)")
        probe.add_argument("--output", "-o", default="downstream", help="results.json/.csv, plots, subgroup reports")
        if mode == "knn":
            probe.add_argument("--k", type=int, default=20, help="neighbours")
            probe.add_argument("--temperature", type=float, default=0.07, help="vote temperature")
        if mode == "linear":
            probe.add_argument("--no-batchnorm", action="store_true", help="no feature standardisation")
        if mode == "finetune":
            probe.add_argument("--from-scratch", action="store_true",
                               help="also train the same network from random weights: the baseline")
            probe.add_argument("overrides", nargs="*", help="data.train=... data.val=... [data.test=...] "
                               "[data.on_error=skip|raise] and fit's options: trainer.max_steps=300 trainer.devices=2 "
                               "optim.lr=1e-3 objective.layer_decay=0.75 objective.label_smoothing=0.1 "
                               "objective.mixup=0.8 objective.patience=3 data.batch_size=32 ...")
        else:
            probe.add_argument("overrides", nargs="*", help="data.train=... data.val=... [data.test=...] "
                               "[data.batch_size=...] [data.on_error=skip|raise]")
        probe.set_defaults(func=_cmd_eval_downstream, mode=mode)

    launch = sub.add_parser("launch", help="start `fit` on many processes: torchrun (one box or several) or Slurm")
    how = launch.add_subparsers(dest="launcher", required=True)
    from launchers import slurm as slurm_launcher, torchrun as torchrun_launcher

    torchrun_launcher.add_arguments(how.add_parser("torchrun", help="run fit under torchrun (standalone or c10d multi-node)"))
    slurm_launcher.add_arguments(how.add_parser("slurm", help="render an sbatch script into the run directory and submit it"))

    demo = sub.add_parser("demo", help="the built-in demo: GPT on the Python standard library's source")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--devices", type=int, default=2)
    demo.add_argument("--workdir", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def user_message(exc: UserError) -> str:
    """The error's own line. A DataLoader worker's exception reaches the main process re-raised
    with the worker's traceback in its message; the user's line is the last one of it."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])
    return text


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
        print(f"error: {user_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
