"""The epoch plan, the stream's resumable state, and the shard spec's errors."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from framework.data import sources, stream as stream_module
from framework.data.plan import epoch_order, worker_plan
from framework.data.sources import resolve_shards
from framework.data.stream import ShardStream, collate_arrays
from framework.data.text import TokenPacker
from framework.errors import DataError


@settings(max_examples=60, deadline=None)
@given(shards=st.integers(1, 40), world=st.integers(1, 4), workers=st.integers(1, 4), seed=st.integers(0, 99), epoch=st.integers(0, 5))
def test_every_shard_or_sample_is_read_once_per_epoch(shards, world, workers, seed, epoch):
    plans = [worker_plan(shards, seed, epoch, r, world, w, workers) for r in range(world) for w in range(workers)]
    if shards >= world * workers:
        assert sorted(itertools.chain.from_iterable(p.shards for p in plans)) == list(range(shards))
    else:  # sample-level split: every reader sees all shards, phases partition the samples
        assert {p.phase for p in plans} == set(range(world * workers)) and all(p.stride == world * workers for p in plans)


def test_epoch_order_is_seeded_and_changes_per_epoch():
    assert epoch_order(50, 3, 0) == epoch_order(50, 3, 0)
    assert epoch_order(50, 3, 0) != epoch_order(50, 3, 1)
    assert epoch_order(50, 3, 0) != epoch_order(50, 4, 0)


def text_loader(corpus, **kwargs):
    stream = ShardStream(
        resolve_shards(str(corpus["train"])), TokenPacker(str(corpus["tokenizer"]), 32),
        seed=5, shuffle_buffer=16, length=10**6, **kwargs,
    )
    return StatefulDataLoader(stream, batch_size=4, num_workers=2, collate_fn=collate_arrays)


@pytest.mark.parametrize("cut", [1, 7, 23])
def test_resumed_loader_continues_exactly(text_corpus, cut):
    """Stop after `cut` batches, restore the state into a new loader: the batches that follow
    are exactly those an uninterrupted loader yields (same order, no gap, no repeat)."""
    reference = [b.numpy() for b in itertools.islice(iter(text_loader(text_corpus)), cut + 12)]
    first = text_loader(text_corpus)
    iterator = iter(first)
    for _ in range(cut):
        next(iterator)
    state = first.state_dict()
    del iterator
    resumed = text_loader(text_corpus)
    resumed.load_state_dict(state)
    after = [b.numpy() for b in itertools.islice(iter(resumed), 12)]
    for expected, got in zip(reference[cut:], after):
        np.testing.assert_array_equal(expected, got)


def test_resume_seeks_instead_of_rereading(text_corpus, monkeypatch):
    opened = []
    real_open = sources.open_shard

    def recording_open(url, offset=0):
        opened.append(offset)
        return real_open(url, offset)

    monkeypatch.setattr(stream_module, "open_shard", recording_open)
    stream = ShardStream(resolve_shards(str(text_corpus["train"])), TokenPacker(str(text_corpus["tokenizer"]), 32), seed=0)
    items = iter(stream)
    for _ in range(40):
        next(items)
    state = stream.state_dict()
    assert state["offset"] > 0
    opened.clear()
    resumed = ShardStream(resolve_shards(str(text_corpus["train"])), TokenPacker(str(text_corpus["tokenizer"]), 32), seed=0)
    resumed.load_state_dict(state)
    items = iter(resumed)
    while not opened:  # items carried in the state come first, then the shard is reopened
        next(items)
    assert opened[0] == state["offset"]


def test_ranks_read_disjoint_data(text_corpus):
    def blocks(rank):
        stream = ShardStream(
            resolve_shards(str(text_corpus["train"])), TokenPacker(str(text_corpus["tokenizer"]), 32),
            seed=0, rank=rank, world_size=2, infinite=False,
        )
        return {tuple(b) for b in stream}

    zero, one = blocks(0), blocks(1)
    assert zero and one and not zero & one


def test_shard_spec_errors(tmp_path):
    with pytest.raises(DataError, match="shard not found: .*nope.tar"):
        resolve_shards(str(tmp_path / "nope.tar"), "data.train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards in directory"):
        resolve_shards(str(tmp_path / "empty"))
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(DataError, match="shard is empty"):
        resolve_shards(str(tmp_path / "zero.tar"))
    with pytest.raises(DataError, match="data.val is empty"):
        resolve_shards("", "data.val")
    with pytest.raises(DataError, match="matches no shard"):
        resolve_shards(str(tmp_path / "x-*.tar"))


def test_truncated_shard_names_the_shard(text_corpus, tmp_path):
    source = sorted(text_corpus["train"].glob("*.tar"))[0]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(source.read_bytes()[:3000])
    stream = ShardStream([sources.Shard(str(broken))], TokenPacker(str(text_corpus["tokenizer"]), 32), seed=0, infinite=False)
    with pytest.raises(DataError, match="broken.tar"):
        list(stream)
