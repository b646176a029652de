"""The parallel, resumable writing driver, through the text writer and directly."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from writer_checks import check_output, output_files, run_cli

from framework.cli import main
from framework.data.manifest import MANIFEST_NAME, read_manifest
from framework.data.writers.parallel import (
    KILL_ENV,
    STATE_DIR,
    Sample,
    Skip,
    WriterCrashed,
    plan_chunks,
    write_parallel,
)
from framework.data.writers.text import write_text_shards
from framework.errors import DataError


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """60 small documents in 3 folders, 3 of them bad (empty or not UTF-8)."""
    root = tmp_path / "corpus"
    for i in range(60):
        path = root / f"g{i % 3}" / f"{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"doc {i} line {n} " + "y" * (n % 13) + "\n" for n in range(5 + i % 9)), encoding="utf-8")
    (root / "g0" / "empty.txt").write_bytes(b"")
    (root / "g1" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "g2" / "bad.txt").write_bytes(b"\xff\xfe")
    return root


# Small shards, one shard per chunk: many chunks, so two workers really share the work.
OPTS = dict(max_samples_per_shard=4, max_chars_per_sample=60, shards_per_chunk=1, val_fraction=0.2, seed=5)


def test_plan_chunks_caps_and_determinism() -> None:
    assert plan_chunks(10, None, 4, 100) == [(0, 4), (4, 8), (8, 10)]
    assert plan_chunks(5, [50, 60, 10, 200, 1], 10, 100) == [(0, 2), (2, 4), (4, 5)]
    assert plan_chunks(0, None, 4, 100) == []
    assert plan_chunks(3, [500, 0, 0], 1000, 100) == [(0, 1), (1, 3)]


def test_workers_do_not_change_the_bytes(corpus: Path, tmp_path: Path) -> None:
    one = write_text_shards([str(corpus)], str(tmp_path / "w1"), workers=1, **OPTS)
    two = write_text_shards([str(corpus)], str(tmp_path / "w2"), workers=2, **OPTS)
    assert output_files(tmp_path / "w1") == output_files(tmp_path / "w2")
    assert len(output_files(tmp_path / "w1")) > 10
    for summary in (one, two):
        summary.pop("output")
        for split in summary["splits"].values():
            split.pop("dir")
    assert one == two
    for split in ("train", "val"):
        samples = check_output(tmp_path / "w2" / split)
        assert len(samples) == two["splits"][split]["samples"]
        shards = read_manifest(tmp_path / "w2" / split)["shards"]
        assert all(s["samples"] <= 4 for s in shards)
    assert len({Path(p).name for p, _ in two["skipped"]}) == 3
    assert two["documents"] == 60 and two["files"] == 63
    assert len(read_manifest(tmp_path / "w2" / "train")["shards"]) > 4  # several chunks were written


def test_worker_killed_then_rerun_gives_identical_output(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    reference = tmp_path / "ref"
    write_text_shards([str(corpus)], str(reference), workers=1, **OPTS)

    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "3:1")  # the worker writing chunk 3 dies after its 2nd document
    with pytest.raises(WriterCrashed, match="rerun the same command to resume"):
        write_text_shards([str(corpus)], str(out), workers=2, **OPTS)
    state = out / STATE_DIR
    assert (state / "fingerprint.json").exists() and not (state / "chunk-000003.json").exists()
    assert read_manifest(out / "train") is None  # an unfinished write claims nothing
    monkeypatch.delenv(KILL_ENV)

    summary = write_text_shards([str(corpus)], str(out), workers=2, **OPTS)
    assert output_files(out) == output_files(reference)
    for split in ("train", "val"):
        check_output(out / split)  # no duplicate key, no .tmp, counts match
    assert summary["documents"] == 60 and len(summary["skipped"]) == 3


def test_kill_9_of_the_whole_command_then_rerun(corpus: Path, tmp_path: Path) -> None:
    args = ["shards", "text", "-i", str(corpus), "--max-samples-per-shard", "4", "--max-chars", "60",
            "--shards-per-chunk", "1", "--workers", "1"]
    reference = run_cli([*args, "-o", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr
    killed = run_cli([*args, "-o", str(tmp_path / "out")], env={KILL_ENV: "5:2"})
    assert killed.returncode == -9  # SIGKILL: nothing ran after it, no clean-up
    assert list((tmp_path / "out").glob("*.tar.tmp")), "a half-written shard should be left behind"
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    resumed = run_cli([*args, "-o", str(tmp_path / "out"), "--workers", "2"])  # workers may change
    assert resumed.returncode == 0, resumed.stderr
    assert output_files(tmp_path / "out") == output_files(tmp_path / "ref")
    check_output(tmp_path / "out")


def test_lost_marker_stale_tmp_and_manifest_are_repaired(corpus: Path, tmp_path: Path) -> None:
    reference, out = tmp_path / "ref", tmp_path / "out"
    write_text_shards([str(corpus)], str(reference), workers=1, **OPTS)
    write_text_shards([str(corpus)], str(out), workers=2, **OPTS)
    # As if the run died after chunk 2's shards were renamed but before its marker, mid-way
    # through a later shard, and before the manifests were merged.
    (out / STATE_DIR / "chunk-000002.json").unlink()
    (out / "train" / MANIFEST_NAME).unlink()
    (out / "train" / "shard-000007-0000.tar.tmp").write_bytes(b"half a shard")
    (out / "val" / "shard-000099-0000.tar").write_bytes(b"an orphan")
    summary = write_text_shards([str(corpus)], str(out), workers=2, **OPTS)
    assert output_files(out) == output_files(reference)
    assert check_output(out / "train") and check_output(out / "val")
    assert summary["documents"] == 60


def test_finished_write_rerun_is_a_no_op(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = write_text_shards([str(corpus)], str(out), **OPTS)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    time.sleep(0.01)
    again = write_text_shards([str(corpus)], str(out), **OPTS)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before  # no shard rewritten


def test_changed_inputs_or_options_refused_unless_overwrite(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_text_shards([str(corpus)], str(out), **OPTS)
    with pytest.raises(DataError, match=r"already contains .*max_chars_per_sample 60 -> 70.*--overwrite"):
        write_text_shards([str(corpus)], str(out), **{**OPTS, "max_chars_per_sample": 70})
    (corpus / "g1" / "new.txt").write_text("a new document\n")
    with pytest.raises(DataError, match=r"input items 63 -> 64"):
        write_text_shards([str(corpus)], str(out), **OPTS)
    (corpus / "g1" / "new.txt").unlink()
    (corpus / "g2" / "05.txt").write_text("edited\n")
    with pytest.raises(DataError, match=r"input items .*changed"):
        write_text_shards([str(corpus)], str(out), **OPTS)
    summary = write_text_shards([str(corpus)], str(out), overwrite=True, **OPTS)
    assert check_output(out / "train") and summary["documents"] == 60


def test_damaged_state_named_in_error(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_text_shards([str(corpus)], str(out), **OPTS)
    (out / STATE_DIR / "fingerprint.json").write_text("{oops")
    with pytest.raises(DataError, match=f"{STATE_DIR}/fingerprint.json.*--overwrite"):
        write_text_shards([str(corpus)], str(out), **OPTS)
    write_text_shards([str(corpus)], str(out), overwrite=True, **OPTS)


def test_all_skipped_leaves_no_state(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty corpus"):
        write_text_shards([str(tmp_path / "in")], str(tmp_path / "out"))
    assert not (tmp_path / "out" / STATE_DIR).exists()
    (tmp_path / "in" / "a.txt").write_text("fixed\n")  # fixing the input needs no --overwrite
    assert write_text_shards([str(tmp_path / "in")], str(tmp_path / "out"))["samples"] == 1


def _numbers(item: int) -> Skip | list[Sample]:
    if item % 5 == 0:
        return Skip(f"item-{item}", "multiple of five")
    if item % 7 == 0:
        return []  # a processor bug: must be reported, not lost
    return [Sample(f"n{item:04d}", {"txt": str(item).encode()}, stats={"value": float(item)})]


def test_driver_counts_skips_and_stats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    result = write_parallel(
        list(range(1, 41)), _numbers, tmp_path / "o", writer="numbers", modality="text", options={},
        max_samples_per_shard=3, shards_per_chunk=2, workers=1,
        manifest_extra=lambda name, split: {"value": split.stats["value"], "items": split.items},
    )
    samples = check_output(tmp_path / "o")
    expected = [i for i in range(1, 41) if i % 5 and i % 7]
    assert sorted(samples) == [f"n{i:04d}" for i in expected]
    assert result.samples == len(expected) == result.splits["train"].items
    assert [name for name, _ in result.skipped] == [
        f"item-{i}" if i % 5 == 0 else str(i) for i in range(1, 41) if i % 5 == 0 or i % 7 == 0
    ]
    assert ("7", "produced no samples") in result.skipped
    manifest = read_manifest(tmp_path / "o")
    assert manifest["value"] == sum(expected) and manifest["items"] == len(expected)
    assert "skipping item-5: multiple of five" in caplog.text
    assert json.loads((tmp_path / "o" / STATE_DIR / "fingerprint.json").read_text())["item_count"] == 40


def test_cli_text_workers_and_overwrite(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    main(["shards", "text", "-i", str(corpus), "-o", str(out), "--workers", "2", "--max-samples-per-shard", "5",
          "--shards-per-chunk", "1"])
    assert "60 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "text", "-i", str(corpus), "-o", str(out), "--max-samples-per-shard", "6"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already contains" in err and "max_samples_per_shard 5 -> 6" in err and str(out) in err
    main(["shards", "text", "-i", str(corpus), "-o", str(out), "--max-samples-per-shard", "6", "--overwrite"])
    check_output(out)
    assert all(s["samples"] <= 6 for s in read_manifest(out)["shards"])
    assert os.listdir(out / STATE_DIR)


def test_worker_error_stops_the_write_and_names_the_file(tmp_path: Path) -> None:
    import functools

    from framework.data.writers.text import TextItem, _process_text

    docs = tmp_path / "docs"
    docs.mkdir()
    items = []
    for i in range(12):
        (docs / f"{i}.txt").write_text(f"document {i}\n")
        items.append(TextItem(i, str(docs / f"{i}.txt"), "train", 12, 0))
    items[9] = items[9]._replace(path=str(docs / "vanished.txt"))  # gone between listing and reading
    with pytest.raises(DataError, match=r"cannot read .*vanished.txt"):
        write_parallel(items, functools.partial(_process_text, max_chars=100), tmp_path / "o", writer="t",
                       modality="text", options={}, max_samples_per_shard=2, shards_per_chunk=1, workers=2)
    assert read_manifest(tmp_path / "o") is None
    assert not list((tmp_path / "o").glob("shard-000004-*"))  # the failed chunk left no shard
    assert not list((tmp_path / "o").glob("*.tmp"))
