"""The epoch plan, the stream (order, equal batches, resume, elastic resume, faults,
resampled mode, remote sources) and the shard spec's errors."""
from __future__ import annotations

import collections
import functools
import http.server
import io
import itertools
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import KeyProcessor, write_shards
from framework.data import stream as stream_module
from framework.data.elastic import GatheredStates, assign, summarize, worker_dataset_states
from framework.data.loader import ResumableLoader
from framework.data.plan import Sources, epoch_order, epoch_plan
from framework.data.sources import Shard, count_samples, resolve_shards, with_counts
from framework.data.stream import ShardStream, collate_arrays
from framework.data.text import TokenPacker
from framework.errors import DataError

# ---------------------------------------------------------------- the plan (pure)


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    world=st.integers(1, 4), workers=st.integers(1, 3), batch=st.integers(1, 5),
    remainder=st.sampled_from(["drop", "pad", "none"]), seed=st.integers(0, 9), epoch=st.integers(0, 3),
)
def test_plan_covers_the_epoch_with_equal_batches_per_rank(counts, world, workers, batch, remainder, seed, epoch):
    plan = epoch_plan(counts, seed, epoch, world, workers, batch, remainder)
    total = sum(counts)
    read = collections.Counter(
        (seg.shard, i) for reader in plan.readers for seg in reader.segments for i in range(seg.start, seg.stop)
    )
    every = {(s, i) for s, n in enumerate(counts) for i in range(n)}
    assert set(read) <= every
    if remainder == "none":
        assert read == collections.Counter(every)  # every sample exactly once
        return
    per_rank = [sum(plan.reader(r, w).batches for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1, "every rank gets the same number of batches"
    assert all(plan.reader(r, w).samples == plan.reader(r, w).batches * batch for r in range(world) for w in range(workers))
    if remainder == "drop":
        assert max(read.values(), default=1) == 1 and plan.dropped == total - sum(read.values())
        assert plan.dropped < world * batch
        if total % (world * batch) == 0:
            assert set(read) == every, "when the data divides evenly every sample is read exactly once"
    else:
        assert set(read) == every or total == 0
        assert plan.repeated == sum(read.values()) - total < world * batch


def test_epoch_order_is_seeded_and_changes_per_epoch():
    assert epoch_order(50, 3, 0) == epoch_order(50, 3, 0)
    assert epoch_order(50, 3, 0) != epoch_order(50, 3, 1)
    assert epoch_order(50, 3, 0) != epoch_order(50, 4, 0)


# ---------------------------------------------------------------- the stream


def stream_of(shards, rank=0, world=1, processor=None, **kwargs):
    options = dict(seed=7, rank=rank, world_size=world, batch_size=4, shuffle_buffer=8, endless=False)
    options.update(kwargs)
    return ShardStream(shards, processor or KeyProcessor(), **options)


def epoch_items(shards, world, workers, **kwargs):
    """{(rank, worker): items} of one epoch, every reader simulated in this process."""
    return {
        (r, w): list(stream_of(shards, r, world, **kwargs).reader_items(w, workers))
        for r in range(world) for w in range(workers)
    }


@pytest.mark.parametrize("world,workers", [(4, 3), (2, 2), (1, 1), (3, 1)])
def test_seven_uneven_shards_equal_batches_each_sample_once(uneven_shards, world, workers):
    items = epoch_items(uneven_shards, world, workers)
    per_rank = [sum(len(items[r, w]) for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] % 4 == 0
    everything = [x for v in items.values() for x in v]
    assert len(everything) == len(set(everything)), "no sample twice"
    assert 88 - len(everything) < world * 4, "only the remainder is dropped"


def test_pad_policy_repeats_to_fill_and_counts(uneven_shards):
    items = epoch_items(uneven_shards, 3, 1, remainder="pad")
    everything = [x for v in items.values() for x in v]
    assert len(everything) == 96 and len(set(everything)) == 88  # 88 samples padded to 8 batches x 3 ranks x 4


def test_epochs_differ_and_seed_repeats(uneven_shards):
    one = list(itertools.islice(stream_of(uneven_shards, endless=True).reader_items(0, 1), 176))
    assert one[:88] != one[88:] and sorted(one[:88]) == sorted(one[88:])
    again = list(itertools.islice(stream_of(uneven_shards, endless=True).reader_items(0, 1), 176))
    assert one == again


def loader_of(shards, processor=None, workers=2, **kwargs):
    stream = stream_of(shards, processor=processor, endless=True, length=10**6, **kwargs)
    return ResumableLoader(stream, batch_size=4, num_workers=workers, collate_fn=kwargs.pop("collate", list_collate))


def list_collate(items):
    return list(items)


@settings(max_examples=6, deadline=None)
@given(cut=st.integers(1, 40), workers=st.sampled_from([0, 2]))
def test_resume_at_random_cut_points_continues_exactly(shared_uneven_shards, cut, workers):
    uneven_shards = shared_uneven_shards
    reference = list(itertools.islice(iter(loader_of(uneven_shards, workers=workers)), cut + 15))
    first = loader_of(uneven_shards, workers=workers)
    iterator = iter(first)
    for _ in range(cut):
        next(iterator)
    state = first.state_dict()
    del iterator
    resumed = loader_of(uneven_shards, workers=workers)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 15)) == reference[cut:]


@pytest.mark.parametrize("zero_copy", [False, True])
def test_resumed_text_loader_continues_exactly(text_corpus, zero_copy):
    def loader():
        stream = ShardStream(
            with_counts(resolve_shards(str(text_corpus["train"]))), TokenPacker(str(text_corpus["tokenizer"]), 32),
            seed=5, shuffle_buffer=16, length=10**6, zero_copy=zero_copy,
        )
        return ResumableLoader(stream, batch_size=4, num_workers=2, collate_fn=collate_arrays)

    reference = [b.numpy() for b in itertools.islice(iter(loader()), 30)]
    first = loader()
    iterator = iter(first)
    for _ in range(17):
        next(iterator)
    # Waiting token blocks are saved as (document, offset) origins, re-read on resume.
    workers = worker_dataset_states(first.local_state_dict(), 2)
    assert all(w["pending"]["origins"].shape[1:] == (2,) and len(w["pending"]["origins"]) >= 8 for w in workers)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    del iterator
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)  # as a checkpoint is loaded
    resumed = loader()
    resumed.load_state_dict(state)
    for expected, got in zip(reference[17:], itertools.islice(iter(resumed), 13)):
        np.testing.assert_array_equal(expected, got.numpy())


