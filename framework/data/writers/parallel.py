"""A parallel, crash-resumable driver shared by every shard writer.

The writer gives the driver its input items in a fixed order and a ``process`` function
turning one item into samples (or into a :class:`Skip` naming the bad input). The driver:

1. cuts the items into deterministic *chunks* (by item count and estimated bytes, from the
   shard caps), so the chunks depend only on the inputs and options, never on ``workers``;
2. writes each chunk in a worker process into its own shards
   ``{prefix}-{chunk:06d}-{k:04d}.tar`` (``.tmp`` then an atomic rename, as ShardWriter does);
3. records a finished chunk with an atomically written fragment
   ``.writer-state/chunk-{chunk:06d}.json`` listing its shards, counts and skipped items;
4. merges the fragments, in chunk order, into each output directory's ``manifest.json``.

Because a chunk's shards depend only on its items, the output is byte-identical for any
number of workers, and a rerun after a crash (even ``kill -9``) keeps the finished chunks,
deletes ``.tmp`` files and the shards of unfinished chunks, rewrites those chunks and ends
with exactly the shards an uninterrupted run writes. ``.writer-state/fingerprint.json``
holds a hash of the items, the chunking and the options: a rerun with other inputs or
options is refused unless ``overwrite`` (then the old outputs are deleted first). A rerun
of a finished write with the same inputs and options rewrites only the manifests.

A directory without ``manifest.json`` holds an unfinished write; readers should not use it.
Workers are started with forkserver (or spawn), so a script calling a writer needs the usual
``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, Union

from framework.data.files import file_progress
from framework.data.manifest import MANIFEST_NAME, write_manifest
from framework.data.writers.shard_writer import ShardWriter, clear_existing_outputs
from framework.errors import DataError, UserError

log = logging.getLogger(__name__)

STATE_DIR = ".writer-state"
FINGERPRINT_NAME = "fingerprint.json"
STATE_VERSION = 1
# Test hook: "CHUNK:ITEM" makes the process writing chunk CHUNK SIGKILL itself right after
# item ITEM, leaving a half-written .tmp shard, like a machine dying mid-write.
KILL_ENV = "FRAMEWORK_WRITER_KILL_AT"
_PROGRESS_INTERVAL = 0.2  # seconds between a worker's progress messages


@dataclass(frozen=True)
class Sample:
    """One sample to write: tar members ``{key}.{ext}`` into the output split ``split``.

    ``stats`` are numbers summed per split into the manifest (e.g. audio seconds).
    """

    key: str
    members: Mapping[str, bytes]
    split: str = "train"
    stats: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """An input that cannot be written: ``name`` shows the user which file or row, ``reason`` why."""

    name: str
    reason: str


ProcessResult = Union[Skip, Iterable[Union[Sample, Skip]]]  # an item's samples may skip some of its rows


class WriterCrashed(UserError):
    """A worker process died (killed, out of memory); the finished chunks are kept."""


@dataclass
class SplitResult:
    """What one output directory holds after the write."""

    directory: Path
    shards: list[dict[str, Any]]
    items: int  # input items that gave at least one sample in this split
    stats: dict[str, float]

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)


@dataclass
class WriteResult:
    """Totals of a :func:`write_parallel` call (including chunks finished by an earlier run)."""

    splits: dict[str, SplitResult]
    skipped: list[tuple[str, str]]
    items: int
    chunks: int
    resumed_chunks: int  # chunks found finished from an earlier, interrupted run

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.splits.values())


class _Task(NamedTuple):
    """Everything a worker needs to write one chunk (pickled to the worker)."""

    chunk: int
    start: int
    items: list[Any]
    process: Callable[[Any], ProcessResult]
    split_dirs: dict[str, str]
    state_dir: str
    fingerprint: str
    modality: str
    prefix: str
    max_samples: int
    max_bytes: int
    # Read from KILL_ENV in the parent: a forkserver's children see the server's environment.
    kill_at: tuple[int, int] | None = None


def default_workers() -> int:
    """min(4, CPU count): writing is mostly I/O and tar packing, more rarely pays off."""
    return max(1, min(4, os.cpu_count() or 1))


def plan_chunks(
    count: int, sizes: Sequence[int] | None, max_items: int, max_bytes: int
) -> list[tuple[int, int]]:
    """Cut ``range(count)`` into consecutive ``(start, end)`` chunks.

    A chunk ends after ``max_items`` items or once its items' estimated ``sizes`` reach
    ``max_bytes``; every chunk has at least one item. Depends only on its arguments, so
    the same inputs always give the same chunks.
    """
    chunks: list[tuple[int, int]] = []
    start = 0
    total = 0
    for i in range(count):
        total += max(0, sizes[i]) if sizes is not None else 0
        if i + 1 - start >= max_items or total >= max_bytes:
            chunks.append((start, i + 1))
            start, total = i + 1, 0
    if start < count:
        chunks.append((start, count))
    return chunks


def _shard_name(prefix: str, chunk: int, index: int) -> str:
    return f"{prefix}-{chunk:06d}-{index:04d}.tar"


def _fragment_path(state_dir: Path, chunk: int) -> Path:
    return state_dir / f"chunk-{chunk:06d}.json"


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file and rename, so a reader sees all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_chunk_shards(split_dirs: Iterable[Path], prefix: str, chunk: int) -> None:
    for directory in split_dirs:
        for pattern in (f"{prefix}-{chunk:06d}-*.tar", f"{prefix}-{chunk:06d}-*.tar.tmp"):
            for path in directory.glob(pattern):
                path.unlink(missing_ok=True)


def _kill_point() -> tuple[int, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    chunk, item = spec.split(":")
    return int(chunk), int(item)


def _write_chunk(task: _Task, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write one chunk's shards, then its fragment; returns the fragment. Runs in a worker."""
    split_dirs = {name: Path(d) for name, d in task.split_dirs.items()}
    # Leftovers of an earlier attempt at this chunk would clash with or duplicate its shards.
    _remove_chunk_shards(split_dirs.values(), task.prefix, task.chunk)
    writers: dict[str, ShardWriter] = {}
    items = {name: 0 for name in split_dirs}
    stats: dict[str, dict[str, float]] = {name: {} for name in split_dirs}
    skipped: list[list[str]] = []
    unreported = 0
    last_report = time.monotonic()
    try:
        for offset, item in enumerate(task.items):
            result = task.process(item)
            if isinstance(result, Skip):
                skipped.append([result.name, result.reason])
            else:
                splits_hit: set[str] = set()
                row_skips = len(skipped)
                for sample in result:
                    if isinstance(sample, Skip):  # one bad row of an item that gives many samples
                        skipped.append([sample.name, sample.reason])
                        continue
                    if sample.split not in split_dirs:
                        raise ValueError(f"sample {sample.key!r} names unknown split {sample.split!r}")
                    writer = writers.get(sample.split)
                    if writer is None:
                        writer = writers[sample.split] = ShardWriter(
                            split_dirs[sample.split],
                            modality=task.modality,
                            prefix=task.prefix,
                            max_samples=task.max_samples,
                            max_bytes=task.max_bytes,
                            shard_name=lambda k, c=task.chunk: _shard_name(task.prefix, c, k),
                            standalone=False,
                        )
                    if writer.holds(sample.key):  # ids repeated across row files: named, not written twice
                        skipped.append([sample.key, f"duplicate sample key in {writer.current_shard()}"])
                        continue
                    writer.write(sample.key, sample.members)
                    splits_hit.add(sample.split)
                    for name, value in sample.stats.items():
                        stats[sample.split][name] = stats[sample.split].get(name, 0.0) + value
                if not splits_hit and len(skipped) == row_skips:
                    # A processor that returns nothing for an item must not lose it silently.
                    skipped.append([repr(item), "produced no samples"])
                for name in splits_hit:
                    items[name] += 1
            if task.kill_at == (task.chunk, offset):
                os.kill(os.getpid(), signal.SIGKILL)
            unreported += 1
            if progress is not None and time.monotonic() - last_report > _PROGRESS_INTERVAL:
                progress(unreported)
                unreported, last_report = 0, time.monotonic()
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        # The chunk is redone as a whole; its finished shards must not linger meanwhile.
        _remove_chunk_shards(split_dirs.values(), task.prefix, task.chunk)
        raise
    if progress is not None and unreported:
        progress(unreported)
    fragment = {
        "version": STATE_VERSION,
        "fingerprint": task.fingerprint,
        "chunk": task.chunk,
        "start": task.start,
        "end": task.start + len(task.items),
        "shards": {name: (writers[name].shards if name in writers else []) for name in split_dirs},
        "items": items,
        "stats": stats,
        "skipped": skipped,
    }
    _write_json_atomic(_fragment_path(Path(task.state_dir), task.chunk), fragment)
    return fragment


