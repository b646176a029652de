"""WAV/FLAC files -> webdataset shards, with optional transcripts or folder labels.

One sample per file: the file's bytes as they are under ``wav`` or ``flac`` (the content
decides), ``json`` with duration, sample rate, channels, frames, format and the source
path, ``txt`` with the transcript when there is one (an entry of ``transcripts``, else a
sibling ``NAME.txt`` next to ``NAME.wav``) and ``cls`` with the class index when labels
come from folder names (the names, sorted, are the manifest's ``classes``). The other
columns of the ``transcripts`` list file (a speaker, an accent, a recording device) go into
the sample's json as they are, for evaluation by subgroup. Unreadable audio is skipped with
a warning naming the file and counted.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import re
import wave
from pathlib import Path
from typing import Any, NamedTuple

from framework.data.files import expand_inputs_with_names
from framework.data.writers.list_file import ListFile
from framework.data.writers.parallel import Sample, Skip, SplitResult, write_parallel
from framework.errors import DataError

log = logging.getLogger(__name__)

AUDIO_PATTERNS = ["*.wav", "*.WAV", "*.flac", "*.FLAC"]
_KEY_FIELDS = ("path", "audio", "file", "filename", "file_name", "id")
_TEXT_FIELDS = ("sentence", "text", "transcript", "transcription")


class AudioInfo(NamedTuple):
    format: str  # "wav" or "flac"
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


class AudioItem(NamedTuple):
    """One input file; size and mtime make an edited file change the write's fingerprint."""

    key: str
    path: str
    name: str  # relative to its input root: the json's "source"
    size: int
    mtime_ns: int
    transcript: str | None  # from the transcripts mapping
    extra: tuple[tuple[str, Any], ...]  # the list file's other columns, into the json
    label: int | None
    label_name: str | None


def _soundfile() -> Any:
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the package is there but libsndfile is not
        return None
    return soundfile


def _sf_error(err: Exception) -> str:
    # soundfile names the in-memory file object ("<_io.BytesIO object at 0x..>"): noise.
    return re.sub(r"Error opening <[^>]*>: ", "", str(err))


def _flac_streaminfo(data: bytes) -> AudioInfo:
    """Parse the STREAMINFO block that opens every FLAC file (used when soundfile is absent)."""
    if len(data) < 4 + 4 + 34 or data[4] & 0x7F != 0:
        raise ValueError("FLAC file without a STREAMINFO block")
    # 34 bytes: min/max block (2+2), min/max frame (3+3), then 20 bits rate, 3 channels-1,
    # 5 bits-per-sample-1, 36 total samples.
    packed = int.from_bytes(data[8 + 10:8 + 18], "big")
    rate = packed >> 44
    channels = ((packed >> 41) & 0x7) + 1
    frames = packed & ((1 << 36) - 1)
    return AudioInfo("flac", rate, channels, frames)


