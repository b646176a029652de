"""Text shard writing: chunking, roll-over, manifests, val split, skipped files, errors."""
from __future__ import annotations

import logging
import sysconfig
import tarfile
from pathlib import Path

import pytest

from framework.data.files import expand_inputs
from framework.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from framework.data.writers.shard_writer import ShardWriter
from framework.data.writers.text import split_document, write_text_shards
from framework.errors import DataError


def read_shards(directory: Path) -> dict[str, list[tuple[str, bytes]]]:
    """{shard name: [(member name, data), ...]} for every .tar in directory, in tar order."""
    out = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out[shard.name] = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out


def chunks_by_doc(*directories: Path) -> dict[int, list[tuple[int, str]]]:
    docs: dict[int, list[tuple[int, str]]] = {}
    for directory in directories:
        for members in read_shards(directory).values():
            for name, data in members:
                key, ext = name.split(".", 1)
                assert ext == "txt"
                docs.setdefault(int(key[1:9]), []).append((int(key[10:]), data.decode("utf-8")))
    return docs


def assert_docs_recoverable(inputs: list[str], dirs: list[Path], include=None) -> None:
    files = expand_inputs(inputs, include)
    docs = chunks_by_doc(*dirs)
    for doc_index, chunks in docs.items():
        chunks.sort()
        assert [c for c, _ in chunks] == list(range(len(chunks)))
        assert "".join(text for _, text in chunks) == files[doc_index].read_text(encoding="utf-8")


def no_tmp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for d in range(4):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for i in range(5):
            lines = [f"doc {d}-{i} line {n} " + "x" * ((n * 7 + i) % 40) + "\n" for n in range(20 + 3 * i)]
            lines.append("naïve café — 東京 " * (i + 1))  # last line without newline, non-ASCII
            (sub / f"f{i}.txt").write_text("".join(lines), encoding="utf-8")
    (root / "dir0" / "long_line.txt").write_text("A" * 250 + "\nshort\n" + "B" * 99, encoding="utf-8")
    return root


def test_split_document_joins_back_and_respects_cap() -> None:
    text = "ab\n" * 10 + "Z" * 23 + "\nend"
    for cap in (1, 2, 3, 5, 7, 100):
        chunks = split_document(text, cap)
        assert "".join(chunks) == text
        assert all(0 < len(c) <= cap for c in chunks)
    # Cuts fall on line ends whenever the line fits.
    assert split_document("aa\nbb\ncc\n", 6) == ["aa\nbb\n", "cc\n"]