# --- worker-process side of the pool -------------------------------------------------------

_progress_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    # Ctrl-C reaches the whole process group: let the parent decide, workers just stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_write_chunk(task: _Task) -> dict[str, Any]:
    queue = _progress_queue
    return _write_chunk(task, None if queue is None else (lambda n: queue.put(n)))


# --- parent side ---------------------------------------------------------------------------


def _fingerprint(
    writer: str,
    modality: str,
    options: Mapping[str, Any],
    split_names: dict[str, str],
    prefix: str,
    chunks: list[tuple[int, int]],
    items: Sequence[Any],
) -> dict[str, Any]:
    """What identifies a write: everything that changes the bytes of its shards."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    items_hash = digest.hexdigest()
    chunks_hash = hashlib.sha256(json.dumps(chunks).encode()).hexdigest()
    described = {
        "writer": writer,
        "modality": modality,
        "prefix": prefix,
        "splits": split_names,
        "options": json.loads(json.dumps(dict(options), sort_keys=True)),
        "item_count": len(items),
        "items_sha256": items_hash,
        "chunk_count": len(chunks),
        "chunks_sha256": chunks_hash,
    }
    described["fingerprint"] = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    described["version"] = STATE_VERSION
    return described


def _describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Say in words what differs between two fingerprints, for the refusal message."""
    changes = []
    if old.get("writer") != new["writer"]:
        changes.append(f"writer {old.get('writer')!r} -> {new['writer']!r}")
    old_opts, new_opts = old.get("options") or {}, new["options"]
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            changes.append(f"{key} {old_opts.get(key)!r} -> {new_opts.get(key)!r}")
    if old.get("splits") != new["splits"]:
        changes.append(f"splits {old.get('splits')} -> {new['splits']}")
    if old.get("item_count") != new["item_count"]:
        changes.append(f"input items {old.get('item_count')} -> {new['item_count']}")
    elif old.get("items_sha256") != new["items_sha256"]:
        changes.append("the input items (names, sizes or modification times) changed")
    if not changes:
        changes.append("the chunking or format changed")
    return "; ".join(changes)


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / FINGERPRINT_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        # Written atomically, so this is damage from outside; never guess, ask for --overwrite.
        raise DataError(
            f"cannot read the writer state {path} ({err}); pass overwrite (--overwrite) to start over"
        ) from err
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise DataError(f"corrupt writer state {path}; pass overwrite (--overwrite) to start over")
    return state