def test_resume_seeks_instead_of_rereading(uneven_shards, monkeypatch):
    opened = []
    real_open = stream_module.open_reader
    monkeypatch.setattr(stream_module, "open_reader",
                        lambda shard, offset=0, *rest: opened.append(offset) or real_open(shard, offset, *rest))
    stream = stream_of(uneven_shards, shuffle_buffer=0)
    items = stream.reader_items(0, 1)
    for _ in range(50):
        next(items)
    state = stream.state_dict()
    assert state["offset"] > 0 and state["consumed"] > 0
    opened.clear()
    resumed = stream_of(uneven_shards, shuffle_buffer=0)
    resumed.load_state_dict(state)
    next(resumed.reader_items(0, 1))
    assert opened == [state["offset"]], "the resumed reader opens its shard at the saved offset"


class CountingStates(GatheredStates):
    """Saved loader states that record which old ranks were read."""

    def __init__(self, ranks, num_workers):
        super().__init__({"world_size": len(ranks), "num_workers": num_workers, "ranks": ranks})
        self.read = []

    def loader_state(self, rank):
        self.read.append(rank)
        return super().loader_state(rank)


@settings(max_examples=12, deadline=None)
@given(old=st.tuples(st.integers(1, 3), st.integers(1, 2)), new=st.tuples(st.integers(1, 3), st.integers(1, 2)),
       cuts=st.lists(st.integers(0, 12), min_size=6, max_size=6))
