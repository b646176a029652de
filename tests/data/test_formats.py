"""Corpora as they ship: Parquet (FineWeb's layout, several row groups of unequal sizes, and
Hugging Face's image and audio structs, written by `datasets`) and JSON Lines (Dolma's layout:
plain, gzip, zstd in several frames) streamed as shards: each sample once, equal batches per
rank, exact resume at many points (alone and mixed with tar shards), bounded memory for a huge
row group, and one clear line for each bad input."""
from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys

import pytest

from conftest import KeyProcessor, write_shards
from framework.data.formats import TEXT, RowFields
from framework.data.loader import ResumableLoader
from framework.data.plan import Sources
from framework.data.sources import resolve_sources, with_counts
from framework.data.stream import ShardStream
from framework.errors import DataError

DOCS = 600
SIZES = (90, 7, 250, 3, 250)  # FineWeb-like row groups of unequal sizes (600 rows)
FIELDS = RowFields((("text", TEXT),), required=True, max_rows_per_read=64)


class RowText(KeyProcessor):
    """Each sample's text (row files) or txt member (tar shards)."""

    def __call__(self, key, sample, shard):
        if key in self.bad_keys:
            from framework.errors import SampleError

            raise SampleError("cannot decode")
        text = sample["txt"]
        return [text if isinstance(text, str) else str(text, "utf-8")]


def documents(first: int = 0, count: int = DOCS) -> list[dict]:
    return [{"text": f"doc{i:05d} " + "lorem ipsum " * (i % 5), "id": f"d{i:05d}", "url": f"https://example.org/{i}",
             "dump": f"CC-MAIN-{2020 + i % 3}", "language_score": 0.5 + (i % 50) / 100} for i in range(first, first + count)]


def write_parquet(path, rows, sizes=SIZES) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    with pq.ParquetWriter(path, table.schema) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size


def write_jsonl(path, rows, frames_of: int = 64) -> None:
    """Plain, gzip, or zstd in frames of ``frames_of`` lines (Dolma's layout)."""
    lines = [json.dumps(r).encode() + b"\n" for r in rows]
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(b"".join(lines)))
    elif str(path).endswith(".zst"):
        import zstandard

        compressor = zstandard.ZstdCompressor()
        path.write_bytes(b"".join(compressor.compress(b"".join(lines[i : i + frames_of]))
                                  for i in range(0, len(lines), frames_of)))
    else:
        path.write_bytes(b"".join(lines))


