"""Corpora as they ship: our stream on Parquet and .jsonl.zst against the raw ceiling and HF datasets.

    .venv/bin/python bench/formats.py [--copies 3] [--workdir /tmp/bench-formats]

Writes the standard library's source and the prose under /usr/share/doc (copyright files and
changelogs), cut into documents of at most 4,000 characters and repeated ``--copies`` times
with distinct ids, as FineWeb-layout Parquet (text, id, dump, url, date, file_path, language,
language_score, token_count; row groups of 1,024 rows) and as Dolma-layout JSON Lines
compressed with zstd in frames of 256 lines (id, text, source, added, created, metadata),
8 files each. Then, on the same files, each measurement in a fresh process:

  raw    the ceiling: pyarrow ``iter_batches`` to Python strings; zstandard stream + line
         split + orjson;
  ours   ``ShardStream`` (global shuffle over units, buffer 1,000, equal batches of 32, its
         resumable state kept), rows decoded to text in one DataLoader worker, text and id
         columns read (``data.extra_keys: []``);
  hf     ``load_dataset("parquet"/"json", streaming=True)`` iterated in-process, no shuffle
         (its best case);
  resume time to the first batch after resuming at 10% and at 90% of an epoch (the median
         of 5), ours (``load_state_dict`` of the loader, one worker) against HF's
         ``IterableDataset.load_state_dict``;
  RSS    peak resident memory: our DataLoader worker, HF's process, and the same Python with
         the imports and nothing read (the floor both sit on);
  shuffle how mixed our batches are, measured the same way on the Parquet files and on the
         same rows as tar shards of 1,024 (written by ``pretrain shards text --input``).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

FILES = 8
ROW_GROUP = 1024
FRAME_LINES = 256
BATCH = 32


# ---------------------------------------------------------------- the corpus


def documents() -> list[str]:
    from framework.data.writers.text import split_document

    texts = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            texts.append(path.read_text("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    for path in sorted(Path("/usr/share/doc").glob("*/*")):
        try:
            if path.name == "copyright":
                texts.append(path.read_text("utf-8"))
            elif path.name.startswith("changelog") and path.suffix == ".gz":
                texts.append(gzip.decompress(path.read_bytes()).decode("utf-8"))
        except (UnicodeDecodeError, OSError, EOFError):
            continue
    return [chunk for text in texts for chunk in split_document(text, 4000) if chunk.strip()]


def write_corpus(workdir: Path, copies: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    parquet, jsonl = workdir / "parquet", workdir / "jsonl"
    done = workdir / "corpus.json"
    if done.exists():
        return json.loads(done.read_text())
    parquet.mkdir(parents=True, exist_ok=True)
    jsonl.mkdir(parents=True, exist_ok=True)
    docs = documents()
    rows = len(docs) * copies
    per_file = -(-rows // FILES)
    compressor = zstandard.ZstdCompressor(level=3)
    everything = ((copy, number, text) for copy in range(copies) for number, text in enumerate(docs))
    for index in range(FILES):
        chunk = list(itertools.islice(everything, per_file))
        ids = [f"<urn:uuid:{copy:02d}-{number:08d}>" for copy, number, _ in chunk]
        texts = [text for _, _, text in chunk]
        table = pa.table({
            "text": texts, "id": ids, "dump": [f"CC-MAIN-2024-{10 + copy}" for copy, _, _ in chunk],
            "url": [f"https://example.org/{i}" for i in ids], "date": ["2024-03-01T00:00:00Z"] * len(chunk),
            "file_path": [f"s3://commoncrawl/{index}.warc.gz"] * len(chunk), "language": ["en"] * len(chunk),
            "language_score": [0.9] * len(chunk), "token_count": [len(t) // 4 for t in texts]})
        pq.write_table(table, parquet / f"{index:03d}_00000.parquet", row_group_size=ROW_GROUP)
        lines = [json.dumps({"id": i, "text": t, "source": "stdlib+doc", "added": "2024-03-01", "created": "2024-01-01",
                             "metadata": {"copy": copy}}).encode() + b"\n" for i, t, (copy, _, _) in zip(ids, texts, chunk)]
        with open(jsonl / f"part-{index:04d}.jsonl.zst", "wb") as out:
            for start in range(0, len(lines), FRAME_LINES):
                out.write(compressor.compress(b"".join(lines[start : start + FRAME_LINES])))
    from framework.data.formats.jsonl import index_files

    index_files([str(jsonl)], rows_per_point=FRAME_LINES, workers=2, report=lambda line: None)
    size = lambda folder: sum(p.stat().st_size for p in folder.iterdir() if p.is_file())  # noqa: E731
    info = {"rows": rows, "documents": len(docs), "copies": copies, "parquet_mb": size(parquet) / 1e6,
            "jsonl_zst_mb": size(jsonl) / 1e6, "text_mb": sum(len(t.encode()) for t in docs) * copies / 1e6}
    done.write_text(json.dumps(info))
    return info


def files(workdir: Path, kind: str) -> list[str]:
    return sorted(str(p) for p in (workdir / kind).iterdir() if p.is_file())


# ---------------------------------------------------------------- measurements (one per process)


class Text:
    one_to_one = True

    def __call__(self, key, sample, shard):
        return [sample["txt"]]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def our_loader(workdir: Path, kind: str, workers: int = 1):
    from framework.data.formats import TEXT, RowFields
    from framework.data.loader import ResumableLoader
    from framework.data.sources import resolve_shards, with_counts
    from framework.data.stream import ShardStream

    fields = RowFields((("text", TEXT),), extra=(), required=True, max_rows_per_read=ROW_GROUP)
    shards = with_counts(resolve_shards(str(workdir / kind), "data.train", fields))
    stream = ShardStream(shards, Text(), seed=0, batch_size=BATCH, shuffle_buffer=1000, length=10**9)
    epoch_batches = sum(s.samples for s in shards) // BATCH
    return ResumableLoader(stream, batch_size=BATCH, num_workers=workers, collate_fn=list), epoch_batches


def hf_dataset(workdir: Path, kind: str):
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    builder = "parquet" if kind == "parquet" else "json"
    return load_dataset(builder, data_files=files(workdir, kind), split="train", streaming=True)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM: unlike ru_maxrss, it does not carry over the
    peak of the process that forked and exec'd this one)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker_peak_rss_mb(iterator) -> float:
    """The peak resident memory of a live DataLoader iterator's worker processes."""
    return max([peak_rss_mb(worker.pid) for worker in getattr(iterator, "_workers", [])] or [0.0])


