"""`pretrain data inspect`: the plan as training would read it, and --verify's reports."""
from __future__ import annotations

import os

from conftest import KeyProcessor, write_shards
from framework.data.inspect import inspect_data


def test_plan_summary_for_seven_uneven_shards(tmp_path):
    write_shards(tmp_path, [13, 2, 31, 7, 19, 5, 11])
    lines = []
    summary = inspect_data(str(tmp_path), seed=0, batch_size=4, remainder="drop", world_size=4, num_workers=3, report=lines.append)
    assert summary["batches_per_rank"] == [5, 5, 5, 5] and summary["dropped"] == 88 - 80
    assert summary["duplicates"] == 0 and summary["missing"] == 0
    assert lines[-1].startswith("samples=88 planned=80 unique=80 duplicates=0 missing=0 dropped=8")
    assert "  samples per rank: 20..20; batches per rank: 5..5 (--per-rank lists each rank and worker)" in lines
    assert not any("rank 3:" in line for line in lines)  # a summary, not 4,096 lines at scale
    listed = []
    inspect_data(str(tmp_path), seed=0, batch_size=4, remainder="drop", world_size=4, num_workers=3, report=listed.append,
                 per_rank=True)
    assert any("rank 3:" in line and "worker 2:" in line for line in listed)


def test_interval_coverage_equals_counting_every_sample():
    """coverage() against a per-sample count, on real plans and on plans with overlaps and holes."""
    import collections
    import random

    from framework.data.inspect import coverage
    from framework.data.plan import EpochPlan, ReaderPlan, Segment, epoch_plan

    def counted(plan):
        read = collections.Counter((s.shard, i) for r in plan.readers for s in r.segments for i in range(s.start, s.stop))
        return sum(read.values()), len(read)

    rng = random.Random(0)
    for trial in range(30):
        counts = [rng.randint(0, 40) for _ in range(rng.randint(1, 12))]
        for remainder in ("drop", "pad", "none"):
            plan = epoch_plan(counts, trial, 0, rng.randint(1, 5), rng.randint(1, 3), rng.randint(1, 6), remainder)
            assert coverage(plan) == counted(plan)
        segments = []
        for _ in range(rng.randint(1, 20)):  # arbitrary, overlapping, nested, touching
            shard, start = rng.randint(0, 3), rng.randint(0, 30)
            segments.append(Segment(shard, start, start + rng.randint(0, 12)))
        plan = EpochPlan((ReaderPlan(tuple(segments[::2]), 0), ReaderPlan(tuple(segments[1::2]), 0)), 1, 0, 0, 0, 0)
        assert coverage(plan) == counted(plan), segments


def test_verify_names_bad_samples_and_shards(tmp_path):
    shards = write_shards(tmp_path, [6, 6, 6])
    data = open(shards[1].url, "rb").read()
    open(shards[1].url, "wb").write(data[:1500])  # truncated
    lines = []
    summary = inspect_data(
        str(tmp_path), seed=0, batch_size=2, remainder="pad", world_size=2, num_workers=1,
        processor=KeyProcessor({"s002x00003"}), verify=True, report=lines.append,
    )
    assert summary["bad"] == 2
    assert any(line.startswith("bad sample:") and "s002x00003" in line for line in lines)
    assert any(line.startswith("bad shard:") and "s-000001.tar" in line for line in lines)


def test_cli_exit_status_and_last_line(tmp_path, text_corpus, capsys):
    import pytest

    from framework.cli import main

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "experiments", "gpt-tiny.yaml")
    main(["data", "inspect", "--config", config, f"data.train={text_corpus['train']}", f"data.val={text_corpus['val']}",
          f"data.tokenizer={text_corpus['tokenizer']}",
          "--world-size", "2", "--workers", "2", "--verify"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "duplicates=0 missing=0" in last and "bad=0" in last


def test_verify_in_parallel_and_packed_text_counts(text_corpus):
    """--jobs 2 finds what one process finds; packed text reports its tokens and blocks per rank."""
    from framework.data.text import TokenPacker
    from framework.text.tokenizer import load_tokenizer

    runs = []
    for jobs in (1, 2):
        lines = []
        summary = inspect_data(str(text_corpus["train"]), seed=0, batch_size=2, remainder="drop", world_size=2, num_workers=2,
                               processor=TokenPacker(str(text_corpus["tokenizer"]), 64), verify=True, report=lines.append,
                               jobs=jobs)
        runs.append((summary, lines))
    assert runs[0] == runs[1]
    summary, lines = runs[0]
    tokenizer = load_tokenizer(str(text_corpus["tokenizer"]))
    from framework.data.sources import open_shard, resolve_shards
    from framework.data.tar import iter_samples

    expected = 0
    for shard in resolve_shards(str(text_corpus["train"])):
        with open_shard(shard.url) as stream:
            expected += sum(len(tokenizer.encode(str(s["txt"], "utf-8")).ids) + 1 for _, s, _ in iter_samples(stream))
    assert summary["tokens"] == expected and summary["missing"] == 0 and summary["duplicates"] == 0
    assert sum(summary["blocks_per_rank"]) <= expected // 64 and min(summary["blocks_per_rank"]) > 0
    assert any(line.startswith("  packed text, epoch 0: tokens per rank") for line in lines)
