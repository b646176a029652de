"""Turn user-given inputs (files, directories, globs) into a sorted list of files.

Shared by every shard writer and by tokenizer training, so all of them accept the
same input syntax and report bad inputs the same way.
"""
from __future__ import annotations

import fnmatch
import glob
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from framework.errors import DataError

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


def _is_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _glob_root(pattern: str) -> Path:
    """The literal directory prefix of a glob, e.g. ``data/**/*.txt`` -> ``data``."""
    parts = Path(pattern).parts
    literal: list[str] = []
    for part in parts:
        if _is_glob(part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def _matches(name: str, include: list[str] | None) -> bool:
    return include is None or any(fnmatch.fnmatch(name, pattern) for pattern in include)


def _walk(directory: Path, root: Path, include: list[str] | None) -> Iterator[tuple[Path, str]]:
    """Yield (file, name relative to root) under directory, following symlinks without looping."""

    def on_error(err: OSError) -> None:
        raise DataError(f"cannot list directory {err.filename}: {err.strerror}")

    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, onerror=on_error, followlinks=True):
        seen.add(os.path.realpath(dirpath))
        # Prune in place: sorted for determinism, symlink cycles walked once only, and hidden
        # folders and files (.git, a writer's .writer-state) left out, as git and grep tools do.
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in seen
        )
        for name in sorted(filenames):
            if name.startswith(".") or not _matches(name, include):
                continue
            path = Path(dirpath, name)
            if not path.is_file():
                # Broken symlinks, sockets, fifos: reading them would fail or block.
                log.warning("skipping %s: not a regular file", path)
                continue
            yield path, path.relative_to(root).as_posix()


def expand_inputs_with_names(inputs: list[str], include: list[str] | None = None) -> list[tuple[Path, str]]:
    """Like :func:`expand_inputs`, also giving each file's path relative to the input it came from.

    The relative name is location-independent (a directory input gives paths inside it, a
    file input its own name, a glob the path below its literal prefix), so it can seed
    stable per-file decisions such as the train/val split.
    """
    if not inputs:
        raise DataError("no inputs given")
    found: dict[Path, str] = {}
    for raw in inputs:
        text = os.path.expanduser(str(raw))
        if os.path.lexists(text) or not _is_glob(text):
            path = Path(text)
            if not path.exists():
                raise DataError(f"input not found: {raw}")
            if path.is_dir():
                entries = list(_walk(path, path, include))
            elif path.is_file():
                # An explicitly named file is always kept: the include filter is for walks.
                entries = [(path, path.name)]
            else:
                raise DataError(f"input is neither a regular file nor a directory: {raw}")
        else:
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"glob matched no files: {raw}")
            root = _glob_root(text)
            entries = []
            for match in matches:
                path = Path(match)
                if path.is_dir():
                    entries.extend(_walk(path, root, include))
                elif path.is_file() and _matches(path.name, include):
                    entries.append((path, path.relative_to(root).as_posix()))
        for path, name in entries:
            # First input wins for a file reachable from two inputs; no symlink resolution,
            # so paths stay as the user named them.
            found.setdefault(Path(os.path.abspath(path)), name)
    if not found:
        where = ", ".join(str(i) for i in inputs)
        suffix = f" matching {include}" if include else ""
        raise DataError(f"no input files found in {where}{suffix}")
    return sorted(found.items())


def expand_inputs(inputs: list[str], include: list[str] | None = None) -> list[Path]:
    """Expand files, directories (recursive) and globs (``**`` allowed) into sorted, unique files.

    ``include`` holds fnmatch patterns on the file name (e.g. ``["*.py", "*.txt"]``) applied to
    files found by walking directories or globbing; explicitly named files are always kept.
    Raises DataError naming a missing input or a glob that matches nothing, and when no files
    are found at all. Paths are absolute.
    """
    return [path for path, _ in expand_inputs_with_names(inputs, include)]


def read_text_file(path: Path) -> tuple[str, None] | tuple[None, str]:
    """Read a file as UTF-8: ``(text, None)``, or ``(None, reason)`` when it must be skipped.

    Empty and non-UTF-8 files are reasons to skip (the caller reports them); a file that
    cannot be read at all is a DataError.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from err
    if not data:
        return None, "empty file"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 (bad byte at offset {err.start})"


@contextmanager
def file_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A transient rich progress bar on stderr (hidden when stderr is not a terminal).

    Yields ``update(advance=1, description=None)``.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)

        def update(advance: float = 1, description: str | None = None) -> None:
            progress.update(task, advance=advance, description=description)

        yield update