def measure(what: str, kind: str, workdir: Path) -> dict:
    """One figure in this process: rows/s (and peak RSS) of ``what`` on ``kind``'s files;
    ``-worker`` variants run the reading in one DataLoader worker (rows decoded to text there)."""
    import datasets  # noqa: F401  (imported before timing: every variant carries the same imports)
    from torch.utils.data import DataLoader

    from framework.data.formats import jsonl, parquet  # noqa: F401
    from framework.data.loader import ResumableLoader  # noqa: F401
    from framework.data.stream import ShardStream  # noqa: F401

    rows, worker_rss = 0, 0.0
    start = time.perf_counter()
    if what == "floor":
        pass
    elif what == "raw" and kind == "parquet":
        import pyarrow.parquet as pq

        for path in files(workdir, kind):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP, columns=["text"]):
                rows += len(batch.column(0).to_pylist())
    elif what == "raw":
        import io

        import orjson
        import zstandard

        for path in files(workdir, kind):
            with open(path, "rb") as raw:
                stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), 1 << 20)
                for line in stream:
                    orjson.loads(line)["text"]
                    rows += 1
    elif what.startswith("ours"):
        loader, epoch_batches = our_loader(workdir, kind, workers=1 if what.endswith("-worker") else 0)
        iterator = iter(loader)
        for batch in itertools.islice(iterator, epoch_batches):
            rows += len(batch)
        worker_rss = worker_peak_rss_mb(iterator)
    elif what.startswith("hf"):
        dataset = hf_dataset(workdir, kind)
        if what.endswith("-worker"):
            iterator = iter(DataLoader(dataset, batch_size=BATCH, num_workers=1,
                                       collate_fn=lambda batch: [row["text"] for row in batch]))
            for number, batch in enumerate(iterator):
                rows += len(batch)
                if number % 200 == 0:  # VmHWM is a peak: a late reading holds it (the worker ends with the epoch)
                    worker_rss = max(worker_rss, worker_peak_rss_mb(iterator))
        else:
            for row in dataset:
                row["text"]
                rows += 1
    elif what.startswith("resume"):
        return resume(kind, workdir, float(what.split("-")[1]))
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "rss_mb": peak_rss_mb(), "worker_rss_mb": worker_rss}


