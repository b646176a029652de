"""Scale figures of the data layer: ``pretrain data inspect`` on a web-sized corpus, and
the size of the data state a checkpoint holds, with exact and elastic resume timed.

Inspect: a generated manifest of 100,000 shards x 10,000 samples (10^9 samples; the shard files are
empty placeholders: a manifest's counts are what planning reads, nothing opens them) is planned for 4,096 ranks x 8
dataloader workers, and its coverage proven (no duplicates, nothing missing but the policy's
remainder) by interval arithmetic: wall time and peak memory of the process. Goal: <= 30 s
and <= 2 GB.

State: a real dataloader worker's state of packed text at ``seq_len`` 2048 with a 1,000-block
shuffle buffer, mid-epoch (shards of the whole standard library's source, the demo's tokenizer;
its waiting blocks saved as origins and re-read on resume), in bytes per worker, per rank, on rank 0 and in all for
4,096 ranks x 8 workers, against storing the blocks as int64 or uint16 tokens. Goal: <= 1 MB
per worker. The resume from that state is checked item for item and timed. Then 4,096 rank
files of such states (positions spread over the plan of the generated manifest) are written,
and an elastic resume to 3,072 ranks is simulated in this process: per new rank, the time and
the files read in each of its two steps (``framework.data.elastic``), and that the new ranks'
shares add up to what the old readers had left.

    .venv/bin/python bench/scale.py [--part inspect|state|all] [--shards 100000] [--samples 10000] [--ranks 4096] [--workers 8]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--ranks", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--part", choices=("inspect", "state", "all"), default="all")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (samples, and waiting blocks)")
    parser.add_argument("--new-ranks", type=int, default=3072)
    args = parser.parse_args(argv)
    figures = {}
    if args.part in ("inspect", "all"):
        figures["inspect"] = inspect_figures(args)
    if args.part in ("state", "all"):
        figures["state"] = state_figures(args)
    return figures


def inspect_figures(args: argparse.Namespace) -> dict:
    from framework.data.inspect import inspect_data
    from framework.data.manifest import write_manifest

    with tempfile.TemporaryDirectory() as directory:
        shards = [{"path": f"shard-{i:06d}.tar", "samples": args.samples, "bytes": 1} for i in range(args.shards)]
        for shard in shards:
            (Path(directory) / shard["path"]).touch()
        write_manifest(directory, shards, "text")
        del shards
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lines: list[str] = []
        start = time.perf_counter()
        summary = inspect_data(directory, seed=0, batch_size=args.batch, remainder="drop", world_size=args.ranks,
                               num_workers=args.workers, report=lines.append)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("\n".join(lines))
    total = args.shards * args.samples
    print(f"\ndata inspect: {args.shards:,} shards x {args.samples:,} samples = {total:,} samples, {args.ranks:,} ranks x "
          f"{args.workers} workers, batch {args.batch}")
    print(f"  {seconds:.1f} s, peak memory {peak / 2**20:.2f} GB (before planning {before / 2**20:.2f} GB); "
          f"goal <= 30 s and <= 2 GB")
    assert summary["duplicates"] == 0 and summary["missing"] == 0, summary
    return {"seconds": seconds, "peak_gb": peak / 2**20, **{k: v for k, v in summary.items() if k != "batches_per_rank"}}



def _size(obj) -> int:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def real_worker_state(args: argparse.Namespace):
    """A text worker's state in its steady state, the stream factory and the items after it."""
    import sysconfig

    from framework.data.sources import resolve_shards, with_counts
    from framework.data.stream import ShardStream
    from framework.data.text import TokenPacker
    from framework.data.writers.text import write_text_shards
    from framework.demo import prepare_data, stdlib_sources

    _, _, tokenizer = prepare_data(REPO / "runs" / "demo" / "data")  # the demo's tokenizer
    # The whole standard library with its tests (~50 MB of .py): enough documents that the
    # shuffle buffer is full and 1,000 blocks wait, mid-epoch.
    corpus = REPO / "runs" / "bench-scale" / "shards"
    if not (corpus / "manifest.json").exists():
        inputs = stdlib_sources() + [str(Path(sysconfig.get_paths()["stdlib"]) / "test")]
        write_text_shards(inputs, str(corpus), include=["*.py"], overwrite=True)
    shards = with_counts(resolve_shards(str(corpus)))

    def stream():
        return ShardStream(shards, TokenPacker(str(tokenizer), args.seq_len), seed=0, shuffle_buffer=args.buffer,
                           batch_size=8, length=1 << 40)

    first = stream()
    items = first.reader_items(0, 1)
    while len(first._pending) < args.buffer - 1 or len(first._buffer) < args.buffer - 1:
        next(items)
    for _ in range(200):  # steady state: both buffers mix, documents come and go
        next(items)
    assert len(first._buffer) >= args.buffer - 1, "the corpus ran out before the steady state"
    return first, first.state_dict(), stream, [next(items) for _ in range(64)]