def read_audio_info(data: bytes, verify: bool = False) -> AudioInfo:
    """Format, rate, channels and frames of WAV/FLAC ``data``; ValueError saying why it is unusable.

    WAV: Python's ``wave`` (PCM), which also checks that the data holds every frame the
    header promises; other WAV encodings (float, extensible) and FLAC go through soundfile
    when installed (FLAC falls back to its STREAMINFO header). ``verify`` decodes FLAC fully.
    """
    sf = _soundfile()
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data)) as w:
                channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
                got = len(w.readframes(frames)) // max(1, channels * width)
            wave_error = None
        except Exception as err:  # wave raises Error, EOFError, struct.error, RuntimeError... on bad input
            wave_error = err
        if wave_error is None:
            if got < frames:
                raise ValueError(f"truncated WAV: header says {frames} frames, file holds {got}")
            info = AudioInfo("wav", rate, channels, frames)
        else:
            err = wave_error
            reason = str(err) or f"malformed ({type(err).__name__})"
            if sf is None:
                raise ValueError(f"unreadable WAV ({reason}); installing soundfile reads more encodings") from err
            try:
                meta = sf.info(io.BytesIO(data))
            except Exception as sf_err:  # soundfile raises its own LibsndfileError, RuntimeError
                raise ValueError(f"unreadable WAV ({reason}; soundfile: {_sf_error(sf_err)})") from sf_err
            info = AudioInfo("wav", int(meta.samplerate), int(meta.channels), int(meta.frames))
    elif data[:4] == b"fLaC":
        if sf is not None:
            try:
                meta = sf.info(io.BytesIO(data))
            except Exception as err:
                raise ValueError(f"unreadable FLAC ({_sf_error(err)})") from err
            info = AudioInfo("flac", int(meta.samplerate), int(meta.channels), int(meta.frames))
            if verify:
                try:
                    decoded = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)[0]
                except Exception as err:
                    raise ValueError(f"FLAC does not decode ({_sf_error(err)})") from err
                if len(decoded) < info.frames:
                    raise ValueError(f"truncated FLAC: header says {info.frames} frames, decoded {len(decoded)}")
        else:
            info = _flac_streaminfo(data)
    else:
        raise ValueError("not a WAV or FLAC file")
    if info.sample_rate <= 0 or info.channels <= 0:
        raise ValueError(f"bad header: sample rate {info.sample_rate}, {info.channels} channels")
    if info.frames <= 0:
        raise ValueError("contains no audio frames")
    return info


def _process_audio(item: AudioItem, verify: bool) -> Skip | list[Sample]:
    """Read one file and its transcript (runs in a writer worker)."""
    try:
        data = Path(item.path).read_bytes()
    except OSError as err:
        return Skip(item.path, f"cannot read: {err.strerror or err}")
    try:
        info = read_audio_info(data, verify)
    except ValueError as err:
        return Skip(item.path, str(err))
    transcript = item.transcript
    if transcript is None:
        sibling = Path(item.path).with_suffix(".txt")
        try:
            raw = sibling.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as err:
            return Skip(item.path, f"cannot read its transcript {sibling}: {err.strerror or err}")
        if raw is not None:
            try:
                transcript = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                return Skip(item.path, f"its transcript {sibling} is not valid UTF-8")
            if not transcript:
                return Skip(item.path, f"its transcript {sibling} is empty")
    meta: dict[str, Any] = {
        "duration": round(info.duration, 6),
        "sample_rate": info.sample_rate,
        "channels": info.channels,
        "frames": info.frames,
        "format": info.format,
        "source": item.name,
        **dict(item.extra),
    }
    members = {info.format: data}
    if transcript is not None:
        members["txt"] = transcript.encode("utf-8")
    if item.label is not None:
        members["cls"] = str(item.label).encode("ascii")
        meta["label"] = item.label_name
    members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    stats = {"seconds": info.duration, "transcripts": float(transcript is not None)}
    return [Sample(item.key, members, stats=stats)]


# The writer's own json fields: a list file's column may not take their names.
_RESERVED = ("duration", "sample_rate", "channels", "frames", "format", "source", "label")


