"""Scale figures of the data layer: ``pretrain data inspect`` on a web-sized corpus.

A generated manifest of 100,000 shards x 10,000 samples (10^9 samples; the shard files are
empty placeholders: a manifest's counts are what planning reads, nothing opens them) is planned for 4,096 ranks x 8
dataloader workers, and its coverage proven (no duplicates, nothing missing but the policy's
remainder) by interval arithmetic: wall time and peak memory of the process. Goal: <= 30 s
and <= 2 GB.

    .venv/bin/python bench/scale.py [--shards 100000] [--samples 10000] [--ranks 4096] [--workers 8]
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
