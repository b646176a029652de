"""The data state a checkpoint holds: compact (waiting token blocks as origins, re-read on
resume), exact, and read per rank (elastic resume reads only the files its share needs)."""
from __future__ import annotations

import io
import itertools
import random
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import KeyProcessor, write_shards
from framework.data.elastic import GatheredStates, assign, summarize
from framework.data.loader import GATHERED_FORMAT, ResumableLoader
from framework.data.sources import Shard
from framework.data.stream import ShardStream, _pack_items, _unpack_items
from framework.data.text import TokenPacker
from framework.training.checkpoint import RANKS_SUFFIX, prune, remove_stale_temporaries

WORDS = "the data state of every rank is written by that rank beside its checkpoint and read back".split()


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """Documents of 1 to 40 words: 16-token blocks span several of them."""
    directory = tmp_path_factory.mktemp("short")
    rng = random.Random(3)
    shards = []
    for number, size in enumerate([9, 14, 6, 11]):
        path = directory / f"doc-{number:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(size):
                data = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))).encode()
                info = tarfile.TarInfo(f"d{number}x{i:03d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(Shard(str(path), size))
    return shards


def text_stream(shards, tokenizer, **kwargs):
    options = dict(seed=11, batch_size=4, shuffle_buffer=12, length=10**6)
    options.update(kwargs)
    return ShardStream(shards, TokenPacker(str(tokenizer), 16), **options)


def through_checkpoint(state):
    saved = io.BytesIO()
    torch.save(state, saved)
    return torch.load(io.BytesIO(saved.getvalue()), weights_only=True), saved.tell()


@settings(max_examples=10, deadline=None)
@given(cut=st.integers(1, 120), buffer=st.sampled_from([0, 1, 12]))
def test_packed_text_resumes_exactly_from_origins(short_documents, text_corpus, cut, buffer):
    """Cut anywhere (across epochs too), saved, resumed: the same blocks follow, and the waiting
    blocks were saved as origins, in fewer bytes than even uint16 tokens."""
    reference = text_stream(short_documents, text_corpus["tokenizer"], shuffle_buffer=buffer).reader_items(0, 1)
    expected = [next(reference) for _ in range(cut + 20)]
    first = text_stream(short_documents, text_corpus["tokenizer"], shuffle_buffer=buffer)
    items = first.reader_items(0, 1)
    for _ in range(cut):
        next(items)
    state, size = through_checkpoint(first.state_dict())
    waiting = len(state["pending"]["origins"])
    assert state["pending"]["origins"].shape == (waiting, 2)
    if waiting >= 8:
        assert size < waiting * 16 * 2 + 4096
    resumed = text_stream(short_documents, text_corpus["tokenizer"], shuffle_buffer=buffer)
    resumed.load_state_dict(state)
    got = resumed.reader_items(0, 1)
    for want in expected[cut:]:
        np.testing.assert_array_equal(want, next(got))


def test_blocks_whose_documents_are_gone_are_dropped_and_counted(short_documents, text_corpus, tmp_path, caplog):
    copies = []
    for shard in short_documents:  # a private copy to damage
        path = tmp_path / shard.url.rsplit("/", 1)[1]
        path.write_bytes(open(shard.url, "rb").read())
        copies.append(Shard(str(path), shard.samples))
    first = text_stream(copies, text_corpus["tokenizer"])
    items = first.reader_items(0, 1)
    for _ in range(30):
        next(items)
    state, _ = through_checkpoint(first.state_dict())
    documents = state["processor"]["documents"]["rows"]
    waiting = state["pending"]["origins"]
    needed = {int(documents[n - state["processor"]["documents"]["first"]][0]) for n in waiting[:, 0].tolist()}
    gone = sorted(needed)[0]
    open(copies[gone].url, "wb").close()  # the shard a waiting block needs is emptied
    resumed = text_stream(copies, text_corpus["tokenizer"])
    resumed.load_state_dict(state)
    next(resumed.reader_items(0, 1))
    assert len(resumed._pending) < len(waiting), "blocks of documents that cannot be re-read are left out"
    assert resumed.counters["skipped_samples"] > 0 and copies[gone].url in caplog.text


def test_waiting_items_that_are_not_replayed_are_stacked_in_the_narrowest_integer_type():
    tokens = [np.arange(i, i + 8, dtype=np.int64) for i in range(5)]
    packed = _pack_items(tokens)
    assert packed["stacked"].dtype == torch.uint16 and packed["stacked"].element_size() == 2
    assert all(np.array_equal(a, b) and b.dtype == np.int64 for a, b in zip(tokens, _unpack_items(packed)))
    wide = [np.array([0, 70_000], dtype=np.int64)]
    assert _pack_items(wide)["stacked"].dtype == torch.int64
    assert np.array_equal(_unpack_items(_pack_items(wide))[0], wide[0])


def test_elastic_step_two_reads_only_the_old_ranks_its_share_needs(tmp_path):
    """16 old ranks -> 12: after the summaries, each new rank opens at most 3 old ranks' states
    (not 16), and the shares cover what was left, each sample once."""
    shards = write_shards(tmp_path, [40] * 12)
    old_world, new_world = 16, 12
    handed_out, rank_states = [], []
    for rank in range(old_world):
        stream = ShardStream(shards, KeyProcessor(), seed=2, rank=rank, world_size=old_world, batch_size=2, shuffle_buffer=4, endless=False)
        items = stream.reader_items(0, 1)
        handed_out += [next(items) for _ in range(rank % 5)]
        rank_states.append({"dataset_state": stream.state_dict()})

    class Counting(GatheredStates):
        read: list = []

        def loader_state(self, rank):
            self.read.append(rank)
            return super().loader_state(rank)

    saved = Counting({"world_size": old_world, "num_workers": 0, "ranks": rank_states})
    summaries = {}
    for rank in range(new_world):
        summaries.update(summarize(ShardStream(shards, KeyProcessor(), seed=2, rank=rank, world_size=new_world, batch_size=2),
                                   saved, range(rank, old_world, new_world)))
    rest = []
    for rank in range(new_world):
        saved.read = []
        stream = ShardStream(shards, KeyProcessor(), seed=2, rank=rank, world_size=new_world, batch_size=2, shuffle_buffer=4, endless=False)
        stream.elastic = assign(stream, saved, summaries, rank, new_world, 1)
        assert 1 <= len(set(saved.read)) <= 3, f"new rank {rank} read old ranks {sorted(set(saved.read))}"
        rest += list(stream.reader_items(0, 1))
    everything = handed_out + rest
    assert len(everything) == len(set(everything)) and 480 - len(everything) < new_world * 2


def test_a_checkpoint_of_the_gathered_format_still_resumes(shared_uneven_shards):
    def loader():
        stream = ShardStream(shared_uneven_shards, KeyProcessor(), seed=1, shuffle_buffer=4, length=10**6)
        return ResumableLoader(stream, batch_size=2, num_workers=0, collate_fn=list)

    reference = iter(loader())
    expected = [next(reference) for _ in range(12)]
    first = loader()
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    old_format = {"format": GATHERED_FORMAT, "world_size": 1, "num_workers": 0, "ranks": [first.local_state_dict()]}
    resumed = loader()
    resumed.load_state_dict(old_format)
    assert list(itertools.islice(iter(resumed), 7)) == expected[5:12]


def test_rank_state_directories_leave_with_their_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (1, 2, 3):
        (folder / f"step-{step:08d}.ckpt").write_bytes(b"x")
        (folder / f"step-{step:08d}{RANKS_SUFFIX}").mkdir()
    (folder / f"step-00000004{RANKS_SUFFIX}").mkdir()  # a save that crashed before its checkpoint's rename
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [f"step-00000004{RANKS_SUFFIX}"]
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003.ckpt", f"step-00000003{RANKS_SUFFIX}"]


def test_a_missing_rank_file_is_named(tmp_path):
    from framework.errors import DataError
    from framework.training.checkpoint import RankStateFiles, rank_state_dir

    checkpoint = tmp_path / "step-00000004.ckpt"
    checkpoint.write_bytes(b"x")
    files = RankStateFiles(rank_state_dir(checkpoint), world_size=2, num_workers=1, index=0)
    with pytest.raises(DataError, match=r"step-00000004\.ranks/rank-00001\.pt \(rank 1's data state\) is missing"):
        files.loader_state(1)
