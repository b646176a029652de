"""Per-file list files (.tsv with a header, or .jsonl) that writers match to their input files:
transcripts, labels and metadata columns (a speaker, an accent, a source) for each sample's json."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from framework.errors import DataError

log = logging.getLogger(__name__)

Entry = tuple  # (key as written, text or None, ((column, value), ...))
NAME_FIELDS = ("path", "file", "filename", "file_name", "id")


class ListFile:
    """A list file (.tsv with a header, or .jsonl) of per-file columns, matched to input files.

    An entry's key is a file path (absolute, or relative to the list file's directory or to an
    input directory) or a bare file name or stem, in one of ``name_fields``. A column of
    ``text_fields`` is the entry's text (a transcript); the other columns are its ``extra``
    fields, which writers put into each sample's json. Bad lines are kept in ``bad``.
    """

    def __init__(self, path: str | os.PathLike[str], what: str, item: str, name_fields: tuple, text_fields: tuple,
                 reserved: tuple) -> None:
        self.what, self.item, self.name_fields, self.text_fields, self.reserved = what, item, name_fields, text_fields, reserved
        self.path = Path(os.path.expanduser(str(path)))
        self.by_path: dict[str, Entry] = {}  # abspath -> (key, text, extra)
        self.by_name: dict[str, Entry] = {}  # as written: relative path, name or stem
        self.by_stem: dict[str, Entry] = {}  # a bare name's stem: "x.mp3" also names x.wav
        self.bad: list[tuple[str, str]] = []
        self.used: set[str] = set()
        if not self.path.is_file():
            raise DataError(f"{what} file not found: {path}")
        suffix = self.path.suffix.lower()
        try:
            lines = self.path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{self.what} file {self.path} is not valid UTF-8 (byte {err.start})") from err
        except OSError as err:
            raise DataError(f"cannot read {self.what} file {self.path}: {err.strerror}") from err
        if suffix == ".tsv":
            self._read_tsv(lines)
        elif suffix in (".jsonl", ".ndjson"):
            self._read_jsonl(lines)
        else:
            raise DataError(f"{self.what} file {self.path}: unsupported format {suffix or '(none)'}; use .tsv or .jsonl")
        if not self.by_path and not self.by_name:
            first = f" (first bad line: {self.bad[0][0]}: {self.bad[0][1]})" if self.bad else ""
            raise DataError(f"{self.what} file {self.path} has no usable entry{first}")

    def _add(self, line_no: int, key: str, text: Any, extra: dict[str, Any] | None = None) -> None:
        where = f"{self.path}:{line_no}"
        extra = extra or {}
        clash = sorted(set(extra) & set(self.reserved))
        if clash:
            raise DataError(f"{where}: column {clash[0]!r} is a field the {self.item} writer sets itself; rename it")
        if text is not None and not isinstance(text, str):
            self.bad.append((where, f"transcript is not text ({type(text).__name__})"))
            return
        if (text is None or not text.strip()) and not extra:
            self.bad.append((where, "empty entry (no text and no other column)"))
            return
        text = text.strip() if text is not None and text.strip() else None
        entry = (key.strip(), text, tuple(sorted(extra.items())))
        key = key.strip()
        if not key:
            self.bad.append((where, f"empty {self.item} file name"))
            return
        if "/" in key or os.path.isabs(key):
            table, index = self.by_path, os.path.abspath(self.path.resolve().parent / os.path.expanduser(key))
            self.by_name.setdefault(Path(key).as_posix(), entry)  # relative to an input root
        else:
            table, index = self.by_name, key
        if index in table:
            self.bad.append((where, f"second entry for {key!r} (the first one is kept)"))
            return
        table[index] = entry
        if table is self.by_name and Path(key).suffix:
            self.by_stem.setdefault(Path(key).stem, entry)

    def _read_tsv(self, lines: list[str]) -> None:
        start, key_col, text_col, names = 0, 0, 1, []
        if lines:
            names = [h.strip() for h in lines[0].split("\t")]
            header = [h.lower() for h in names]
            keys = [i for i, h in enumerate(header) if h in self.name_fields]
            texts = [i for i, h in enumerate(header) if h in self.text_fields]
            if keys:  # e.g. Common Voice: client_id, path, sentence, ..., accents, gender
                start, key_col, text_col = 1, keys[0], texts[0] if texts else None
        for line_no, line in enumerate(lines[start:], start=start + 1):
            if not line.strip():
                continue
            fields = line.split("\t") if start else line.split("\t", 1)
            if len(fields) <= max(key_col, text_col or 0):
                self.bad.append((f"{self.path}:{line_no}", f"expected {self.item}<TAB>transcript"))
                continue
            extra = {name: value for i, (name, value) in enumerate(zip(names, fields))
                     if start and i not in (key_col, text_col) and name}
            self._add(line_no, fields[key_col], fields[text_col] if text_col is not None else None, extra)

    def _read_jsonl(self, lines: list[str]) -> None:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                self.bad.append((f"{self.path}:{line_no}", f"invalid JSON ({err.msg})"))
                continue
            if not isinstance(row, dict):
                self.bad.append((f"{self.path}:{line_no}", "not a JSON object"))
                continue
            key_field = next((k for k in self.name_fields if isinstance(row.get(k), str)), None)
            text_field = next((k for k in self.text_fields if k in row), None)
            if key_field is None:
                self.bad.append((f"{self.path}:{line_no}", f"no {self.item} file name (one of {', '.join(self.name_fields)})"))
                continue
            extra = {k: v for k, v in row.items() if k not in (key_field, text_field)}
            self._add(line_no, row[key_field], row.get(text_field) if text_field else None, extra)

    def lookup(self, path: Path, relative_name: str) -> tuple[str | None, tuple[tuple[str, Any], ...]] | None:
        """(transcript or None, extra fields) of input file ``path`` (``relative_name`` below its input root), or None."""
        for table, key in (
            (self.by_path, str(path)),
            (self.by_name, relative_name),
            (self.by_name, path.name),
            (self.by_name, path.stem),
            (self.by_stem, path.stem),
        ):
            hit = table.get(key)
            if hit is not None:
                self.used.add(hit[0])
                return hit[1], hit[2]
        return None

    def unused(self) -> list[str]:
        keys = [entry[0] for entry in self.by_path.values()] + [entry[0] for entry in self.by_name.values()]
        return sorted({k for k in keys if k not in self.used})


def metadata_columns(path: str | os.PathLike[str], item: str, files: list[tuple[Path, str]], reserved: tuple,
                     name_fields: tuple = NAME_FIELDS) -> dict[int, tuple]:
    """{index in ``files``: (column, value) pairs} of a metadata list file; its bad lines and the
    entries that name no file are warned about (a file it does not name gets ``()``)."""
    table = ListFile(path, "metadata", item, name_fields, (), reserved)
    for where, reason in table.bad:
        log.warning("metadata %s: %s", where, reason)
    columns = {i: (table.lookup(file, name) or (None, ()))[1] for i, (file, name) in enumerate(files)}
    unused = table.unused()
    if unused:
        log.warning("%d metadata entr(ies) of %s match no %s file (e.g. %s)", len(unused), table.path, item,
                    ", ".join(unused[:3]))
    return columns