def test_elastic_resume_sees_each_sample_once(tmp_path_factory, old, new, cuts):
    """Readers of an old (world, workers) stop at random points; their saved positions are
    re-planned over a new (world, workers); before + after = each epoch sample exactly once."""
    shards = write_shards(tmp_path_factory.mktemp("elastic"), [24, 8, 16, 24])  # 72 = divisible by 4 x {1,2,3}... x batch
    (old_world, old_workers), (new_world, new_workers) = old, new
    seen, rank_states = [], []
    for rank in range(old_world):
        workers = []
        for worker in range(old_workers):
            stream = stream_of(shards, rank, old_world, batch_size=2, endless=True)
            items = stream.reader_items(worker, old_workers)
            quota = stream.plan(0, old_workers).reader(rank, worker).samples
            seen += [next(items) for _ in range(min(cuts[rank * 2 + worker], quota))]
            workers.append(stream.state_dict())
        rank_states.append({"_snapshot": {"_worker_snapshots": {f"worker_{w}": {"dataset_state": s} for w, s in enumerate(workers)}}})
    saved = CountingStates(rank_states, old_workers)
    # step 1: each new rank sums up its share of the old ranks; the summaries are "gathered"
    summaries = {}
    for rank in range(new_world):
        summaries.update(summarize(stream_of(shards, rank, new_world, batch_size=2), saved, range(rank, old_world, new_world)))
    assert sorted(saved.read) == list(range(old_world)), "step 1 reads each old rank's state once"
    after = []
    for rank in range(new_world):
        saved.read.clear()
        stream = stream_of(shards, rank, new_world, batch_size=2)
        stream.elastic = assign(stream, saved, summaries, rank, new_world, new_workers)
        assert len(saved.read) <= old_world
        for worker in range(new_workers):
            stream = stream_of(shards, rank, new_world, batch_size=2)
            stream.elastic = assign(stream, saved, summaries, rank, new_world, new_workers)
            after += list(stream.reader_items(worker, new_workers))  # endless=False: the epoch's rest
    everything = seen + after
    assert len(everything) == len(set(everything)), "no sample seen twice"
    assert 72 - len(everything) < new_world * 2, "none lost but the new remainder"


def test_zero_copy_stream_reads_resumes_and_skips_like_the_copying_one(uneven_shards):
    copying = list(stream_of(uneven_shards).reader_items(0, 1))
    assert list(stream_of(uneven_shards, zero_copy=True).reader_items(0, 1)) == copying
    first = stream_of(uneven_shards, zero_copy=True)
    items = first.reader_items(0, 1)
    head = [next(items) for _ in range(30)]
    resumed = stream_of(uneven_shards, zero_copy=True)
    resumed.load_state_dict(first.state_dict())  # the shuffle buffer is re-read through the mapping
    assert head + list(resumed.reader_items(0, 1)) == copying
    data = open(uneven_shards[2].url, "rb").read()
    open(uneven_shards[2].url, "wb").write(data[: len(data) // 3])
    damaged = stream_of(uneven_shards, zero_copy=True)
    assert len(list(damaged.reader_items(0, 1))) == len(copying)
    assert damaged.counters["skipped_shards"] == 1


# ---------------------------------------------------------------- faults


def test_bad_sample_is_skipped_counted_and_batches_stay_equal(uneven_shards, caplog):
    bad = "s002x00004"
    items = epoch_items(uneven_shards, 2, 1, processor=KeyProcessor({bad}))
    assert len(items[0, 0]) == len(items[1, 0])
    assert bad not in sum(items.values(), [])
    assert f"sample {bad}" in caplog.text and "s-000002.tar" in caplog.text
    stream = stream_of(uneven_shards, 0, 1, processor=KeyProcessor({bad}), shuffle_buffer=0)
    list(stream.reader_items(0, 1))
    assert stream.counters["skipped_samples"] == 1 and stream.counters["repeated_samples"] == 1


def test_missing_and_truncated_shards_under_skip_and_raise(uneven_shards, caplog):
    truncated = uneven_shards[2].url
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 3])
    missing = uneven_shards[4]
    import os

    os.remove(missing.url)
    stream = stream_of(uneven_shards, 0, 1)
    items = list(stream.reader_items(0, 1))
    assert len(items) == 88 // 4 * 4  # equal batches kept by repeats
    assert stream.counters["skipped_shards"] == 2
    assert stream.counters["skipped_samples"] > 19
    assert missing.url in caplog.text and truncated in caplog.text
    with pytest.raises(DataError, match="s-00000[24].tar"):
        list(stream_of(uneven_shards, 0, 1, on_error="raise").reader_items(0, 1))