def test_documents_recoverable_and_manifest_matches(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = write_text_shards([str(corpus)], str(out), max_chars_per_sample=100, max_samples_per_shard=7)
    assert summary["files"] == 21 and summary["documents"] == 21 and summary["skipped"] == []
    assert_docs_recoverable([str(corpus)], [out])
    docs = chunks_by_doc(out)
    assert all(len(text) <= 100 for chunks in docs.values() for _, text in chunks)
    assert any(len(chunks) > 1 for chunks in docs.values())

    manifest = read_manifest(out)
    shards = read_shards(out)
    assert manifest["modality"] == "text"
    assert [s["path"] for s in manifest["shards"]] == sorted(shards)
    for entry in manifest["shards"]:
        assert entry["samples"] == len(shards[entry["path"]])
        assert entry["bytes"] == (out / entry["path"]).stat().st_size
    assert manifest["total_samples"] == summary["samples"] == sum(len(m) for m in shards.values())
    assert summary["splits"]["train"]["shards"] == len(shards)
    assert no_tmp_files(out)


def test_shards_are_shuffled_not_sorted(corpus: Path, tmp_path: Path) -> None:
    write_text_shards([str(corpus)], str(tmp_path / "out"))
    keys = [name for members in read_shards(tmp_path / "out").values() for name, _ in members]
    assert keys != sorted(keys)


def test_rollover_by_samples(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = write_text_shards([str(corpus)], str(out), max_samples_per_shard=3)
    counts = [len(m) for m in read_shards(out).values()]
    assert counts[:-1] == [3] * (len(counts) - 1) and 1 <= counts[-1] <= 3
    assert sum(counts) == summary["samples"] == 21


def test_rollover_by_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i:02d}.txt").write_text(f"{i}\n" * 1500, encoding="utf-8")  # ~4.5 KB each
    out = tmp_path / "out"
    limit = 20 * 1024
    summary = write_text_shards([str(src)], str(out), max_shard_bytes=limit)
    manifest = read_manifest(out)
    assert len(manifest["shards"]) > 5
    for entry in manifest["shards"]:
        assert entry["bytes"] == (out / entry["path"]).stat().st_size <= limit
    assert manifest["total_samples"] == summary["samples"] == 30
    assert_docs_recoverable([str(src)], [out])


def test_oversized_sample_gets_its_own_shard(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "s", modality="bytes", max_bytes=4096) as writer:
        writer.write("small", {"bin": b"x" * 10})
        writer.write("big", {"bin": b"y" * 10_000})
        writer.write("small2", {"bin": b"z" * 10})
    assert [s["samples"] for s in writer.shards] == [1, 1, 1]


def test_webdataset_reads_same_keys(corpus: Path, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "out"
    write_text_shards([str(corpus)], str(out), max_chars_per_sample=150, max_samples_per_shard=5)
    expected = [name.split(".", 1)[0] for members in read_shards(out).values() for name, _ in members]
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == expected
    tar_texts = {name: data for members in read_shards(out).values() for name, data in members}
    assert all(s["txt"] == tar_texts[s["__key__"] + ".txt"] for s in samples)


def test_tar_headers_deterministic(corpus: Path, tmp_path: Path) -> None:
    write_text_shards([str(corpus)], str(tmp_path / "a"), seed=3)
    write_text_shards([str(corpus)], str(tmp_path / "b"), seed=3)
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o644)


def test_val_split_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(300):
        path = src / f"g{i % 7}" / f"{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"document {i}\n", encoding="utf-8")

    def split_keys(out: Path, corpus: Path, seed: int) -> tuple[set[str], set[str], dict]:
        summary = write_text_shards([str(corpus)], str(out), val_fraction=0.2, seed=seed)
        train = {n for m in read_shards(out / "train").values() for n, _ in m}
        val = {n for m in read_shards(out / "val").values() for n, _ in m}
        return train, val, summary

    train, val, summary = split_keys(tmp_path / "o1", src, seed=0)
    assert train.isdisjoint(val) and len(train) + len(val) == 300
    assert 0.12 < len(val) / 300 < 0.28
    assert summary["splits"]["val"]["documents"] == len(val)
    assert read_manifest(tmp_path / "o1" / "val")["total_samples"] == len(val)
    assert read_manifest(tmp_path / "o1" / "train")["total_samples"] == len(train)
    assert not (tmp_path / "o1" / MANIFEST_NAME).exists()
    assert_docs_recoverable([str(src)], [tmp_path / "o1" / "train", tmp_path / "o1" / "val"])

    # Same seed -> same split, even after moving the corpus (relative paths are hashed).
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    src.rename(moved)
    train2, val2, _ = split_keys(tmp_path / "o2", moved, seed=0)
    assert (train2, val2) == (train, val)
    _, val3, _ = split_keys(tmp_path / "o3", moved, seed=1)
    assert val3 != val


def test_tiny_corpus_still_gets_both_splits(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text("hello\n")
    summary = write_text_shards([str(tmp_path / "0.txt"), str(tmp_path / "1.txt")], str(tmp_path / "o"), val_fraction=0.01)
    assert summary["splits"]["train"]["documents"] == summary["splits"]["val"]["documents"] == 1


def test_bad_files_reported_as_skipped(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    (corpus / "empty.txt").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        summary = write_text_shards([str(corpus)], str(tmp_path / "out"))
    reasons = {Path(p).name: r for p, r in summary["skipped"]}
    assert set(reasons) == {"latin1.txt", "empty.txt"}
    assert "UTF-8" in reasons["latin1.txt"] and "empty" in reasons["empty.txt"]
    assert str(corpus / "latin1.txt") in caplog.text and str(corpus / "empty.txt") in caplog.text
    assert summary["documents"] == 21 and summary["files"] == 23
    assert len(chunks_by_doc(tmp_path / "out")) == 21


def test_missing_input_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        write_text_shards([str(missing)], str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"glob matched no files: .*\*\.zzz"):
        write_text_shards([str(tmp_path / "*.zzz")], str(tmp_path / "out"))


def test_empty_corpus_errors_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"")
    (src / "b.bin").write_bytes(b"\xff\xfe\x00")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"empty corpus: .*src"):
        write_text_shards([str(src)], str(out))
    assert not list(out.rglob("*.tar")) and read_manifest(out) is None and no_tmp_files(out)
    with pytest.raises(DataError, match=r"no input files found in .*src"):
        write_text_shards([str(src)], str(out), include=["*.md"])


def test_existing_output_refused_unless_overwrite(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_text_shards([str(corpus)], str(out), max_samples_per_shard=2)
    with pytest.raises(DataError, match="already contains"):
        write_text_shards([str(corpus)], str(out))
    summary = write_text_shards([str(corpus)], str(out), overwrite=True)
    assert len(list(out.glob("*.tar"))) == summary["splits"]["train"]["shards"] == 1
    # Switching layout must not leave the unsplit shards next to train/ and val/.
    with pytest.raises(DataError, match="already contains"):
        write_text_shards([str(corpus)], str(out), val_fraction=0.3)
    write_text_shards([str(corpus)], str(out), val_fraction=0.3, overwrite=True)
    assert not list(out.glob("*.tar")) and read_manifest(out) is None


def test_crash_leaves_no_tmp_and_no_manifest(tmp_path: Path) -> None:
    out = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, modality="text", max_samples=2) as writer:
            for i in range(5):
                writer.write(f"k{i}", {"txt": b"hello"})
            raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert read_manifest(out) is None


def test_shard_writer_rejects_bad_keys(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "s", modality="text") as writer:
        for bad in ("a.b", "a/b", ""):
            with pytest.raises(ValueError):
                writer.write(bad, {"txt": b"x"})
        writer.write("ok", {"txt": b"x"})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write("ok", {"txt": b"y"})
    assert read_manifest(tmp_path / "s")["total_samples"] == 1


def test_expand_inputs_include_glob_dedupe(corpus: Path) -> None:
    (corpus / "dir1" / "notes.md").write_text("# notes\n")
    all_files = expand_inputs([str(corpus)])
    assert all_files == sorted(all_files) and len(all_files) == 22
    only_txt = expand_inputs([str(corpus)], include=["*.txt"])
    assert len(only_txt) == 21
    globbed = expand_inputs([str(corpus / "**" / "f1.txt"), str(corpus / "dir2")], include=["*.txt"])
    assert len(globbed) == 4 + 5 - 1  # f1.txt of dir2 found twice, kept once
    assert expand_inputs([str(corpus / "dir1" / "notes.md")], include=["*.txt"]) == [corpus / "dir1" / "notes.md"]


def test_manifest_absent_corrupt_and_incomplete(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DataError, match=str(tmp_path / MANIFEST_NAME)):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"version": 1, "modality": "text"}')
    with pytest.raises(DataError, match="missing keys"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, [{"path": "a.tar", "samples": 3, "bytes": 10}], "text", {"split": "train"})
    manifest = read_manifest(tmp_path)
    assert (manifest["total_samples"], manifest["total_bytes"], manifest["split"]) == (3, 10, "train")
    assert no_tmp_files(tmp_path)


def test_stdlib_sources_roundtrip(tmp_path: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / "json"), str(stdlib / "textwrap.py")]
    out = tmp_path / "out"
    summary = write_text_shards(inputs, str(out), include=["*.py"], max_chars_per_sample=2000, val_fraction=0.25)
    assert summary["skipped"] == []
    assert_docs_recoverable(inputs, [out / "train", out / "val"], include=["*.py"])
    assert no_tmp_files(out)