def state_figures(args: argparse.Namespace) -> dict:
    import numpy as np

    first, state, stream, expected = real_worker_state(args)
    per_worker = _size(state)
    waiting = len(state["pending"]["origins"])
    as_int64 = waiting * args.seq_len * 8
    start = time.perf_counter()
    resumed = stream()
    resumed.load_state_dict(state)
    items = resumed.reader_items(0, 1)
    got = [next(items)]
    resume_seconds = time.perf_counter() - start
    got += [next(items) for _ in range(63)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got)), "the resumed worker continues exactly"
    workers, ranks = args.workers, args.ranks
    print(f"\ndata state of one worker, packed text, seq_len {args.seq_len}, shuffle buffer {args.buffer} "
          f"({waiting} blocks waiting, {len(state['buffer'])} samples buffered, "
          f"{len(state['processor']['documents']['rows'])} document locators):")
    print(f"  {per_worker / 1e6:.3f} MB per worker (goal <= 1 MB); waiting blocks as int64 tokens would be "
          f"{as_int64 / 1e6:.1f} MB, as uint16 {as_int64 / 4e6:.1f} MB")
    print(f"  {per_worker * workers / 1e6:.2f} MB per rank ({workers} workers), in that rank's own file; rank 0 writes "
          f"its own file and gathers nothing")
    print(f"  {per_worker * workers * ranks / 1e9:.1f} GB in all for {ranks:,} ranks (int64 blocks gathered on rank 0: "
          f"{as_int64 * workers * ranks / 1e9:.0f} GB)")
    print(f"  resume of this worker (re-read and re-tokenize its buffered documents, first item): {resume_seconds:.2f} s; "
          f"the next 64 items equal the original's")
    figures = {"bytes_per_worker": per_worker, "int64_bytes_per_worker": as_int64, "resume_seconds": resume_seconds}
    figures.update(elastic_figures(args, state))
    return figures


