import io
import tarfile

import pytest
import webdataset as wds

import gc

from framework.data.sources import MappedShard, open_shard
from framework.data.tar import TarFormatError, iter_samples, split_name


def make_tar(samples, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SAMPLES = [(f"sample{i:03d}", {"txt": f"text {i}".encode() * (i + 1), "json": b'{"i": %d}' % i}) for i in range(7)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_reads_every_sample_with_its_members(fmt):
    got = [(key, sample) for key, sample, _ in iter_samples(io.BytesIO(make_tar(SAMPLES, fmt)))]
    assert got == SAMPLES


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_resume_at_every_offset(fmt):
    samples = [("k" * 150 + str(i), {"txt": b"x" * (100 * i)}) for i in range(5)]
    raw = make_tar(samples, fmt)
    read = list(iter_samples(io.BytesIO(raw)))
    assert [k for k, _, _ in read] == [k for k, _ in samples]
    for i, (_, _, next_offset) in enumerate(read):
        stream = io.BytesIO(raw)
        stream.seek(next_offset)
        assert [k for k, _, _ in iter_samples(stream, next_offset)] == [k for k, _ in samples[i + 1 :]]


def test_agrees_with_webdataset(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(make_tar(SAMPLES))
    ours = [(k, s["txt"]) for k, s, _ in iter_samples(open(path, "rb"))]
    theirs = [(s["__key__"], s["txt"]) for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert ours == theirs


def test_truncated_tar_is_an_error():
    raw = make_tar(SAMPLES)
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_samples(io.BytesIO(raw[: len(raw) // 2 + 100])))


def test_split_name_follows_webdataset():
    assert split_name("dir.v1/abc.seg.txt") == ("dir.v1/abc", "seg.txt")
    assert split_name("abc") == ("abc", "")


# ---------------------------------------------------------------- zero copy (data.zero_copy)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_mapped_shard_gives_the_same_samples_as_views(tmp_path, fmt):
    long_key = "k" * (60 if fmt == tarfile.USTAR_FORMAT else 150)  # USTAR names stop at 100 bytes
    samples = SAMPLES + [(long_key, {"bin": bytes(range(256)) * 700})]  # a 175 KB member
    path = tmp_path / "shard.tar"
    path.write_bytes(make_tar(samples, fmt))
    copied = list(iter_samples(open(path, "rb")))
    with open_shard(str(path), zero_copy=True) as stream:
        assert isinstance(stream, MappedShard)
        mapped = list(iter_samples(stream))
    assert all(isinstance(v, memoryview) for _, sample, _ in mapped for v in sample.values())
    assert [(k, {e: bytes(v) for e, v in s.items()}, o) for k, s, o in mapped] == copied
    for i, (_, _, next_offset) in enumerate(copied):  # resume at every sample boundary
        with open_shard(str(path), next_offset, zero_copy=True) as stream:
            assert [k for k, _, _ in iter_samples(stream, next_offset)] == [k for k, _ in samples[i + 1 :]]


def test_views_outlive_the_stream_that_made_them(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(make_tar(SAMPLES))
    with open_shard(str(path), zero_copy=True) as stream:
        views = [sample["txt"] for _, sample, _ in iter_samples(stream)]
    del stream
    gc.collect()
    assert [bytes(v) for v in views] == [members["txt"] for _, members in SAMPLES]
    assert str(views[1], "utf-8") == "text 1text 1"


def test_truncated_or_empty_mapped_shard_is_an_error(tmp_path):
    raw = make_tar(SAMPLES)
    path = tmp_path / "truncated.tar"
    path.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_samples(open_shard(str(path), zero_copy=True)))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(TarFormatError, match=r"not a tar archive: empty file \(0 bytes\)"):
        list(iter_samples(open_shard(str(empty), zero_copy=True)))