def _load_fragment(state_dir: Path, chunk: int, start: int, end: int, fingerprint: str,
                   split_dirs: dict[str, Path]) -> dict[str, Any] | None:
    """The chunk's fragment if it and every shard it lists are intact, else None."""
    path = _fragment_path(state_dir, chunk)
    try:
        fragment = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("rewriting chunk %d: its record %s is unreadable (%s)", chunk, path, err)
        return None
    if (
        not isinstance(fragment, dict)
        or fragment.get("fingerprint") != fingerprint
        or (fragment.get("chunk"), fragment.get("start"), fragment.get("end")) != (chunk, start, end)
        or set(fragment.get("shards", {})) != set(split_dirs)
    ):
        log.warning("rewriting chunk %d: its record %s belongs to another write", chunk, path)
        return None
    for split, shards in fragment["shards"].items():
        for shard in shards:
            shard_path = split_dirs[split] / shard["path"]
            try:
                size = shard_path.stat().st_size
            except FileNotFoundError:
                size = -1
            if size != shard["bytes"]:
                log.warning("rewriting chunk %d: shard %s is missing or has the wrong size", chunk, shard_path)
                return None
    return fragment


def _clean_directory(directory: Path, prefix: str, keep: set[str]) -> int:
    """Delete this writer's ``.tmp`` files and every shard not in ``keep``; returns how many."""
    if not directory.is_dir():
        return 0
    removed = 0
    for pattern in (f"{prefix}-*.tar.tmp", f".{MANIFEST_NAME}.*.tmp", f"{prefix}-*.tar"):
        for path in directory.glob(pattern):
            if path.name not in keep:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _lock(state_dir: Path) -> Any:
    """An exclusive lock on the state directory: two writers in one directory would interleave."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, the user is trusted
        return None
    handle = open(state_dir / "lock", "a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataError(f"another process is writing shards into {state_dir.parent}; wait for it or stop it") from None
    return handle


def mp_context() -> multiprocessing.context.BaseContext:
    # Not fork: the parent may run threads (the progress bar, torch), and forking those can deadlock.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def write_parallel(
    items: Sequence[Any],
    process: Callable[[Any], ProcessResult],
    output: str | os.PathLike[str],
    *,
    writer: str,
    modality: str,
    options: Mapping[str, Any],
    splits: Mapping[str, str | os.PathLike[str]] | None = None,
    stale_dirs: Sequence[str | os.PathLike[str]] = (),
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 64 * 2**20,
    item_sizes: Sequence[int] | None = None,
    shards_per_chunk: int = 8,
    workers: int | None = None,
    overwrite: bool = False,
    manifest_extra: Callable[[str, SplitResult], dict[str, Any]] | None = None,
    empty_error: Callable[[list[tuple[str, str]]], Exception] | None = None,
    description: str = "writing shards",
    prefix: str = "shard",
) -> WriteResult:
    """Write ``items`` as shards under ``output`` with ``workers`` processes; resumable.

    ``process(item)`` (a picklable top-level function or ``functools.partial`` of one) runs
    in the workers and returns the item's :class:`Sample` list or a :class:`Skip`. Samples
    go to ``splits[sample.split]`` (default: one split ``"train"`` writing into ``output``).
    ``options`` (JSON-able) are everything else that changes the output; with ``writer``,
    the items (by ``repr``) and the chunking they form the fingerprint checked on reruns.
    ``stale_dirs`` are directories an earlier write of another layout may have filled; they
    are checked and cleared like the split directories. ``item_sizes`` (estimated output
    bytes per item) let chunks hold about ``shards_per_chunk`` full shards.

    Skipped items are logged as warnings and returned. When no item gives a sample,
    nothing is kept and ``empty_error(skipped)`` (default: a generic DataError) is raised.
    """
    if max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if shards_per_chunk < 1:
        raise ValueError(f"shards_per_chunk must be >= 1, got {shards_per_chunk}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if item_sizes is not None and len(item_sizes) != len(items):
        raise ValueError(f"{len(item_sizes)} item sizes for {len(items)} items")
    if not items:
        raise DataError(f"nothing to write into {output}: no input items")

    out = Path(output)
    split_dirs = {name: Path(d) for name, d in (splits or {"train": out}).items()}
    split_names = {name: os.path.relpath(d, out) for name, d in split_dirs.items()}
    state_dir = out / STATE_DIR
    chunks = plan_chunks(
        len(items), item_sizes, shards_per_chunk * max_samples_per_shard, shards_per_chunk * max_shard_bytes
    )
    options = {**options, "max_samples_per_shard": max_samples_per_shard, "max_shard_bytes": max_shard_bytes,
               "shards_per_chunk": shards_per_chunk}
    fp = _fingerprint(writer, modality, options, split_names, prefix, chunks, items)
    output_dirs = list(dict.fromkeys([*split_dirs.values(), *map(Path, stale_dirs)]))

    try:
        state = _read_state(state_dir)
    except DataError:
        if not overwrite:
            raise
        state = {"fingerprint": None}  # damaged: replaced like any other write's state
    if state is not None and state["fingerprint"] != fp["fingerprint"]:
        if not overwrite:
            raise DataError(
                f"output directory {out} already contains shards from a different write "
                f"({_describe_change(state, fp)}); choose another directory or pass overwrite "
                f"(--overwrite) to replace them"
            )
        shutil.rmtree(state_dir)
        state = None
    if state is None:
        # A fresh write: old shards (of any layout) must not mix with the new ones.
        for directory in output_dirs:
            clear_existing_outputs(directory, prefix, overwrite)
        shutil.rmtree(state_dir, ignore_errors=True)
    # Same fingerprint: an interrupted or finished run of this very write. Its finished
    # chunks are byte-identical to what this run would write, so they are kept even with
    # overwrite.
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(state_dir)
    try:
        if state is None:
            _write_json_atomic(state_dir / FINGERPRINT_NAME, fp)
        return _run(items, process, chunks, fp["fingerprint"], out, state_dir, split_dirs, output_dirs,
                    modality=modality, prefix=prefix, max_samples=max_samples_per_shard,
                    max_bytes=max_shard_bytes, workers=workers, manifest_extra=manifest_extra,
                    empty_error=empty_error, description=description)
    finally:
        if lock is not None:
            lock.close()


def _run(
    items: Sequence[Any],
    process: Callable[[Any], ProcessResult],
    chunks: list[tuple[int, int]],
    fingerprint: str,
    out: Path,
    state_dir: Path,
    split_dirs: dict[str, Path],
    output_dirs: list[Path],
    *,
    modality: str,
    prefix: str,
    max_samples: int,
    max_bytes: int,
    workers: int,
    manifest_extra: Callable[[str, SplitResult], dict[str, Any]] | None,
    empty_error: Callable[[list[tuple[str, str]]], Exception] | None,
    description: str,
) -> WriteResult:
    fragments: dict[int, dict[str, Any]] = {}
    for chunk, (start, end) in enumerate(chunks):
        fragment = _load_fragment(state_dir, chunk, start, end, fingerprint, split_dirs)
        if fragment is not None:
            fragments[chunk] = fragment
        else:
            _fragment_path(state_dir, chunk).unlink(missing_ok=True)
    for stray in state_dir.glob(".chunk-*.tmp"):
        stray.unlink(missing_ok=True)
    resumed = len(fragments)
    pending = [c for c in range(len(chunks)) if c not in fragments]
    keep = {s["path"] for f in fragments.values() for shards in f["shards"].values() for s in shards}
    for directory in output_dirs:
        removed = _clean_directory(directory, prefix, keep)
        if removed:
            log.info("removed %d unfinished shard file(s) from %s", removed, directory)
        if pending:
            # Until every chunk is written the directory is unfinished: no manifest may claim otherwise.
            (directory / MANIFEST_NAME).unlink(missing_ok=True)
    if pending:
        if resumed:
            log.info("resuming: %d of %d chunk(s) already written in %s", resumed, len(chunks), out)
        for directory in split_dirs.values():
            directory.mkdir(parents=True, exist_ok=True)

    for chunk in sorted(fragments):
        _log_skipped(fragments[chunk])
    tasks = [
        _Task(
            chunk=c,
            start=chunks[c][0],
            items=list(items[chunks[c][0]:chunks[c][1]]),
            process=process,
            split_dirs={name: str(d) for name, d in split_dirs.items()},
            state_dir=str(state_dir),
            fingerprint=fingerprint,
            modality=modality,
            prefix=prefix,
            max_samples=max_samples,
            max_bytes=max_bytes,
            kill_at=_kill_point(),
        )
        for c in pending
    ]
    try:
        with file_progress(description, total=len(items)) as update:
            update(advance=sum(end - start for c, (start, end) in enumerate(chunks) if c in fragments))
            if len(tasks) == 1 or workers == 1:
                for task in tasks:  # in this process: no start-up cost, same bytes
                    fragments[task.chunk] = _write_chunk(task, progress=lambda n: update(advance=n))
                    _log_skipped(fragments[task.chunk])
            elif tasks:
                _run_pool(tasks, workers, update, out, fragments)
    except BaseException:
        # Stopped workers leave .tmp files and shards of unfinished chunks: tidy up now (the
        # next run would too), keeping every finished chunk for the resume.
        keep = {s["path"] for f in fragments.values() for shards in f["shards"].values() for s in shards}
        for directory in output_dirs:
            _clean_directory(directory, prefix, keep)
        raise

    merged = _merge(fragments, len(chunks), split_dirs)
    if merged.samples == 0:
        # Nothing usable: leave no state behind, so fixing the inputs needs no --overwrite.
        shutil.rmtree(state_dir, ignore_errors=True)
        if empty_error is not None:
            raise empty_error(merged.skipped)
        first = f" (first: {merged.skipped[0][0]}: {merged.skipped[0][1]})" if merged.skipped else ""
        raise DataError(f"nothing written to {out}: all {len(items)} input item(s) were skipped{first}")
    merged.items = len(items)
    merged.resumed_chunks = resumed
    for name, result in merged.splits.items():
        extra = manifest_extra(name, result) if manifest_extra is not None else {}
        write_manifest(result.directory, result.shards, modality, extra)
    return merged


def _run_pool(
    tasks: list[_Task], workers: int, update: Callable[..., None], out: Path, fragments: dict[int, dict[str, Any]]
) -> None:
    """Write ``tasks`` in a process pool, adding each finished chunk's fragment to ``fragments``.

    The progress bar advances as workers report items."""
    ctx = mp_context()
    queue = ctx.Queue()
    sizes = {task.chunk: len(task.items) for task in tasks}
    finished = 0
    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker, initargs=(queue,)
    )
    advanced = 0

    def drain() -> None:
        nonlocal advanced
        while True:
            try:
                n = queue.get_nowait()
            except Exception:  # queue.Empty; any other error only costs a stale progress bar
                return
            advanced += n
            update(advance=n)

    try:
        futures = {pool.submit(_pool_write_chunk, task): task.chunk for task in tasks}
        not_done = set(futures)
        while not_done:
            done, not_done = cf.wait(not_done, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            drain()
            for future in done:
                chunk = futures[future]
                fragment = future.result()  # re-raises the worker's error (e.g. a DataError)
                fragments[chunk] = fragment
                finished += 1
                _log_skipped(fragment)
    except BrokenProcessPool as err:
        pool.shutdown(wait=True, cancel_futures=True)
        raise WriterCrashed(
            f"a shard-writing worker process died (killed or out of memory?) while writing {out}; "
            f"{finished} chunk(s) finished in this run are kept: rerun the same command to resume"
        ) from err
    except BaseException:
        # An error in one chunk or Ctrl-C: stop now rather than wait for the chunks in flight
        # (their half-written shards are cleaned up by the next run).
        _terminate(pool)
        raise
    pool.shutdown(wait=True)
    drain()
    # Worker messages and finished chunks overlap; settle the bar at exactly the total.
    update(advance=sum(sizes.values()) - advanced)
    queue.close()


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API for this
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)


def _log_skipped(fragment: Mapping[str, Any]) -> None:
    for name, reason in fragment["skipped"]:
        log.warning("skipping %s: %s", name, reason)


def _merge(fragments: dict[int, dict[str, Any]], chunk_count: int, split_dirs: dict[str, Path]) -> WriteResult:
    """Concatenate the chunks' shards, counts and skips in chunk order (so workers don't matter)."""
    assert sorted(fragments) == list(range(chunk_count)), "a chunk was neither written nor resumed"
    splits = {name: SplitResult(directory, [], 0, {}) for name, directory in split_dirs.items()}
    skipped: list[tuple[str, str]] = []
    for chunk in range(chunk_count):
        fragment = fragments[chunk]
        for name, result in splits.items():
            # Rebuilt key by key: fresh and resumed chunks must give byte-identical manifests.
            result.shards.extend(
                {"path": s["path"], "samples": s["samples"], "bytes": s["bytes"]} for s in fragment["shards"][name]
            )
            result.items += fragment["items"][name]
            for key, value in fragment["stats"][name].items():
                result.stats[key] = result.stats.get(key, 0.0) + value
        skipped.extend((name, reason) for name, reason in fragment["skipped"])
    return WriteResult(splits=splits, skipped=skipped, items=0, chunks=chunk_count, resumed_chunks=0)