def index(*paths, rows_per_point: int = 50) -> None:
    from framework.data.formats.jsonl import index_files

    index_files([str(p) for p in paths], rows_per_point=rows_per_point, report=lambda line: None)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same 600 documents as Parquet, .jsonl, .jsonl.gz and .jsonl.zst (two files each),
    and as tar shards."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name in ("parquet", "jsonl", "jsonl.gz", "jsonl.zst"):
        folder = root / name.replace(".", "_")
        folder.mkdir()
        for number, (first, count) in enumerate(((0, 350), (350, 250))):
            path = folder / f"part-{number}.{name}"
            if name == "parquet":
                write_parquet(path, documents(first, count), sizes=(count // 3, 5, count - count // 3 - 5))
            else:
                write_jsonl(path, documents(first, count))
        if name != "parquet":
            index(folder)
        out[name] = folder
    tars = root / "tar"
    tars.mkdir()
    write_shards(tars, [40, 13, 27], prefix="t")
    out["tar"] = tars
    return out


def shards_of(spec, fields=FIELDS):
    shards, ranges, weights = resolve_sources(spec, "data.train", fields)
    return with_counts(shards), Sources(tuple(ranges), tuple(weights))


def loader(spec, workers=2, **options):
    shards, sources = shards_of(spec)
    kwargs = dict(seed=3, batch_size=4, shuffle_buffer=16, length=10**6, sources=sources)
    kwargs.update(options)
    stream = ShardStream(shards, RowText(), **kwargs)
    return ResumableLoader(stream, batch_size=4, num_workers=workers, collate_fn=list)


@pytest.mark.parametrize("name", ["parquet", "jsonl", "jsonl.gz", "jsonl.zst"])
def test_every_document_once_with_equal_batches_per_rank(corpora, name):
    shards, _ = shards_of(str(corpora[name]))
    assert sum(s.samples for s in shards) == DOCS and len(shards) > 2, "units, not whole files"
    world, workers = 3, 2
    items = {(r, w): list(ShardStream(shards, RowText(), seed=1, rank=r, world_size=world, batch_size=4, shuffle_buffer=8,
                                      endless=False).reader_items(w, workers)) for r in range(world) for w in range(workers)}
    per_rank = [sum(len(items[r, w]) for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] % 4 == 0
    everything = [x for v in items.values() for x in v]
    assert len(everything) == len(set(everything)) and DOCS - len(everything) < world * 4
    assert {x.split()[0] for x in everything} <= {f"doc{i:05d}" for i in range(DOCS)}


@pytest.mark.parametrize("name", ["parquet", "jsonl", "jsonl.gz", "jsonl.zst", "mix"])
def test_resume_at_many_points_gives_the_uninterrupted_batches(corpora, name):
    spec = [str(corpora["parquet"]), str(corpora["tar"])] if name == "mix" else str(corpora[name])
    reference = list(itertools.islice(iter(loader(spec)), 200))  # 800 samples: into a second epoch
    for cut in (1, 37, 90, 151, 170):
        first = loader(spec)
        iterator = iter(first)
        for _ in range(cut):
            next(iterator)
        state = first.state_dict()
        del iterator
        resumed = loader(spec)
        resumed.load_state_dict(state)
        assert list(itertools.islice(iter(resumed), 30)) == reference[cut : cut + 30], f"cut {cut}"


def test_weighted_mix_of_parquet_and_tar_resumes_exactly(corpora):
    spec = [{"shards": str(corpora["parquet"]), "weight": 0.8}, {"shards": str(corpora["tar"]), "weight": 0.2}]
    options = dict(mode="resampled", draw_samples=8)
    reference = list(itertools.islice(iter(loader(spec, **options)), 80))
    texts = [x for batch in reference for x in batch]
    from_tar = sum(x.startswith("t") for x in texts)
    assert 0.1 < from_tar / len(texts) < 0.3, from_tar
    first = loader(spec, **options)
    iterator = iter(first)
    for _ in range(33):
        next(iterator)
    state = first.state_dict()
    del iterator
    resumed = loader(spec, **options)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 20)) == reference[33:53]


def test_metadata_columns_and_ids_reach_the_sample(corpora):
    shards, _ = shards_of(str(corpora["parquet"]))
    from framework.data.sources import iter_shard

    key, sample = next(iter_shard(shards[0]))
    meta = json.loads(sample["json"])
    assert key == "d00000" and meta["dump"] == "CC-MAIN-2020" and meta["url"] == "https://example.org/0"
    assert sample["txt"].startswith("doc00000") and "text" not in meta
    chosen = RowFields((("text", TEXT),), required=True, extra=("dump",))
    shards, _ = shards_of(str(corpora["jsonl.zst"]), chosen)
    key, sample = next(iter_shard(shards[0]))
    assert json.loads(sample["json"]) == {"dump": "CC-MAIN-2020"}


def test_a_huge_row_group_is_read_in_bounded_stretches(tmp_path):
    """One row group of 48 MB; max_rows_per_read=200 keeps Arrow's peak allocation to a few
    pages' worth, where reading the group whole takes all of it (each in a fresh process, so
    the memory pool's peak is that read's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": ("%06d" % i) * 400} for i in range(20000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=20000, compression="none")
    script = f"""
import sys, pyarrow as pa, pyarrow.parquet as pq
from framework.data.formats import RowFields, TEXT
from framework.data.sources import resolve_shards, iter_shard
path, stretch = "{tmp_path}/big.parquet", int(sys.argv[1])
shards = resolve_shards(path, fields=RowFields((("text", TEXT),), required=True, max_rows_per_read=stretch))
count = sum(1 for shard in shards for _ in iter_shard(shard))
print(len(shards), count, pa.default_memory_pool().max_memory())
"""
    peaks = {}
    for stretch in (200, 20000):
        result = subprocess.run([sys.executable, "-c", script, str(stretch)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        units, count, peaks[stretch] = map(int, result.stdout.split())
        assert count == 20000 and units == 20000 // stretch
    assert peaks[20000] > 48_000_000, peaks  # the whole group at once
    assert peaks[200] < 12_000_000, f"Arrow peaked at {peaks[200]} bytes reading a 48 MB group in stretches of 200 rows"


def test_hugging_face_image_and_audio_parquet_decode(tmp_path):
    import io

    import numpy as np
    import soundfile
    from datasets import Audio, Dataset, Image
    from PIL import Image as PILImage

    from framework.config.schema import DataConfig
    from framework.data.audio import AudioDecoder
    from framework.data.formats import row_fields
    from framework.data.images import ImageDecoder
    from framework.data.sources import iter_shard, resolve_shards

    pngs = []
    for i in range(6):
        buffer = io.BytesIO()
        PILImage.fromarray(np.full((8, 8), i * 40, np.uint8)).save(buffer, format="PNG")
        pngs.append({"bytes": buffer.getvalue(), "path": f"img{i}.png"})
    Dataset.from_dict({"image": pngs, "label": list(range(6))}).cast_column("image", Image()).to_parquet(str(tmp_path / "img.parquet"))
    data = DataConfig(train=str(tmp_path / "img.parquet"), image_size=8, channels=1)
    decoder = ImageDecoder(8, 1, with_labels=True)
    decoded = [decoder(key, sample, "img")[0] for shard in resolve_shards(data.train, fields=row_fields(data, "image"))
               for key, sample in iter_shard(shard)]
    assert [int(d[0][0, 0, 0]) for d in decoded] == [i * 40 for i in range(6)] and [d[1] for d in decoded] == list(range(6))
    # the same file trains SimCLR: image size and channels read from its first image, probes on its labels
    from run_helpers import REPO, metric_rows, run_cli

    run = tmp_path / "run"
    run_cli(["fit", "--config", str(REPO / "configs/experiments/simclr-digits.yaml"), f"data.train={tmp_path / 'img.parquet'}",
             f"data.val={tmp_path / 'img.parquet'}", "data.image_size=0", "data.channels=0", "data.batch_size=2",
             "data.num_workers=0", "model.layers=[1,1]", "model.widths=[8,16]", "objective.proj_hidden_dim=16",
             "objective.proj_dim=8", "trainer.max_steps=2", "trainer.val_every_steps=2", "trainer.log_every_steps=1",
             "trainer.checkpoint_every_steps=2", "logging.wandb=disabled", f"run.dir={run}"])
    rows = metric_rows(run)
    assert sum("train/loss" in r for r in rows) == 2 and any("val/loss" in r for r in rows)
    assert "image_size: 8" in (run / "config.yaml").read_text()

    clips = []
    for i in range(4):
        buffer = io.BytesIO()
        soundfile.write(buffer, np.sin(np.arange(1600) * (i + 1) / 10).astype(np.float32) * 0.5, 8000, format="WAV")
        clips.append({"bytes": buffer.getvalue(), "path": f"clip{i}.wav"})
    Dataset.from_dict({"audio": clips, "speaker": ["a", "b", "a", "b"]}).cast_column("audio", Audio()).to_parquet(str(tmp_path / "audio.parquet"))
    data = DataConfig(train=str(tmp_path / "audio.parquet"), sample_rate=8000)
    decoder = AudioDecoder(data, 0, crop=False)
    shard = resolve_shards(data.train, fields=row_fields(data, "audio"))[0]
    items = [(decoder(key, sample, shard.url)[0], json.loads(sample["json"])) for key, sample in iter_shard(shard)]
    assert [len(wave) for (wave, _), _ in items] == [1600] * 4 and [m["speaker"] for _, m in items] == ["a", "b", "a", "b"]


# ---------------------------------------------------------------- bad input, one line each


def test_missing_column_index_and_stale_index_are_one_line(corpora, tmp_path):
    with pytest.raises(DataError, match=r"part-0.parquet: no column 'body'; the file has: text, id, url, dump, language_score"):
        shards_of(str(corpora["parquet"]), RowFields((("body", TEXT),), required=True))
    with pytest.raises(DataError, match=r"no key 'body' in its rows; the first row has: dump, id, language_score, text, url"):
        shards_of(str(corpora["jsonl.gz"]), RowFields((("body", TEXT),), required=True))
    fresh = tmp_path / "fresh.jsonl.zst"
    write_jsonl(fresh, documents(0, 10))
    with pytest.raises(DataError, match=r"fresh.jsonl.zst: JSON Lines needs an index .* `pretrain data index "):
        shards_of(str(fresh))
    index(fresh)
    assert sum(s.samples for s in shards_of(str(fresh))[0]) == 10
    write_jsonl(fresh, documents(0, 12))
    os.utime(fresh, ns=(1, 1))
    with pytest.raises(DataError, match=r"its index .* was written for another version of the file"):
        shards_of(str(fresh))


def test_bad_rows_are_named_by_file_and_line_and_skipped_or_raised(tmp_path, caplog):
    rows = [json.dumps(r).encode() for r in documents(0, 8)]
    rows[2] = b"{not json"
    rows[4] = b'{"text": "caf\xe9"}'  # Latin-1, not UTF-8
    rows[5] = b'{"text": null, "id": "null-one"}'
    rows[6] = b'{"text": "   ", "id": "blank-one"}'
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    index(tmp_path / "bad.jsonl")
    shards, _ = shards_of(str(tmp_path / "bad.jsonl"))
    stream = ShardStream(shards, RowText(), seed=0, endless=False, batch_size=1)
    got = list(stream.reader_items(0, 1))
    assert len(got) == 8 and stream.counters["skipped_samples"] == 4 and stream.counters["repeated_samples"] == 4
    for expected in ("line 3 is not JSON", "line 5 is not UTF-8", "sample null-one: column 'text' is null",
                     "sample blank-one: column 'text' is empty"):
        assert expected in caplog.text, expected
    with pytest.raises(DataError, match=r"bad.jsonl, sample bad:2: line 3 is not JSON"):
        list(ShardStream(shards, RowText(), seed=0, endless=False, batch_size=1, on_error="raise").reader_items(0, 1))


@pytest.mark.parametrize("kind", ["parquet footer", "gzip", "zstd"])
def test_damaged_files_follow_on_error(tmp_path, kind, caplog):
    good = tmp_path / ("good.parquet" if kind == "parquet footer" else f"good.jsonl.{'gz' if kind == 'gzip' else 'zst'}")
    bad = good.with_name("bad" + good.name[4:])
    if kind == "parquet footer":
        write_parquet(good, documents(0, 100), sizes=(50, 50))
        write_parquet(bad, documents(100, 100), sizes=(50, 50))
        bad.write_bytes(bad.read_bytes()[:-30] + b"\0" * 22 + b"PAR1")  # a footer that is not one
    else:
        write_jsonl(good, documents(0, 100))
        write_jsonl(bad, documents(100, 100))
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) * 3 // 4])  # cut mid-stream
        index(good, bad)
    with pytest.raises(DataError, match=r"bad\.\S+: (not a readable Parquet file|truncated (gzip|zstd) stream)"):
        with_counts(resolve_sources([str(good), str(bad)], "data.train", FIELDS)[0], on_error="raise")
    shards = with_counts(resolve_sources([str(good), str(bad)], "data.train", FIELDS)[0], on_error="skip")
    stream = ShardStream(shards, RowText(), seed=0, endless=False, batch_size=1)
    got = list(stream.reader_items(0, 1))
    texts = {x.split()[0] for x in got}
    assert {f"doc{i:05d}" for i in range(100)} <= texts, "the sound file is read whole"
    if kind != "parquet footer":  # the whole lines before the damage are read too
        assert len(texts - {f"doc{i:05d}" for i in range(100)}) > 40
    assert stream.counters["skipped_shards"] >= 1 and "skipping shard" in caplog.text


def test_an_image_that_does_not_decode_is_a_bad_sample(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from framework.config.schema import DataConfig
    from framework.data.formats import row_fields
    from framework.data.images import ImageDecoder

    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": b"\x89PNG not really", "path": "x.png"}, "id": "x"}]),
                   tmp_path / "img.parquet")
    data = DataConfig(train=str(tmp_path / "img.parquet"), image_size=8, channels=1)
    shards, _ = shards_of(data.train, row_fields(data, "image"))
    with pytest.raises(DataError, match=r"img.parquet, sample x: .*image"):
        list(ShardStream(shards, ImageDecoder(8, 1), seed=0, endless=False, on_error="raise").reader_items(0, 1))


def test_index_command_is_resumable_and_parallel(tmp_path):
    for number in range(4):
        write_jsonl(tmp_path / f"p{number}.jsonl.gz", documents(number * 100, 100))
    command = [sys.executable, "-m", "framework.cli", "data", "index", str(tmp_path), "--workers", "2"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "4 to index" in first.stdout and "indexed 4 file(s): 400 lines" in first.stdout
    (tmp_path / ".pretrain-index" / "p2.jsonl.gz.json").unlink()  # as if interrupted before p2 was done
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "3 indexed already, 1 to index" in again.stdout and "indexed 1 file(s): 100 lines" in again.stdout


def test_a_parquet_fed_gpt_sees_the_tokens_of_a_tar_fed_one(text_corpus, tmp_path):
    """The text corpus's documents as FineWeb-layout Parquet: `data inspect --verify` counts
    the same tokens per epoch as on the tar shards, and `pretrain fit` trains a GPT from it."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from framework.data.sources import iter_shard, resolve_shards
    from run_helpers import REPO, metric_rows, run_cli

    rows = [{"text": str(sample["txt"], "utf-8"), "id": key, "dump": "stdlib"}
            for shard in resolve_shards(str(text_corpus["train"])) for key, sample in iter_shard(shard)]
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), tmp_path / "part-0.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(rows[half:]), tmp_path / "part-1.parquet", row_group_size=11)
    common = ["--config", str(REPO / "configs/experiments/gpt-tiny.yaml"), f"data.tokenizer={text_corpus['tokenizer']}",
              "data.val=null", "data.seq_len=32", "data.batch_size=4", "data.num_workers=0", "trainer.devices=1"]
    counts = {}
    for name, spec in (("tar", text_corpus["train"]), ("parquet", tmp_path)):
        output = run_cli(["data", "inspect", "--verify", *common, f"data.train={spec}"])
        counts[name] = re.search(r"tokens per rank (\d+)", output).group(1)
    assert counts["tar"] == counts["parquet"], counts
    run = tmp_path / "run"
    run_cli(["fit", *common, f"data.train={tmp_path}", "model.dim=32", "model.depth=1", "model.heads=2",
             "trainer.max_steps=3", "trainer.log_every_steps=1", "trainer.checkpoint_every_steps=3", "logging.wandb=disabled",
             f"run.dir={run}"])
    losses = [r["train/loss"] for r in metric_rows(run) if "train/loss" in r]
    assert len(losses) == 3 and all(loss == loss for loss in losses)