def resume(kind: str, workdir: Path, fraction: float, repeats: int = 5) -> dict:
    """Seconds from a saved position to the first batch (the median of ``repeats`` resumes)."""
    import statistics

    loader, epoch_batches = our_loader(workdir, kind)
    iterator = iter(loader)
    for _ in range(int(epoch_batches * fraction)):
        next(iterator)
    state = loader.state_dict()
    del iterator
    ours = []
    for _ in range(repeats):
        resumed, _ = our_loader(workdir, kind)
        start = time.perf_counter()
        resumed.load_state_dict(state)
        next(iter(resumed))
        ours.append(time.perf_counter() - start)

    dataset = hf_dataset(workdir, kind)
    iterator = iter(dataset)
    for _ in range(int(epoch_batches * BATCH * fraction)):
        next(iterator)
    hf_state = dataset.state_dict()
    hf = []
    for _ in range(repeats):
        again = hf_dataset(workdir, kind)
        start = time.perf_counter()
        again.load_state_dict(hf_state)
        next(iter(again))
        hf.append(time.perf_counter() - start)
    return {"ours_s": statistics.median(ours), "hf_s": statistics.median(hf)}


def tar_copy(workdir: Path) -> Path:
    """The Parquet corpus as tar shards of 1,024 samples (``pretrain shards text --input``)."""
    from framework.data.writers.rows import row_fields_for, write_row_shards

    out = workdir / "tar"
    if not (out / "manifest.json").exists():
        write_row_shards([str(workdir / "parquet")], str(out), "text", fields=row_fields_for("text"),
                         max_samples_per_shard=ROW_GROUP, workers=2)
    return out


