import io
import tarfile

import pytest
import webdataset as wds

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