def test_row_files_convert_to_shards(corpora, tmp_path):
    """`pretrain shards text --input <jsonl.zst>` and `shards images --input <HF parquet>`: every row
    once (its id the key, its other columns in json), a bad row named and skipped."""
    import io

    import numpy as np
    from datasets import Dataset, Image
    from PIL import Image as PILImage

    from framework.data.images import ImageDecoder
    from framework.data.sources import iter_shard, resolve_shards

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "framework.cli", "shards", *args], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout + result.stderr

    out = tmp_path / "text"
    text = cli("text", "--input", str(corpora["jsonl.zst"]), "--output", str(out), "--val-fraction", "0.2", "--workers", "2")
    assert f"{DOCS} rows; 0 skipped" in text
    samples = {split: [(key, s) for shard in resolve_shards(str(out / split)) for key, s in iter_shard(shard)]
               for split in ("train", "val")}
    keys = [key for pairs in samples.values() for key, _ in pairs]
    assert sorted(keys) == [f"d{i:05d}" for i in range(DOCS)] and samples["val"] and samples["train"]
    key, sample = samples["train"][0]
    assert str(sample["txt"], "utf-8").startswith(f"doc{key[1:]}") and json.loads(bytes(sample["json"]))["id"] == key

    pngs = []
    for i in range(5):
        buffer = io.BytesIO()
        PILImage.fromarray(np.full((8, 8), i * 50, np.uint8)).save(buffer, format="PNG")
        pngs.append({"bytes": buffer.getvalue(), "path": f"i{i}.png"})
    Dataset.from_dict({"image": pngs, "label": list(range(5)), "name": [f"n.{i}" for i in range(5)]}).cast_column(
        "image", Image()).to_parquet(str(tmp_path / "hf.parquet"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "hf.parquet")
    rows = table.to_pylist()
    rows[3]["image"] = {"bytes": None, "path": "missing.png"}  # a path whose bytes were never embedded
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "hf.parquet")
    text = cli("images", "--input", str(tmp_path / "hf.parquet"), "--output", str(tmp_path / "img"), "--id-key", "name")
    assert "5 rows; 1 skipped" in text and "holds a path (missing.png) but no bytes" in text
    decoder = ImageDecoder(8, 1, with_labels=True)
    got = {key: decoder(key, s, "")[0] for shard in resolve_shards(str(tmp_path / "img")) for key, s in iter_shard(shard)}
    assert sorted(got) == ["n_0", "n_1", "n_2", "n_4"]  # '.' is not allowed in a tar key
    assert [int(got[k][0][0, 0, 0]) for k in sorted(got)] == [0, 50, 100, 200] and got["n_4"][1] == 4