def test_a_stream_with_no_readable_sample_is_an_error(tmp_path):
    shards = write_shards(tmp_path, [5])
    with pytest.raises(DataError, match="no sample"):
        list(stream_of(shards, processor=KeyProcessor({f"s000x{i:05d}" for i in range(5)})).reader_items(0, 1))


# ---------------------------------------------------------------- resampled mode, sources


def test_resampled_mode_follows_weights_and_is_deterministic(tmp_path):
    web = write_shards(tmp_path, [10] * 4, prefix="web")
    code = write_shards(tmp_path, [10] * 4, prefix="code")
    sources = Sources(((0, 4), (4, 8)), (0.7, 0.3))

    def draw():
        stream = stream_of(web + code, mode="resampled", sources=sources, shuffle_buffer=0)
        return list(itertools.islice(stream.reader_items(0, 1), 4000))

    items = draw()
    assert items == draw()
    share = sum(x.startswith("web") for x in items) / len(items)
    assert 0.62 < share < 0.78


def test_small_draws_mix_sources_finely_and_resume_exactly(tmp_path):
    """data.draw_samples=3: every draw is a random stretch of 3 samples of a shard, so a 10%
    source shows up in every few dozen items (not a whole shard now and then); exact resume."""
    web = write_shards(tmp_path, [40] * 4, prefix="web")
    code = write_shards(tmp_path, [40] * 4, prefix="code")
    sources = Sources(((0, 4), (4, 8)), (0.9, 0.1))

    def stream():
        return stream_of(web + code, mode="resampled", sources=sources, shuffle_buffer=4, draw_samples=3)

    items = list(itertools.islice(stream().reader_items(0, 1), 3000))
    share = sum(x.startswith("code") for x in items) / len(items)
    assert 0.06 < share < 0.14
    gaps = [i for i, x in enumerate(items) if x.startswith("code")]
    assert max(b - a for a, b in zip(gaps, gaps[1:])) < 150, "the small source is never absent for long"
    whole = list(itertools.islice(stream_of(web + code, mode="resampled", sources=sources, shuffle_buffer=4).reader_items(0, 1), 3000))
    longest = max(len(list(run)) for _, run in itertools.groupby(x.startswith("code") for x in whole))
    assert longest >= 30, "whole-shard draws come in runs of a shard"
    first = stream()
    head = first.reader_items(0, 1)
    seen = [next(head) for _ in range(101)]
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    assert seen + list(itertools.islice(resumed.reader_items(0, 1), 200)) == items[:301]


def test_weighted_sources_in_config_need_resampled_mode(tmp_path):
    from framework.config.schema import DataConfig
    from framework.data.loader import check_data_config
    from framework.data.sources import resolve_sources

    write_shards(tmp_path / "a", [3]) if (tmp_path / "a").mkdir() is None else None
    write_shards(tmp_path / "b", [3]) if (tmp_path / "b").mkdir() is None else None
    shards, ranges, weights = resolve_sources([{"shards": str(tmp_path / "a"), "weight": 2}, {"shards": str(tmp_path / "b")}])
    assert ranges == [(0, 1), (1, 2)] and weights == [2.0, 1.0]
    with pytest.raises(DataError, match="data.mode=resampled"):
        check_data_config(DataConfig(train="x"), train_sources=2)
    with pytest.raises(DataError, match=r"data.train\[0\]"):
        resolve_sources([{"shard": "x"}])


