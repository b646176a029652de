"""Image-text pair shards from .jsonl/.csv lists: members, skipped rows, caps, parallel, resume."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from writer_checks import check_output, output_files

from framework.cli import main
from framework.data.manifest import read_manifest
from framework.data.writers.pairs import image_extension, write_pair_shards
from framework.data.writers.parallel import KILL_ENV, WriterCrashed
from framework.errors import DataError


def make_image(path: Path, i: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (8 + i % 5, 6 + i % 3), ((i * 37) % 256, (i * 91) % 256, 128))
    image.save(path, format=fmt)


@pytest.fixture
def pairs(tmp_path: Path) -> dict:
    """data/list.jsonl: 24 good rows (png/jpg/webp, one absolute path, one .jpg that is a PNG)
    and 5 bad ones: a missing image, an empty caption, broken JSON, no caption key, not an image."""
    data = tmp_path / "data"
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    rows: list[str] = []
    good: dict[int, dict] = {}  # line number -> expectations
    for i in range(24):
        ext, fmt = formats[i % 3]
        rel = f"imgs/sub{i % 2}/{i:03d}.{ext}"
        make_image(data / rel, i, fmt)
        image = str(data / rel) if i == 5 else rel  # absolute paths work too
        rows.append(json.dumps({"image": image, "caption": f"a colour patch number {i}", "id": i, "lang": "en"}))
        good[len(rows)] = {"file": data / rel, "ext": ext, "caption": f"a colour patch number {i}", "id": i}
    make_image(data / "imgs" / "liar.jpg", 99, "PNG")
    rows.append(json.dumps({"image": "imgs/liar.jpg", "caption": "a PNG named .jpg"}))
    good[len(rows)] = {"file": data / "imgs" / "liar.jpg", "ext": "png", "caption": "a PNG named .jpg", "id": None}
    bad = {}
    rows.append(json.dumps({"image": "imgs/nope.png", "caption": "missing"}))
    bad[len(rows)] = "image file not found"
    rows.append(json.dumps({"image": "imgs/000.png", "caption": "   "}))
    bad[len(rows)] = "empty caption"
    rows.append('{"image": "imgs/000.png", "caption": ')
    bad[len(rows)] = "invalid JSON"
    rows.append(json.dumps({"image": "imgs/000.png", "text": "wrong key"}))
    bad[len(rows)] = "no 'caption' field"
    (data / "imgs" / "fake.jpg").write_text("<html>404</html>")
    rows.append(json.dumps({"image": "imgs/fake.jpg", "caption": "not an image"}))
    bad[len(rows)] = "not an image"
    listing = data / "list.jsonl"
    listing.write_text("\n".join(rows[:10]) + "\n\n" + "\n".join(rows[10:]) + "\n", encoding="utf-8")
    # The blank line shifts later rows by one line: messages name lines, as an editor shows them.
    shift = lambda n: n if n <= 10 else n + 1  # noqa: E731
    return {
        "list": listing,
        "good": {shift(n): v for n, v in good.items()},
        "bad": {shift(n): v for n, v in bad.items()},
    }


def test_members_counts_and_skips(pairs: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = write_pair_shards([str(pairs["list"])], str(out), max_samples_per_shard=7)
    samples = check_output(out)
    assert summary["samples"] == len(samples) == len(pairs["good"]) == 25
    assert summary["inputs"] == 30 and len(summary["skipped"]) == 5
    for line, expect in pairs["good"].items():
        members = samples[f"p0000r{line:09d}"]
        assert members[expect["ext"]] == expect["file"].read_bytes()  # as-is, no re-encode
        assert members["txt"].decode() == expect["caption"]
        extra = json.loads(members["json"]) if "json" in members else {}
        assert extra.get("id") == expect["id"]
        assert set(members) <= {expect["ext"], "txt", "json"}
    skipped = dict(summary["skipped"])
    for line, reason in pairs["bad"].items():
        name = f"{pairs['list']}:{line}"
        assert reason in skipped[name]
        assert name in caplog.text
    manifest = read_manifest(out)
    assert manifest["modality"] == "image-text" and manifest["rows"] == 30 and manifest["skipped"] == 5
    assert all(s["samples"] <= 7 for s in manifest["shards"])


def test_csv_and_tsv_lists(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_image(data / "a.png", 1, "PNG")
    make_image(data / "b.jpg", 2, "JPEG")
    with open(data / "list.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "text", "source"])
        writer.writerow(["a.png", "a caption, with a comma\nand a second line", "web"])
        writer.writerow(["b.jpg", "naïve café", "books"])
        writer.writerow(["b.jpg"])  # too few fields
    (data / "list.tsv").write_text("url\ttext\nb.jpg\ttab separated\n", encoding="utf-8")
    summary = write_pair_shards([str(data / "list.csv"), str(data / "list.tsv")], str(tmp_path / "out"),
                                image_key="url", caption_key="text")
    samples = check_output(tmp_path / "out")
    assert summary["samples"] == 3 and summary["inputs"] == 4
    (name, reason), = summary["skipped"]
    assert name == f"{data / 'list.csv'}:5" and "fewer fields" in reason  # line 5: the record on 2-3 is multi-line
    first = samples["p0000r000000003"]
    assert first["txt"].decode() == "a caption, with a comma\nand a second line"
    assert json.loads(first["json"]) == {"source": "web"}
    assert samples["p0000r000000004"]["txt"].decode() == "naïve café"
    assert samples["p0001r000000002"]["txt"] == b"tab separated" and "json" not in samples["p0001r000000002"]


def test_whole_file_errors_name_the_file(pairs: dict, tmp_path: Path) -> None:
    data = tmp_path / "bad"
    data.mkdir()
    (data / "list.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(DataError, match=r"list.csv has no column 'image'.*columns: path, text"):
        write_pair_shards([str(data / "list.csv")], str(tmp_path / "o"))
    (data / "list.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"list.parquet: unsupported format"):
        write_pair_shards([str(data / "list.parquet")], str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"list file not found: .*missing.jsonl"):
        write_pair_shards([str(data / "missing.jsonl")], str(tmp_path / "o"))
    (data / "all_bad.jsonl").write_text('{"image": "nope.png", "caption": "x"}\n{"image": "", "caption": "y"}\n')
    with pytest.raises(DataError, match=r"all 2 row\(s\) in .*all_bad.jsonl were skipped \(first: .*all_bad.jsonl:2"):
        write_pair_shards([str(data / "all_bad.jsonl")], str(tmp_path / "o"))
    (data / "worker_bad.jsonl").write_text('{"image": "nope.png", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"all 1 row\(s\).*worker_bad.jsonl:1: image file not found"):
        write_pair_shards([str(data / "worker_bad.jsonl")], str(tmp_path / "o2"))


def test_caps_parallel_equals_sequential(pairs: dict, tmp_path: Path) -> None:
    cap = 3000
    args = dict(max_samples_per_shard=5, max_shard_bytes=cap, shards_per_chunk=1)
    write_pair_shards([str(pairs["list"])], str(tmp_path / "w1"), workers=1, **args)
    write_pair_shards([str(pairs["list"])], str(tmp_path / "w2"), workers=2, **args)
    assert output_files(tmp_path / "w1") == output_files(tmp_path / "w2")
    check_output(tmp_path / "w2")
    shards = read_manifest(tmp_path / "w2")["shards"]
    assert len(shards) > 5
    assert all(s["samples"] <= 5 and (s["bytes"] <= cap or s["samples"] == 1) for s in shards)


def test_crash_resume_identical(pairs: dict, tmp_path: Path, monkeypatch) -> None:
    args = dict(max_samples_per_shard=3, shards_per_chunk=1)
    write_pair_shards([str(pairs["list"])], str(tmp_path / "ref"), workers=1, **args)
    monkeypatch.setenv(KILL_ENV, "4:1")
    with pytest.raises(WriterCrashed):
        write_pair_shards([str(pairs["list"])], str(tmp_path / "out"), workers=2, **args)
    monkeypatch.delenv(KILL_ENV)
    summary = write_pair_shards([str(pairs["list"])], str(tmp_path / "out"), workers=2, **args)
    assert output_files(tmp_path / "out") == output_files(tmp_path / "ref")
    assert len(check_output(tmp_path / "out")) == summary["samples"] == 25
    assert summary["resumed_chunks"] >= 1


def test_verify_catches_truncated_images(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG", compress_level=0)
    (tmp_path / "ok.png").write_bytes(buf.getvalue())
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "l.jsonl").write_text('{"image": "ok.png", "caption": "fine"}\n{"image": "cut.png", "caption": "cut"}\n')
    assert write_pair_shards([str(tmp_path / "l.jsonl")], str(tmp_path / "a"))["samples"] == 2
    summary = write_pair_shards([str(tmp_path / "l.jsonl")], str(tmp_path / "b"), verify=True)
    assert summary["samples"] == 1
    (name, reason), = summary["skipped"]
    assert name.endswith("l.jsonl:2") and "cannot decode image" in reason and "cut.png" in reason


def test_image_extension_sniffing() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 8
    assert image_extension(png, "x.PNG") == "png"
    assert image_extension(png, "x.jpg") == "png"
    assert image_extension(b"\xff\xd8\xff\xe0", "x.jpeg") == "jpeg"
    assert image_extension(b"\xff\xd8\xff\xe0", "x") == "jpg"
    assert image_extension(b"RIFF\0\0\0\0WEBPVP8 ", "x.webp") == "webp"
    assert image_extension(b"RIFF\0\0\0\0WAVEfmt ", "x.webp") is None
    assert image_extension(b"hello", "x.png") is None


def test_cli_pairs(pairs: dict, tmp_path: Path, capsys) -> None:
    main(["shards", "pairs", "-i", str(pairs["list"]), "-o", str(tmp_path / "out"), "--workers", "2",
          "--max-samples-per-shard", "4", "--shards-per-chunk", "2"])
    out = capsys.readouterr()
    assert "25 samples from 30 rows; 5 skipped" in out.out
    assert len(check_output(tmp_path / "out")) == 25