@pytest.mark.parametrize("extra", [None, ()])
def test_null_and_empty_parquet_text_are_bad_samples(tmp_path, extra):
    """Both ways a unit becomes samples (row by row with metadata, column-wise without) name the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from framework.data.sources import iter_shard

    texts = ["one", None, "", "  \n", "five", b"\xff".decode("latin-1")]
    pq.write_table(pa.table({"text": texts, "id": [f"r{i}" for i in range(6)]}), tmp_path / "t.parquet")
    fields = RowFields((("text", TEXT),), required=True, extra=extra)
    shards, _ = shards_of(str(tmp_path / "t.parquet"), fields)
    stream = ShardStream(shards, RowText(), seed=0, endless=False, batch_size=1, shuffle_buffer=0)
    items = list(stream.reader_items(0, 1))  # a bad sample's place is taken by a repeat of a good one
    assert len(items) == 6 and set(items) == {"one", "five", "ÿ"}
    assert stream.counters["skipped_samples"] == 3 and stream.counters["repeated_samples"] == 3
    reasons = {key: sample.reason for key, sample in iter_shard(shards[0], bad_rows=True) if not isinstance(sample, dict)}
    assert reasons == {"r1": "column 'text' is null", "r2": "column 'text' is empty", "r3": "column 'text' is empty"}
