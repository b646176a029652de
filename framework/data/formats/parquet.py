"""Parquet files as shards: units from the footer, read a row group (or a stretch of one) at a time.

Only the columns a run needs (and the metadata columns, ``data.extra_keys``) are read, with
``ParquetFile.read_row_group``; a row group larger than ``data.max_rows_per_read`` is read in
stretches of that many rows with ``iter_batches`` (no pre-buffering), so a worker holds one
stretch at a time whatever the file and group sizes.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

from framework.data.formats import RowFields, RowFormatError, Unit, UnitPositions, column_samples, file_stem
from framework.errors import DataError


def _open(url: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # buffer_size: column chunks are read in pieces as pages decode, not whole (a huge group)
        return pq.ParquetFile(url.removeprefix("file://"), pre_buffer=False, buffer_size=1 << 20)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RowFormatError(f"not a readable Parquet file (its footer: {exc})") from None


def _columns(names: List[str], fields: RowFields) -> List[str]:
    wanted = set(fields.needed) | {fields.id_key, fields.label_key}
    return [n for n in names if n in wanted or fields.extra is None or n in fields.extra]


def check_columns(url: str, names: List[str], fields: RowFields) -> None:
    missing = [c for c in fields.needed if c not in names]
    if missing:
        raise DataError(f"{url}: no column {missing[0]!r}; the file has: {', '.join(names)} (choose with data.text_key, "
                        "data.image_key, data.audio_key or data.caption_key)")


def parquet_units(url: str, fields: RowFields) -> List[Unit]:
    """Each row group, cut into stretches of at most ``fields.max_rows_per_read`` rows."""
    parquet = _open(url)
    check_columns(url, parquet.schema_arrow.names, fields)
    units, first, step = [], 0, max(1, fields.max_rows_per_read)
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        units.extend(Unit(first + s, first + min(rows, s + step), group) for s in range(0, rows, step))
        first += rows
    return units


class ParquetUnitReader(UnitPositions):
    """Rows [start, stop) of row group ``group``; ``samples(offset)`` from row start + offset."""

    def __init__(self, url: str, fields: RowFields, start: int, stop: int, group: int) -> None:
        self.url, self.fields, self.start, self.stop, self.group = url, fields, start, stop, group
        self._samples: Optional[List[Tuple[str, Any]]] = None  # the unit's rows as samples, once read
        self._stem = file_stem(url)

    def _load(self) -> Dict[str, list]:
        import pyarrow as pa

        parquet = _open(self.url)
        try:
            meta = parquet.metadata
            group_start = sum(meta.row_group(g).num_rows for g in range(self.group))
            columns = _columns(parquet.schema_arrow.names, self.fields)
            group_rows = meta.row_group(self.group).num_rows
            if self.stop - self.start >= group_rows:
                table = parquet.read_row_group(self.group, columns=columns)
            else:  # a stretch of a large group: stream it in batches, keep only the stretch
                step, parts, seen = self.fields.max_rows_per_read, [], group_start
                for batch in parquet.iter_batches(batch_size=step, row_groups=[self.group], columns=columns):
                    end = seen + batch.num_rows
                    if end > self.start and seen < self.stop:
                        parts.append(batch.slice(max(0, self.start - seen), min(end, self.stop) - max(seen, self.start)))
                    seen = end
                    if seen >= self.stop:
                        break
                table = pa.Table.from_batches(parts) if parts else None
            if table is None or table.num_rows != self.stop - self.start:
                raise RowFormatError(f"row group {self.group} gives {0 if table is None else table.num_rows} rows where its "
                                     f"footer promised {self.stop - self.start} from row {self.start}")
            return {name: table.column(name).to_pylist() for name in table.column_names}
        except (pa.ArrowException, OSError) as exc:
            raise RowFormatError(f"row group {self.group}: {exc}") from None
        finally:
            parquet.close()

    def samples(self, offset: int = 0) -> Iterator[Tuple[str, Any, int]]:
        if self._samples is None:
            self._samples = column_samples(self._load(), self.fields, self._stem, self.start)
        for index in range(offset, len(self._samples)):
            key, sample = self._samples[index]
            yield key, sample, index + 1

    def close(self) -> None:
        self._samples = None