class Transcripts(ListFile):
    """The audio writer's list file: transcripts and other columns (a speaker, an accent)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "transcripts", "audio", _KEY_FIELDS, _TEXT_FIELDS, _RESERVED)


def write_audio_shards(
    inputs: list[str],
    output: str,
    include: list[str] | None = None,
    transcripts: str | None = None,
    labels_from_folders: bool = False,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 64 * 2**20,
    seed: int = 0,
    verify: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    shards_per_chunk: int = 8,
) -> dict[str, Any]:
    """Write WAV/FLAC files (files, directories, globs) as shards under ``output``.

    Directories are searched for ``include`` patterns (default ``*.wav``, ``*.flac``).
    Keys are ``a{index:09d}``, the file's position in the sorted input list; files are
    written in an order shuffled by ``seed`` (so class folders mix). Parallel and resumable
    as :func:`framework.data.writers.parallel.write_parallel`.

    Returns ``{"inputs" (files), "samples", "skipped": [(file or TRANSCRIPTS:LINE, reason)],
    "output", "shards", "bytes", "seconds", "with_transcript", "classes", "resumed_chunks"}``.
    """
    files = expand_inputs_with_names(inputs, include or AUDIO_PATTERNS)
    mapping = Transcripts(transcripts) if transcripts else None
    skipped: list[tuple[str, str]] = list(mapping.bad) if mapping else []
    labelled: list[tuple[int, Path, str, str | None]] = []
    for index, (path, name) in enumerate(files):
        label = None
        if labels_from_folders:
            if "/" not in name:
                skipped.append((str(path), "not inside a class folder (--labels-from-folders)"))
                continue
            label = path.parent.name
        labelled.append((index, path, name, label))
    classes = sorted({label for *_, label in labelled if label is not None})
    class_index = {name: i for i, name in enumerate(classes)}
    items: list[AudioItem] = []
    for index, path, name, label in labelled:
        try:
            stat = path.stat()
        except OSError as err:
            skipped.append((str(path), f"cannot read: {err.strerror}"))
            continue
        text, extra = (mapping.lookup(path, name) if mapping else None) or (None, ())
        items.append(AudioItem(
            f"a{index:09d}", str(path), name, stat.st_size, stat.st_mtime_ns, text, extra,
            class_index[label] if label is not None else None, label,
        ))
    for where, reason in skipped:
        log.warning("skipping %s: %s", where, reason)
    if mapping is not None:
        unused = mapping.unused()
        if unused:
            log.warning("%d transcript(s) in %s match no audio file (e.g. %s)", len(unused), mapping.path,
                        ", ".join(unused[:3]))
    where = ", ".join(map(str, inputs))

    def empty_error(worker_skipped: list[tuple[str, str]]) -> DataError:
        bad = skipped + worker_skipped
        first = f" (first: {bad[0][0]}: {bad[0][1]})" if bad else ""
        return DataError(f"no usable audio: all {len(files)} file(s) in {where} were skipped{first}")

    if not items:
        raise empty_error([])
    random.Random(seed).shuffle(items)  # folders (often classes or speakers) must not fill whole shards

    def manifest_extra(name: str, result: SplitResult) -> dict[str, Any]:
        return {
            "source": "audio",
            "seed": seed,
            "seconds": round(result.stats.get("seconds", 0.0), 3),
            "with_transcript": int(result.stats.get("transcripts", 0)),
            "classes": classes,
            "skipped": len(files) - result.items,
        }

    result = write_parallel(
        items,
        functools.partial(_process_audio, verify=verify),
        output,
        writer="audio",
        modality="audio",
        options={"seed": seed, "verify": verify, "labels_from_folders": labels_from_folders,
                 "transcripts": str(mapping.path.resolve()) if mapping else None},
        max_samples_per_shard=max_samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        item_sizes=[item.size for item in items],
        shards_per_chunk=shards_per_chunk,
        workers=workers,
        overwrite=overwrite,
        manifest_extra=manifest_extra,
        empty_error=empty_error,
        description="writing audio shards",
    )
    skipped += result.skipped
    bad_files = len(files) - result.splits["train"].items
    if skipped:
        log.warning("skipped %d of %d audio file(s)%s", bad_files, len(files),
                    f" and {len(mapping.bad)} transcript line(s)" if mapping and mapping.bad else "")
    split = result.splits["train"]
    return {
        "inputs": len(files),
        "samples": split.samples,
        "skipped": skipped,
        "output": str(split.directory),
        "shards": len(split.shards),
        "bytes": split.bytes,
        "seconds": split.stats.get("seconds", 0.0),
        "with_transcript": int(split.stats.get("transcripts", 0)),
        "classes": classes,
        "resumed_chunks": result.resumed_chunks,
    }
