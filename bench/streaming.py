"""Streaming throughput: raw tar bytes vs plain webdataset vs this framework's stream.

    .venv/bin/python bench/streaming.py [--text-samples 150000] [--images 1500] [--workdir /tmp/bench-streaming]

Writes ~150 MB of ~1 KB text samples and ~150 MB of ~100 KB JPEG images as tar shards (and the
text shards again gzip-compressed, .tar.gz), then measures in one process, side by side:
  (a) reading the tar bytes with no parsing (the ceiling),
  (b) a plain ``webdataset.WebDataset(...).decode()`` pipeline doing the same decode,
  (c) ``ShardStream`` with the global shuffle (buffer 1000), equal batches (epoch plan,
      batch 32, drop) and its resumable state snapshotted after every batch, as the
      training loader does.
  (z) the same stream with ``zero_copy`` (data.zero_copy): shards memory-mapped, members
      handed out as memoryviews, no copy per sample (undecoded data only).
Decodes: text -> UTF-8 str; images -> PIL -> uint8 array; "raw" -> the bytes untouched.
Also the time to resume at 90% of an epoch vs at its start, and inside a gzip shard (which is
re-decompressed up to the saved position: its cost grows with the position in the shard).
"""
from __future__ import annotations

import argparse
import gzip
import io
import itertools
import os
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from framework.data.sources import Shard
from framework.data.stream import ShardStream

BATCH = 32


def write_shards(directory: Path, prefix: str, samples, per_shard: int) -> list[Shard]:
    directory.mkdir(parents=True, exist_ok=True)
    shards, count = [], 0
    batch = list(itertools.islice(samples, per_shard))
    while batch:
        path = directory / f"{prefix}-{len(shards):06d}.tar"
        if not path.exists():
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, ext, data in batch:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(Shard(str(path), len(batch)))
        count += len(batch)
        batch = list(itertools.islice(samples, per_shard))
    return shards


def gzip_shards(shards: list[Shard]) -> list[Shard]:
    packed = []
    for shard in shards:
        target = Path(shard.url).with_suffix(".tar.gz")
        if not target.exists():
            target.write_bytes(gzip.compress(Path(shard.url).read_bytes(), compresslevel=6))
        packed.append(Shard(str(target), shard.samples))
    return packed


def text_samples(n: int):
    words = "the of and to in is that for it as with was on be by this are from or have an not".split()
    rng = random.Random(0)
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(150, 230)))
        yield f"t{i:09d}", "txt", text.encode()


def image_samples(n: int):
    rng = np.random.default_rng(0)
    base = (rng.random((384, 384, 3)) * 255).astype(np.uint8)
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(base, i, axis=0)).save(buffer, format="JPEG", quality=75)
        yield f"i{i:09d}", "jpg", buffer.getvalue()


class Decode:
    """The decode of one sample, the same function for (b) and (c)."""

    one_to_one = True

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, key, sample, shard):
        if self.kind == "text":
            return [sample["txt"].decode("utf-8")]
        if self.kind == "image":
            return [np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))]
        return [sample["jpg"]]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def measure(fn) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - start