def shuffle_quality(workdir: Path, buffer: int, batches: int = 300) -> dict:
    """How mixed batches are, the same way for tar shards and Parquet: the mean number of
    distinct neighbourhoods (1,024 consecutive documents of the original order) in a batch
    of 32, over the first ``batches`` batches after the buffer filled; 32 is fully mixed, 1 is
    one row group's neighbours. A worker mixes the units its shuffle buffer spans."""
    import re

    from framework.data.formats import TEXT, RowFields
    from framework.data.sources import resolve_shards, with_counts
    from framework.data.stream import ShardStream

    class Key(Text):
        def __call__(self, key, sample, shard):
            copy, number = map(int, re.findall(r"\d+", key)[:2])
            return [(copy, number)]

    per_copy = json.loads((workdir / "corpus.json").read_text())["documents"]
    fields = RowFields((("text", TEXT),), extra=(), required=True, max_rows_per_read=ROW_GROUP)
    result = {}
    for name, spec in (("tar", tar_copy(workdir)), ("parquet", workdir / "parquet")):
        stream = ShardStream(with_counts(resolve_shards(str(spec), "data.train", fields)), Key(), seed=0,
                             batch_size=BATCH, shuffle_buffer=buffer, endless=False)
        items = list(itertools.islice(stream.reader_items(0, 1), buffer, buffer + batches * BATCH))
        hoods = [(copy * per_copy + number) // ROW_GROUP for copy, number in items]
        result[name] = sum(len(set(hoods[i : i + BATCH])) for i in range(0, len(hoods), BATCH)) / batches
    return result


def in_fresh_process(what: str, kind: str, workdir: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--measure", what, kind],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{what} on {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3, help="the corpus repeated this many times (distinct ids)")
    parser.add_argument("--workdir", default="/tmp/bench-formats")
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], workdir)))
        return {}
    corpus = write_corpus(workdir, args.copies)
    print(f"corpus: {corpus['rows']:,} rows ({corpus['documents']:,} documents x {corpus['copies']}), "
          f"{corpus['text_mb']:.0f} MB of text; Parquet {corpus['parquet_mb']:.0f} MB, .jsonl.zst {corpus['jsonl_zst_mb']:.0f} MB, "
          f"{FILES} files each")
    floor = in_fresh_process("floor", "parquet", workdir)
    results = {"corpus": corpus, "floor_rss_mb": floor["rss_mb"]}
    for kind, label in (("parquet", "Parquet (FineWeb layout)"), ("jsonl", ".jsonl.zst (Dolma layout)")):
        runs = {what: in_fresh_process(what, kind, workdir) for what in ("raw", "ours", "ours-worker", "hf", "hf-worker")}
        rate = {what: r["rows"] / r["seconds"] for what, r in runs.items()}
        early, late = in_fresh_process("resume-0.1", kind, workdir), in_fresh_process("resume-0.9", kind, workdir)
        results[kind] = {"rows_per_s": rate, "resume": {"10%": early, "90%": late},
                         "rss_mb": {"ours_worker": runs["ours-worker"]["worker_rss_mb"],
                                    "hf_worker": runs["hf-worker"]["worker_rss_mb"], "ours": runs["ours"]["rss_mb"],
                                    "hf": runs["hf"]["rss_mb"]}}
        print(f"\n{label}")
        print(f"  rows/s in one process: raw ceiling {rate['raw']:,.0f}   ours {rate['ours']:,.0f} "
              f"({rate['ours'] / rate['raw']:.2f}x the ceiling, goal >= 0.8)   HF datasets {rate['hf']:,.0f} "
              f"(ours {rate['ours'] / rate['hf']:.1f}x, goal >= 3)")
        print(f"  rows/s in one DataLoader worker (batches of {BATCH} texts): ours {rate['ours-worker']:,.0f} "
              f"({rate['ours-worker'] / rate['raw']:.2f}x the in-process ceiling)   HF datasets {rate['hf-worker']:,.0f} "
              f"(ours {rate['ours-worker'] / rate['hf-worker']:.1f}x)")
        print(f"  first batch after a resume: at 10% ours {early['ours_s']:.2f} s, HF {early['hf_s']:.2f} s;  at 90% ours "
              f"{late['ours_s']:.2f} s ({late['ours_s'] / early['ours_s']:.2f}x of 10%, goal <= 1.1), HF {late['hf_s']:.2f} s "
              f"({late['hf_s'] / early['hf_s']:.2f}x)")
        print(f"  peak RSS: our DataLoader worker {runs['ours-worker']['worker_rss_mb']:.0f} MB, HF's "
              f"{runs['hf-worker']['worker_rss_mb']:.0f} MB; in one process ours {runs['ours']['rss_mb']:.0f} MB, HF "
              f"{runs['hf']['rss_mb']:.0f} MB (the imports alone: {floor['rss_mb']:.0f} MB)")
    print(f"\nshuffle quality: distinct neighbourhoods (1,024 consecutive documents) per batch of {BATCH}, of {BATCH} "
          "at most; tar shards of 1,024 samples vs Parquet row groups of 1,024 rows")
    results["shuffle"] = {}
    for buffer in (1000, 8192):
        mixed = results["shuffle"][buffer] = shuffle_quality(workdir, buffer)
        print(f"  data.shuffle_buffer={buffer}: tar {mixed['tar']:.1f}, Parquet {mixed['parquet']:.1f}")
    return results


if __name__ == "__main__":
    main()