def elastic_figures(args: argparse.Namespace, template: dict) -> dict:
    """4,096 ranks' state files over the generated manifest's plan, resumed on 3,072."""
    import copy
    import random

    import torch

    import framework.data.elastic as elastic_module
    from framework.data.elastic import assign, summarize
    from framework.data.plan import epoch_plan
    from framework.data.sources import Shard
    from framework.data.stream import ShardStream
    from framework.training.checkpoint import RANK_FILE, RankStateFiles, collect_rng_states

    old, new, workers = args.ranks, args.new_ranks, args.workers
    shards = [Shard(f"shard-{i:06d}.tar", args.samples) for i in range(args.shards)]

    def stream(rank: int, world: int) -> ShardStream:
        return ShardStream(shards, template_processor, seed=0, rank=rank, world_size=world, batch_size=args.batch,
                           shuffle_buffer=args.buffer, length=1 << 40)

    class template_processor:  # a one-item processor: the elastic re-plan only reads positions
        one_to_one = True

    start = time.perf_counter()
    plan = epoch_plan([args.samples] * args.shards, 0, 0, old, workers, args.batch, "drop")
    plan_seconds = time.perf_counter() - start
    # Every new rank computes this same old seeded plan once (timed above); the simulated ranks share it.
    elastic_module.epoch_plan = lambda *a, **k: plan
    fingerprint = stream(0, old).fingerprint(workers)
    rng = random.Random(0)
    handed_out = 0
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        for rank in range(old):
            snapshots = {}
            for worker in range(workers):
                segment = plan.reader(rank, worker).segments[0]
                consumed = rng.randrange(len(segment) // 2, len(segment))  # read so far; some of it still buffered
                buffered = rng.sample(range(consumed), min(args.buffer, consumed))
                state = copy.copy(template)
                state.update(fingerprint=fingerprint, epoch=0, segment=0, consumed=consumed, offset=consumed * 4096,
                             yielded=consumed - len(buffered),
                             buffer=[(segment.shard, segment.start + i, 0) for i in buffered])
                handed_out += consumed - len(buffered)
                snapshots[f"worker_{worker}"] = {"dataset_state": state}
            loader = {"_snapshot": {"_worker_snapshots": snapshots}}
            torch.save({"rng": collect_rng_states(), "data": [loader]}, Path(directory) / RANK_FILE.format(rank))
        written = time.perf_counter() - start
        file_bytes = sum(p.stat().st_size for p in Path(directory).iterdir())

        start = time.perf_counter()
        own = RankStateFiles(Path(directory), old, workers, 0).loader_state(0)
        exact_seconds = time.perf_counter() - start
        assert own["_snapshot"]

        # step 1: every new rank sums up old ranks r, r + new, ... (here all, in turn)
        summaries, step1, read1 = {}, [], []
        for rank in range(new):
            saved = RankStateFiles(Path(directory), old, workers, 0)
            start = time.perf_counter()
            summaries.update(summarize(stream(rank, new), saved, range(rank, old, new)))
            step1.append(time.perf_counter() - start)
            read1.append(len(saved.files_read))
        gathered_bytes = _size(summaries)
        # step 2: each new rank's share, from the gathered summaries and the files it needs
        step2, read2, assigned, dropped = [], [], 0, 0
        for rank in range(new):
            saved = RankStateFiles(Path(directory), old, workers, 0)
            start = time.perf_counter()
            share = assign(stream(rank, new), saved, summaries, rank, new, workers)
            step2.append(time.perf_counter() - start)
            read2.append(len(saved.files_read))
            assigned += sum(len(s) for segments, _ in share["readers"].values() for s in segments)
            dropped = share["dropped"]
    left = plan.total_samples - plan.dropped - handed_out
    assert assigned + dropped == left, (assigned, dropped, left)
    print(f"\nelastic resume {old:,} -> {new:,} ranks x {workers} workers, simulated in one process from {old:,} state "
          f"files ({file_bytes / 1e9:.2f} GB, written in {written:.0f} s):")
    print(f"  exact resume: a rank reads its own file: {exact_seconds * 1e3:.1f} ms")
    print(f"  the old seeded plan, computed once by every new rank: {plan_seconds:.2f} s")
    print(f"  step 1 (sum up its old ranks): median {sorted(step1)[new // 2]:.3f} s, max {max(step1):.2f} s, "
          f"files read {min(read1)}-{max(read1)} per rank")
    print(f"  all-gather of the summaries: {gathered_bytes / 1e6:.2f} MB (four numbers per old reader)")
    print(f"  step 2 (its share): median {sorted(step2)[new // 2]:.3f} s, max {max(step2):.2f} s, files read "
          f"{min(read2)}-{max(read2)} per rank; the shares add up to the {left:,} samples left "
          f"({dropped:,} dropped by the policy)")
    return {"exact_resume_seconds": exact_seconds, "old_plan_seconds": plan_seconds, "elastic_step1_median_s": sorted(step1)[new // 2],
            "elastic_step2_median_s": sorted(step2)[new // 2], "files_read_max": max(read1) + max(read2)}


if __name__ == "__main__":
    main()