def raw_bytes(shards) -> int:
    for shard in shards:
        with open(shard.url, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
    return sum(s.samples for s in shards)


def plain_webdataset(shards, kind: str) -> int:
    dataset = wds.WebDataset([s.url for s in shards], shardshuffle=False)
    if kind == "text":
        dataset = dataset.decode()  # .txt -> str
    elif kind == "image":
        dataset = dataset.decode("rgb8")  # PIL -> uint8 array
    n = 0
    for _ in dataset:
        n += 1
    return n


def ours(shards, kind: str, zero_copy: bool = False) -> int:
    stream = ShardStream(shards, Decode(kind), seed=0, batch_size=BATCH, shuffle_buffer=1000, endless=False,
                         zero_copy=zero_copy)
    n = 0
    for n, _ in enumerate(stream.reader_items(0, 1), 1):
        if n % BATCH == 0:
            stream.state_dict()  # what the training loader snapshots after every batch
    return n


def resume_time(shards, kind: str, fraction: float) -> float:
    stream = ShardStream(shards, Decode(kind), seed=0, batch_size=BATCH, shuffle_buffer=1000, endless=False)
    items = stream.reader_items(0, 1)
    for _ in range(int(sum(s.samples for s in shards) * fraction)):
        next(items)
    state = stream.state_dict()
    start = time.perf_counter()
    resumed = ShardStream(shards, Decode(kind), seed=0, batch_size=BATCH, shuffle_buffer=1000, endless=False)
    resumed.load_state_dict(state)
    next(resumed.reader_items(0, 1))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-samples", type=int, default=150_000)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--workdir", default="/tmp/bench-streaming")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.workdir)
    print("writing shards (kept in", work, "for the next run) ...", flush=True)
    text = write_shards(work / "text", "text", text_samples(args.text_samples), 10_000)
    images = write_shards(work / "images", "img", image_samples(args.images), 100)
    text_gz = gzip_shards(text)
    datasets = {"text ~1KB": (text, "text"), "text ~1KB .tar.gz": (text_gz, "text"), "images ~100KB": (images, "image"),
                "images undecoded": (images, "raw")}
    print(f"\n{'data':18} {'reader':28} {'samples/s':>12} {'MB/s':>9}   (best of {args.rounds} alternating rounds)")
    results = {}
    for name, (shards, kind) in datasets.items():
        size = sum(os.path.getsize(s.url) for s in shards) / 2**20
        readers = [("(a) raw tar bytes", lambda: raw_bytes(shards)),
                   ("(b) webdataset", lambda: plain_webdataset(shards, kind)),
                   ("(c) framework stream", lambda: ours(shards, kind))]
        if kind == "raw":
            readers.pop(1)
            readers.append(("(z) stream, data.zero_copy", lambda: ours(shards, kind, zero_copy=True)))
        best = {}
        raw_bytes(shards)  # warm the page cache alike for everyone
        for _ in range(args.rounds):  # alternate, so background load hits every reader alike
            for label, fn in readers:
                n, seconds = measure(fn)
                best[label] = max(best.get(label, (0, 0)), (n / seconds, size / seconds))
        for label, _ in readers:
            results[name, label[:3]] = best[label]
            print(f"{name:18} {label:28} {best[label][0]:12,.0f} {best[label][1]:9.1f}", flush=True)
    print()
    print(f"text:   (c)/(b) = {results['text ~1KB', '(c)'][0] / results['text ~1KB', '(b)'][0]:.2f}  (goal >= 3)")
    print(f"text .tar.gz: (c)/(b) = {results['text ~1KB .tar.gz', '(c)'][0] / results['text ~1KB .tar.gz', '(b)'][0]:.2f}; "
          f"gzip costs the stream {1 - results['text ~1KB .tar.gz', '(c)'][0] / results['text ~1KB', '(c)'][0]:.0%} of its plain-tar rate")
    print(f"images: (c)/(b) = {results['images ~100KB', '(c)'][0] / results['images ~100KB', '(b)'][0]:.2f}  (goal >= 1)")
    for label, reader in (("(c)", "default: bytes"), ("(z)", "data.zero_copy: memoryviews")):
        ratio = results["images undecoded", label][1] / results["images undecoded", "(a)"][1]
        print(f"undecoded images: {label}/(a) in MB/s = {ratio:.2f}  (goal >= 0.8; {reader})")
    for name, shards, kind in (("text", text, "text"), ("text .tar.gz", text_gz, "text"), ("images", images, "raw")):
        times = {f: min(resume_time(shards, kind, f) for _ in range(args.rounds)) for f in (0.0, 0.1, 0.9)}
        print(f"resume ({name}): at the start {times[0.0] * 1000:.1f} ms, at 10% {times[0.1] * 1000:.1f} ms, "
              f"at 90% of the epoch {times[0.9] * 1000:.1f} ms  (goal: the same within noise; a resume re-reads the "
              f"shuffle buffer's samples, as a fresh start fills it)")
    one = text_gz[:1]  # one shard: a resume inside it decompresses up to the saved position
    megabytes = os.path.getsize(text[0].url) / 2**20
    times = {f: min(resume_time(one, "text", f) for _ in range(args.rounds)) for f in (0.0, 0.5, 0.9)}
    print(f"resume inside one .tar.gz shard ({megabytes:.0f} MB decompressed): at its start {times[0.0] * 1000:.1f} ms, "
          f"at 50% {times[0.5] * 1000:.1f} ms, at 90% {times[0.9] * 1000:.1f} ms "
          f"(re-decompressing ~{0.9 * megabytes / max(times[0.9] - times[0.0], 1e-9):.0f} MB/s)")


if __name__ == "__main__":
    main()
