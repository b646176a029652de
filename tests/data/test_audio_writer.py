"""Audio shards from wav/flac files: metadata, transcripts, folder labels, bad files, parallel, resume."""
from __future__ import annotations

import io
import json
import logging
import math
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import pytest
from writer_checks import check_output, output_files

from framework.cli import main
from framework.data.manifest import read_manifest
from framework.data.writers.audio import _flac_streaminfo, read_audio_info, write_audio_shards
from framework.data.writers.parallel import KILL_ENV, WriterCrashed
from framework.errors import DataError


def make_wav(path: Path, frames: int, rate: int = 8000, channels: int = 1, width: int = 2, tone: float = 440.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    peak = 2 ** (8 * width - 1) - 1
    samples = []
    for n in range(frames):
        value = int(peak * 0.3 * math.sin(2 * math.pi * tone * n / rate))
        frame = value.to_bytes(width, "little", signed=True) if width > 1 else bytes([value + 128])
        samples.append(frame * channels)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"".join(samples))


@pytest.fixture
def audio(tmp_path: Path) -> dict:
    """root/{dog,cat}/*.wav with a few sibling transcripts, a stereo and an 8-bit file, and 3 bad files."""
    root = tmp_path / "audio"
    expected = {}
    for label in ("dog", "cat"):
        for i in range(6):
            path = root / label / f"{label}{i}.wav"
            rate, channels, width = (16000, 2, 2) if i == 1 else (8000, 1, 1 if i == 2 else 2)
            make_wav(path, frames=400 * (i + 1), rate=rate, channels=channels, width=width, tone=200 + 50 * i)
            expected[path] = {"frames": 400 * (i + 1), "sample_rate": rate, "channels": channels, "label": label}
            if i % 2 == 0:
                path.with_suffix(".txt").write_text(f"  the {label} number {i}\n", encoding="utf-8")
                expected[path]["txt"] = f"the {label} number {i}"
    (root / "dog" / "noise.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    (root / "cat" / "empty.wav").write_bytes(b"")
    make_wav(root / "cat" / "cut.wav", frames=1000)
    data = (root / "cat" / "cut.wav").read_bytes()
    (root / "cat" / "cut.wav").write_bytes(data[: len(data) // 2])  # header promises 1000 frames
    return {"root": root, "expected": expected, "bad": {"noise.wav", "empty.wav", "cut.wav"}}


def by_source(samples: dict) -> dict[str, dict]:
    return {json.loads(m["json"])["source"]: m for m in samples.values()}


def test_members_metadata_labels_and_skips(audio: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = write_audio_shards([str(audio["root"])], str(out), labels_from_folders=True, max_samples_per_shard=5)
    samples = check_output(out)
    assert summary["samples"] == len(samples) == 12 and summary["inputs"] == 15
    assert {Path(p).name for p, _ in summary["skipped"]} == audio["bad"]
    reasons = {Path(p).name: r for p, r in summary["skipped"]}
    assert "truncated WAV" in reasons["cut.wav"] and "not a WAV or FLAC" in reasons["empty.wav"]
    for name in audio["bad"]:
        assert name in caplog.text
    assert summary["classes"] == ["cat", "dog"]
    sources = by_source(samples)
    total = 0.0
    for path, expect in audio["expected"].items():
        members = sources[path.relative_to(audio["root"]).as_posix()]
        meta = json.loads(members["json"])
        assert members["wav"] == path.read_bytes()
        assert (meta["frames"], meta["sample_rate"], meta["channels"]) == (
            expect["frames"], expect["sample_rate"], expect["channels"])
        assert meta["duration"] == pytest.approx(expect["frames"] / expect["sample_rate"])
        assert meta["label"] == expect["label"] and members["cls"] == str(["cat", "dog"].index(expect["label"])).encode()
        assert members.get("txt", b"").decode() == expect.get("txt", "")
        total += meta["duration"]
    manifest = read_manifest(out)
    assert manifest["modality"] == "audio" and manifest["classes"] == ["cat", "dog"]
    assert manifest["seconds"] == pytest.approx(total, abs=1e-3) and manifest["with_transcript"] == 6
    assert manifest["skipped"] == 3 and all(s["samples"] <= 5 for s in manifest["shards"])
    # Shuffled by seed: shards mix the two classes.
    first_shard = [m["cls"] for m in list(samples.values())[:5]]
    assert len(set(first_shard)) == 2


def test_files_outside_class_folders_are_reported(audio: dict, tmp_path: Path) -> None:
    make_wav(audio["root"] / "loose.wav", frames=100)
    summary = write_audio_shards([str(audio["root"])], str(tmp_path / "o"), labels_from_folders=True)
    assert (str(audio["root"] / "loose.wav"), "not inside a class folder (--labels-from-folders)") in summary["skipped"]


def test_transcript_mappings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "clips"
    for name in ("a", "b", "c", "d"):
        make_wav(root / "spk1" / f"{name}.wav", frames=200)
    # Common Voice style: a header, the key is a file name of another format.
    (tmp_path / "cv.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\n"
        "x\ta.mp3\tHello there.\t2\n"
        "x\tspk1/b.wav\tGeneral Kenobi.\t1\n"
        "x\tbroken line\n"
        "x\tghost.mp3\tnobody\t0\n", encoding="utf-8")
    (root / "spk1" / "c.txt").write_text("from the sibling file")
    with caplog.at_level(logging.WARNING):
        summary = write_audio_shards([str(root)], str(tmp_path / "o1"), transcripts=str(tmp_path / "cv.tsv"))
    texts = {k: m.get("txt") for k, m in by_source(check_output(tmp_path / "o1")).items()}
    assert texts == {"spk1/a.wav": b"Hello there.", "spk1/b.wav": b"General Kenobi.",
                     "spk1/c.wav": b"from the sibling file", "spk1/d.wav": None}
    assert summary["with_transcript"] == 3
    assert (f"{tmp_path / 'cv.tsv'}:4", "expected audio<TAB>transcript") in summary["skipped"]
    assert "ghost.mp3" in caplog.text and "match no audio file" in caplog.text

    (tmp_path / "plain.tsv").write_text("d\tfourth\nd\tagain\n")
    summary = write_audio_shards([str(root)], str(tmp_path / "o2"), transcripts=str(tmp_path / "plain.tsv"))
    assert by_source(check_output(tmp_path / "o2"))["spk1/d.wav"]["txt"] == b"fourth"
    assert any("second entry" in reason for _, reason in summary["skipped"])

    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": str(root / "spk1" / "a.wav"), "text": "absolute"}) + "\n"
                                      + json.dumps({"audio": "clips/spk1/b.wav", "text": "relative"}) + "\n{bad\n")
    summary = write_audio_shards([str(root)], str(tmp_path / "o3"), transcripts=str(tmp_path / "m.jsonl"))
    texts = {k: m.get("txt") for k, m in by_source(check_output(tmp_path / "o3")).items()}
    assert texts["spk1/a.wav"] == b"absolute" and texts["spk1/b.wav"] == b"relative"
    assert (f"{tmp_path / 'm.jsonl'}:3", "invalid JSON (Expecting property name enclosed in double quotes)") in summary["skipped"]

    # other columns go into each sample's json (an accent for evaluation by subgroup); a row may hold only those
    (tmp_path / "meta.jsonl").write_text(json.dumps({"path": "a.wav", "text": "hi", "accent": "en-gb", "speed": 150}) + "\n"
                                         + json.dumps({"path": "d.wav", "accent": "en-029"}) + "\n")
    write_audio_shards([str(root)], str(tmp_path / "o5"), transcripts=str(tmp_path / "meta.jsonl"))
    samples = by_source(check_output(tmp_path / "o5"))
    meta = {k: json.loads(m["json"]) for k, m in samples.items()}
    assert meta["spk1/a.wav"]["accent"] == "en-gb" and meta["spk1/a.wav"]["speed"] == 150
    assert samples["spk1/a.wav"]["txt"] == b"hi" and meta["spk1/d.wav"]["accent"] == "en-029"
    assert "txt" not in samples["spk1/d.wav"] and "accent" not in meta["spk1/b.wav"]
    summary = write_audio_shards([str(root)], str(tmp_path / "o6"), transcripts=str(tmp_path / "cv.tsv"))
    assert json.loads(by_source(check_output(tmp_path / "o6"))["spk1/a.wav"]["json"])["up_votes"] == "2"
    (tmp_path / "clash.jsonl").write_text(json.dumps({"path": "a.wav", "duration": 3}) + "\n")
    with pytest.raises(DataError, match=r"clash.jsonl:1: column 'duration' is a field the audio writer sets"):
        write_audio_shards([str(root)], str(tmp_path / "o7"), transcripts=str(tmp_path / "clash.jsonl"))

    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"t.csv: unsupported format"):
        write_audio_shards([str(root)], str(tmp_path / "o4"), transcripts=str(tmp_path / "t.csv"))


def test_flac_and_float_wav_through_soundfile(tmp_path: Path) -> None:
    sf = pytest.importorskip("soundfile")
    import numpy as np

    tone = (0.2 * np.sin(np.arange(4410) / 10)).astype("float32")
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "t.flac", tone, 44100, format="FLAC")
    sf.write(tmp_path / "in" / "f.wav", np.stack([tone, tone], axis=1), 22050, subtype="FLOAT")
    summary = write_audio_shards([str(tmp_path / "in")], str(tmp_path / "o"))
    sources = by_source(check_output(tmp_path / "o"))
    flac, wav = json.loads(sources["t.flac"]["json"]), json.loads(sources["f.wav"]["json"])
    assert (flac["format"], flac["sample_rate"], flac["channels"], flac["frames"]) == ("flac", 44100, 1, 4410)
    assert (wav["format"], wav["sample_rate"], wav["channels"], wav["frames"]) == ("wav", 22050, 2, 4410)
    assert sources["t.flac"]["flac"] == (tmp_path / "in" / "t.flac").read_bytes()
    assert summary["seconds"] == pytest.approx(0.1 + 0.2)
    # The header parser used without soundfile agrees with it.
    assert _flac_streaminfo((tmp_path / "in" / "t.flac").read_bytes()) == read_audio_info(
        (tmp_path / "in" / "t.flac").read_bytes())
    cut = (tmp_path / "in" / "t.flac").read_bytes()[:200]
    with pytest.raises(ValueError, match="FLAC"):
        read_audio_info(cut, verify=True)


def test_parallel_equals_sequential_and_crash_resume(audio: dict, tmp_path: Path, monkeypatch) -> None:
    args = dict(labels_from_folders=True, max_samples_per_shard=2, max_shard_bytes=20000, shards_per_chunk=1)
    write_audio_shards([str(audio["root"])], str(tmp_path / "w1"), workers=1, **args)
    write_audio_shards([str(audio["root"])], str(tmp_path / "w2"), workers=2, **args)
    assert output_files(tmp_path / "w1") == output_files(tmp_path / "w2")
    shards = read_manifest(tmp_path / "w2")["shards"]
    assert len(shards) >= 6 and all(s["samples"] <= 2 and (s["bytes"] <= 20000 or s["samples"] == 1) for s in shards)

    monkeypatch.setenv(KILL_ENV, "2:0")
    with pytest.raises(WriterCrashed):
        write_audio_shards([str(audio["root"])], str(tmp_path / "out"), workers=2, **args)
    monkeypatch.delenv(KILL_ENV)
    summary = write_audio_shards([str(audio["root"])], str(tmp_path / "out"), workers=2, **args)
    assert output_files(tmp_path / "out") == output_files(tmp_path / "w1")
    assert len(check_output(tmp_path / "out")) == summary["samples"] == 12


def test_nothing_readable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.wav").write_bytes(b"not audio")
    with pytest.raises(DataError, match=r"no usable audio: all 1 file\(s\) in .*in were skipped \(first: .*x.wav"):
        write_audio_shards([str(tmp_path / "in")], str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"no input files found in .*in"):
        write_audio_shards([str(tmp_path / "in")], str(tmp_path / "o"), include=["*.flac"])


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_real_synthesized_speech(tmp_path: Path, capsys) -> None:
    speech = tmp_path / "speech" / "hello.wav"
    speech.parent.mkdir()
    text = "The quick brown fox jumps over the lazy dog."
    subprocess.run(["espeak-ng", "-w", str(speech), text], check=True, capture_output=True, timeout=60)
    speech.with_suffix(".txt").write_text(text)
    main(["shards", "audio", "-i", str(speech.parent), "-o", str(tmp_path / "out")])
    assert "1 samples from 1 audio files; 0 skipped" in capsys.readouterr().out
    (members,) = check_output(tmp_path / "out").values()
    meta = json.loads(members["json"])
    with wave.open(io.BytesIO(members["wav"])) as w:
        assert (meta["sample_rate"], meta["channels"], meta["frames"]) == (w.getframerate(), w.getnchannels(), w.getnframes())
    assert 1.0 < meta["duration"] < 10.0 and members["txt"].decode() == text
    # Real speech, not silence: the samples vary.
    pcm = struct.unpack(f"<{len(members['wav'][44:]) // 2}h", members["wav"][44:44 + len(members["wav"][44:]) // 2 * 2])
    assert max(pcm) - min(pcm) > 1000


def test_cli_audio(audio: dict, tmp_path: Path, capsys) -> None:
    main(["shards", "audio", "-i", str(audio["root"]), "-o", str(tmp_path / "out"), "--labels-from-folders",
          "--workers", "2", "--max-samples-per-shard", "3", "--shards-per-chunk", "1"])
    printed = capsys.readouterr().out
    assert "12 samples from 15 audio files; 3 skipped" in printed and "2 classes" in printed
    assert len(check_output(tmp_path / "out")) == 12