def test_counts_without_manifest_by_headers(uneven_shards):
    assert [count_samples(s.url) for s in uneven_shards] == [13, 2, 31, 7, 19, 5, 11]
    assert [s.samples for s in with_counts([Shard(s.url) for s in uneven_shards])] == [13, 2, 31, 7, 19, 5, 11]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP range requests, as object stores do."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        header = self.headers.get("Range")
        if getattr(self.server, "trickle", False):
            return self.send_in_pieces()
        if not self.server.ranges or not header:
            return super().do_GET()
        path = self.translate_path(self.path)
        data = open(path, "rb").read()
        start, _, end = header.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start : end + 1])

    def send_in_pieces(self, piece: int = 317):
        """A slow network: the body arrives in small pieces, not aligned with tar blocks."""
        data = open(self.translate_path(self.path), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for start in range(0, len(data), piece):
            self.wfile.write(data[start : start + piece])
            self.wfile.flush()
            time.sleep(0.0005)


@pytest.mark.parametrize("ranges", [True, False])
def test_http_sources_with_and_without_range_requests(uneven_shards, ranges):
    directory = uneven_shards[0].url.rsplit("/", 1)[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=directory))
    server.ranges = ranges
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        remote = [Shard(f"http://127.0.0.1:{port}/{s.url.rsplit('/', 1)[1]}", s.samples) for s in uneven_shards]
        assert sorted(stream_of(remote).reader_items(0, 1)) == sorted(stream_of(uneven_shards).reader_items(0, 1))
        # resume over HTTP seeks with a range request
        stream = stream_of(remote, shuffle_buffer=0)
        items = stream.reader_items(0, 1)
        head = [next(items) for _ in range(30)]
        resumed = stream_of(remote, shuffle_buffer=0)
        resumed.load_state_dict(stream.state_dict())
        assert head + list(resumed.reader_items(0, 1)) == list(stream_of(remote, shuffle_buffer=0).reader_items(0, 1))
    finally:
        server.shutdown()


def test_http_body_arriving_in_pieces_reads_whole_samples(uneven_shards, tmp_path):
    from framework.data.cache import ShardCache

    directory = uneven_shards[0].url.rsplit("/", 1)[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=directory))
    server.ranges, server.trickle = False, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        remote = [Shard(f"http://127.0.0.1:{port}/{s.url.rsplit('/', 1)[1]}", s.samples) for s in uneven_shards]
        local = list(stream_of(uneven_shards, shuffle_buffer=0).reader_items(0, 1))
        assert list(stream_of(remote, shuffle_buffer=0).reader_items(0, 1)) == local
        cache = ShardCache(tmp_path / "cache", limit_bytes=10**9)
        assert list(stream_of(remote, cache=cache, shuffle_buffer=0).reader_items(0, 1)) == local
        assert len(list((tmp_path / "cache").glob("*.tar"))) == len(remote), "every shard read to its end was kept"
    finally:
        server.shutdown()


def test_pipe_sources(uneven_shards):
    piped = [Shard(f"pipe:cat {s.url}", s.samples) for s in uneven_shards]
    assert list(stream_of(piped, shuffle_buffer=0).reader_items(0, 1)) == list(stream_of(uneven_shards, shuffle_buffer=0).reader_items(0, 1))


def test_shard_spec_errors(tmp_path):
    with pytest.raises(DataError, match="shard not found: .*nope.tar"):
        resolve_shards(str(tmp_path / "nope.tar"), "data.train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no shards \(\*.tar, \*.tar.gz, \*.tgz\) or row files \(\*.parquet, .*\) in directory"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="data.val is empty"):
        resolve_shards("", "data.val")
    with pytest.raises(DataError, match="matches no shard"):
        resolve_shards(str(tmp_path / "x-*.tar"))


def test_remote_shards_are_cached_with_a_size_limit(uneven_shards, tmp_path):
    from framework.data.cache import ShardCache

    directory = uneven_shards[0].url.rsplit("/", 1)[0]
    requests = []

    class CountingHandler(RangeHandler):
        def do_GET(self):
            requests.append(self.path)
            return super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=directory))
    server.ranges = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        remote = [Shard(f"http://127.0.0.1:{port}/{s.url.rsplit('/', 1)[1]}", s.samples) for s in uneven_shards]
        cache = ShardCache(tmp_path / "cache", limit_bytes=10**9)
        first = list(stream_of(remote, cache=cache, shuffle_buffer=0).reader_items(0, 1))
        assert len(list((tmp_path / "cache").glob("*.tar"))) == 7 and not list((tmp_path / "cache").glob("*.tmp"))
        requests.clear()
        assert list(stream_of(remote, cache=cache, shuffle_buffer=0).reader_items(0, 1)) == first
        assert requests == [], "the second pass reads the local copies"
        small = ShardCache(tmp_path / "small", limit_bytes=3 * 12 * 1024)
        list(stream_of(remote, cache=small, shuffle_buffer=0).reader_items(0, 1))
        assert sum(p.stat().st_size for p in (tmp_path / "small").iterdir()) <= 3 * 12 * 1024
    finally:
        server.shutdown()
