"""Writing a job's outputs so that readers only ever see complete ones, and reruns replace rather than add.

Conventions every job follows for each output partition ``<dir>``:
- the driver empties ``<dir>`` before the job starts (``clear_output_dir``), so a rerun leaves no stale shards;
- data shards are ``<dir>/part-SSSSS-of-NNNNN.<ext>`` with a fixed shard count;
- the run summary (JSON) and then ``_SUCCESS`` are written last, by steps that take the written files as side
  inputs and therefore run only after every shard is finalized. Readers wait for ``_SUCCESS``.

Also the run summary itself: every input row is counted on the way in and on the way out: written (out),
dead-lettered (dead, per reason) or dropped by a documented bound (dropped, per reason; e.g. the 1,200-watch
history cap). The summary states whether in = out + dead + dropped held.
"""
from __future__ import annotations

import json
import re
import zlib
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

SUCCESS_MARKER = "_SUCCESS"
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"


def join(*parts: str) -> str:
    return FileSystems.join(*parts) if parts else ""


_PARTITION_DIR_RE = re.compile(r"/date=\d{4}-\d{2}-\d{2}/?$")


def _delete_all_under(directory: str) -> int:
    matches = FileSystems.match([join(directory, "**")])[0].metadata_list
    paths = [m.path for m in matches]
    if paths:
        FileSystems.delete(paths)
    return len(paths)


def clear_output_dir(directory: str) -> int:
    """Deletes everything under one date partition of a job's output (local or gs://); returns the files removed.

    A recursive delete is the most dangerous thing a job does, so it is confined: only a ``.../date=YYYY-MM-DD``
    directory, reached without ``..`` segments, can be cleared. Anything else is refused.
    """
    if ".." in directory.replace("\\", "/").split("/") or not _PARTITION_DIR_RE.search(directory):
        raise ValueError(f"refusing to clear {directory!r}: only a job's date=YYYY-MM-DD output partition is cleared")
    return _delete_all_under(directory)


def replace_artifact_dir(directory: str, marker_file: str) -> int:
    """Empties an artifact directory (a tokenizer, a transform) before it is rewritten, if it is ours to replace.

    Only an empty directory or one holding ``marker_file`` (so, an earlier version of the same artifact) is cleared:
    a mistyped ``--query_tokenizer=/home/me`` must fail, not delete someone's files.
    """
    if ".." in directory.replace("\\", "/").split("/"):
        raise ValueError(f"refusing to clear {directory!r}: no '..' segments in artifact paths")
    existing = FileSystems.match([join(directory, "**")])[0].metadata_list
    if existing and not FileSystems.exists(join(directory, marker_file)):
        raise FileExistsError(f"{directory} holds files but no {marker_file}: not an artifact this job replaces")
    return _delete_all_under(directory)


def success_marker_exists(directory: str) -> bool:
    return FileSystems.exists(join(directory, SUCCESS_MARKER))


def write_text_file(path: str, text: str) -> str:
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))
    return path


def write_json_atomically(local_path: str, value) -> None:
    """A local JSON file replaced in one rename, so a reader never sees half of it (used for dataset manifests)."""
    import os

    with open(local_path + ".tmp", "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(local_path + ".tmp", local_path)


def read_json_file(path: str):
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def shard_of(key: str, num_shards: int) -> int:
    """A row's shard: a stable hash of its key (not Python's salted ``hash``), so every run agrees."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % num_shards


def _row_sort_key(row: Dict, key_columns: Sequence[str]) -> str:
    if key_columns:
        return "\x1f".join(str(row.get(c)) for c in key_columns)
    return json.dumps(row, sort_keys=True, default=str)


def row_sort_keys(rows: pa.Table, key_columns: Sequence[str] = ()) -> List[str]:
    """``WriteParquetShards``' sort key (and shard key) of each row of an Arrow table."""
    if not key_columns:
        return row_json_keys(rows).to_pylist()
    return [_row_sort_key(row, key_columns) for row in rows.to_pylist()]


# Whole-row sort keys, built with Arrow kernels: ``json.dumps(row, sort_keys=True, default=str)`` of every row of an
# Arrow table, the same text byte for byte. Each column is rendered as its JSON text where Arrow can do so exactly
# (plain ASCII strings, booleans, integers, finite floats that Python writes without an exponent, UTC or naive
# timestamps of years 1970-9999); a row with any other value (non-ASCII or control characters, lists, exponent
# floats, ...) gets its key from ``json.dumps`` itself. So the fast path only ever decides which rows need Python.
# json.dumps (ensure_ascii) writes printable ASCII (" " to "~": ``pc.ascii_is_printable``, true for "") as-is, except
# " and backslash.
_MAX_FAST_MICROS = 253402300800 * 1_000_000  # 10000-01-01: four-digit years, as str(datetime) writes them


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers as zero-padded ASCII digits, one row of ``width`` bytes each."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def _datetime_text(micros: np.ndarray, suffix: str) -> pa.Array:
    """``'"' + str(datetime) + '"'`` for microseconds since the epoch in [0, _MAX_FAST_MICROS): "YYYY-MM-DD
    HH:MM:SS", then ".ffffff" only where the microseconds are not 0 (as ``datetime.__str__``), then ``suffix``."""
    n = len(micros)
    moment = micros.astype("datetime64[us]")
    days = moment.astype("datetime64[D]")
    months = moment.astype("datetime64[M]")
    year = moment.astype("datetime64[Y]").astype(np.int64) + 1970
    month = months.astype(np.int64) % 12 + 1
    day = (days - months.astype("datetime64[D]")).astype(np.int64) + 1
    second_of_day = (micros // 1_000_000) % 86400
    fraction = micros % 1_000_000

    def const(text):
        return np.broadcast_to(np.frombuffer(text.encode("ascii"), np.uint8), (n, len(text)))

    tail = const(suffix + '"')
    cells = np.concatenate([const('"'), _digits(year, 4), const("-"), _digits(month, 2), const("-"), _digits(day, 2),
                            const(" "), _digits(second_of_day // 3600, 2), const(":"),
                            _digits(second_of_day // 60 % 60, 2), const(":"), _digits(second_of_day % 60, 2),
                            const("."), _digits(fraction, 6), tail], axis=1)
    keep = np.ones(cells.shape, bool)
    keep[:, 20:27] = (fraction != 0)[:, None]  # '"' + 19 chars, then "." + 6 digits
    lengths = keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(cells[keep])))


def _json_text(column: pa.Array) -> Tuple[pa.Array, np.ndarray]:
    """A column's values as JSON text (nulls as ``null``) and a mask of the rows where that text is exact."""
    import pyarrow.compute as pc

    n = len(column)
    typ = column.type
    if pa.types.is_null(typ):
        return pa.array(["null"] * n, pa.string()), np.ones(n, bool)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        column = column.cast(pa.string())
        ok = np.asarray(pc.fill_null(pc.ascii_is_printable(column), False).to_numpy(zero_copy_only=False), bool)
        escaped = column
        data = column.buffers()[2]
        if data is not None and data.size:  # escape only where the (whole) buffer has a " or a backslash
            raw = np.frombuffer(data, np.uint8)
            if ((raw == ord('"')) | (raw == ord("\\"))).any():
                escaped = pc.replace_substring(pc.replace_substring(column, "\\", "\\\\"), '"', '\\"')
        text = pc.binary_join_element_wise('"', escaped, '"', "")
        return pc.fill_null(text, "null"), ok | ~valid
    if pa.types.is_boolean(typ):
        return pc.fill_null(pc.if_else(column, "true", "false"), "null"), np.ones(n, bool)
    if pa.types.is_integer(typ):
        return pc.fill_null(column.cast(pa.string()), "null"), np.ones(n, bool)
    if typ in (pa.float32(), pa.float64()):
        values = column.cast(pa.float64())
        number = values.to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            magnitude = np.abs(number)
            # Python's repr switches to an exponent below 1e-4 and from 1e16; Arrow sooner, so "e" is checked too.
            ok = (magnitude == 0) | ((magnitude >= 1e-4) & (magnitude < 1e16))
        text = values.cast(pa.string())
        ok &= ~np.asarray(pc.fill_null(pc.match_substring(text, "e"), False).to_numpy(zero_copy_only=False), bool)
        # Arrow writes integral floats without ".0" ("530" for 530.0); Python's repr keeps it.
        integral = pc.invert(pc.match_substring(text, "."))
        text = pc.if_else(integral, pc.binary_join_element_wise(text, ".0", ""), text)
        return pc.fill_null(text, "null"), ok | ~valid
    if pa.types.is_timestamp(typ) and typ.tz in (None, "UTC", "+00:00", "Etc/UTC"):
        if typ.unit != "us":
            return pa.array(["null"] * n, pa.string()), ~valid  # leave other units to Python
        raw = pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        ok = (raw >= 0) & (raw < _MAX_FAST_MICROS)
        raw = np.where(ok, raw, 0)
        text = _datetime_text(raw, "" if typ.tz is None else "+00:00")
        return pc.if_else(pa.array(valid), text, "null"), ok | ~valid
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        # A list as json.dumps writes it: "[" + items joined by ", " + "]", each item as above.
        items, items_ok = _json_text(column.values)  # all the child values; the offsets say which are whose
        item_lists = type(column).from_arrays(column.offsets, items)
        offsets = column.offsets.to_numpy(zero_copy_only=False)
        bad_before = np.concatenate([[0], np.cumsum(~items_ok)])
        ok = bad_before[offsets[1:]] == bad_before[offsets[:-1]]
        text = pc.binary_join_element_wise("[", pc.binary_join(item_lists, ", "), "]", "")
        return pc.if_else(pa.array(valid), text, "null"), ok | ~valid
    return pa.array(["null"] * n, pa.string()), np.zeros(n, bool)


_FEW_ROWS = 64  # below this many rows row_json_keys calls json.dumps itself (measured crossover: about 100 rows)


def row_json_keys(rows: pa.Table) -> pa.Array:
    """``json.dumps(row, sort_keys=True, default=str)`` of each row of ``rows`` (``WriteParquetShards``' key for
    rows without key columns), as an Arrow string array."""
    import pyarrow.compute as pc

    n = rows.num_rows
    if n == 0:
        return pa.array([], pa.string())
    if n < _FEW_ROWS:  # the kernels' fixed cost (a few ms a call) outweighs json.dumps on a few rows
        return pa.array([json.dumps(row, sort_keys=True, default=str) for row in rows.to_pylist()], pa.string())
    names = sorted(rows.column_names)
    parts, ok = [], np.ones(n, bool)
    for i, name in enumerate(names):
        column = rows.column(name)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        text, exact = _json_text(column)
        ok &= exact
        parts += [("{" if i == 0 else ", ") + json.dumps(name) + ": ", text]
    keys = pc.binary_join_element_wise(*parts, "}", "") if names else pa.array(["{}"] * n, pa.string())
    if not ok.all():
        slow = [json.dumps(row, sort_keys=True, default=str) for row in rows.filter(pa.array(~ok)).to_pylist()]
        keys = pc.replace_with_mask(keys, pa.array(~ok), pa.array(slow, pa.string()))
    return keys


def shards_of(keys: pa.Array, num_shards: int) -> np.ndarray:
    """``shard_of`` of each key of an Arrow string array (keys that are valid UTF-8, as Arrow strings are)."""
    keys = keys.cast(pa.string())
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    if keys.null_count:
        raise ValueError("sort keys must not be null")
    offsets = np.frombuffer(keys.buffers()[1], np.int32)[keys.offset:keys.offset + len(keys) + 1].tolist()
    data = memoryview(keys.buffers()[2])
    crc32 = zlib.crc32
    return np.array([crc32(data[a:b]) for a, b in zip(offsets[:-1], offsets[1:])], np.int64) % num_shards


def write_parquet_file(path: str, rows: pa.Table, row_group_size: int = None) -> str:
    """``rows`` as one parquet file: one row group, or row groups of ``row_group_size`` rows."""
    import pyarrow.parquet as pq

    with FileSystems.create(path) as handle:
        pq.write_table(rows, handle, compression="zstd", row_group_size=row_group_size)
    return path


class ParquetFileWriter:
    """A parquet file written table by table, in row groups of exactly ``row_group_size`` rows (the last one
    shorter): the bytes ``write_parquet_file(path, <the tables concatenated>, row_group_size)`` writes
    (``use_dictionary`` False: plain-encoded pages, as ``pq.write_table(..., use_dictionary=False)``), with at most
    about one row group of rows held here. Use as a context manager; a file given no rows holds the empty table."""

    def __init__(self, path: str, schema: pa.Schema, row_group_size: int, use_dictionary: bool = True):
        self._path, self._schema, self._size, self._dictionary = path, schema, row_group_size, use_dictionary
        self._handle = self._writer = None
        self._pending, self._written = schema.empty_table(), 0

    def __enter__(self) -> "ParquetFileWriter":
        import pyarrow.parquet as pq

        self._handle = FileSystems.create(self._path)
        self._writer = pq.ParquetWriter(self._handle, self._schema, compression="zstd",
                                       use_dictionary=self._dictionary)
        return self

    def write(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self._pending = pa.concat_tables([self._pending, rows]) if self._pending.num_rows else rows
        while self._pending.num_rows >= self._size:
            self._write(self._pending.slice(0, self._size))
            self._pending = self._pending.slice(self._size)

    def _write(self, rows: pa.Table) -> None:
        self._writer.write_table(rows.combine_chunks(), row_group_size=self._size)
        self._written += rows.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and (self._pending.num_rows or not self._written):
                self._write(self._pending)  # pq.write_table writes one empty row group for an empty table
            self._writer.close()
        finally:
            self._handle.close()


def shard_path(directory: str, shard: int, num_shards: int, ext: str = ".parquet") -> str:
    return f"{join(directory, 'part')}-{shard:05d}-of-{num_shards:05d}{ext}"


class _WriteShard(beam.DoFn):
    """Writes one shard's rows, sorted by key, as ``<directory>/part-SSSSS-of-NNNNN.parquet``; yields the file name."""

    def __init__(self, directory: str, schema: pa.Schema, num_shards: int, key_columns: Sequence[str]):
        super().__init__()
        self._directory, self._schema, self._num_shards = directory, schema, num_shards
        self._key_columns = tuple(key_columns)

    def process(self, keyed):
        shard, grouped = keyed
        rows = sorted(grouped["rows"], key=lambda row: _row_sort_key(row, self._key_columns))
        yield write_parquet_file(shard_path(self._directory, shard, self._num_shards),
                                 pa.Table.from_pylist(rows, schema=self._schema))


class WriteParquetShards(beam.PTransform):
    """Rows (dicts) to ``<directory>/part-SSSSS-of-NNNNN.parquet``; outputs the written file names.

    Rows go to a shard by a stable hash of ``key_columns`` (default: the whole row) and are sorted within it, so
    shards are evenly filled, every shard file exists (empty ones too), and a rerun on the same input writes
    byte-identical files. (Beam's ``WriteToParquet`` converts rows to large Arrow tables before it shards them, so
    all rows of a small job landed in one shard, in an order that depended on bundling.)
    """

    def __init__(self, directory: str, schema: pa.Schema, num_shards: int = 1, key_columns: Sequence[str] = ()):
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self._directory, self._schema, self._num_shards = directory, schema, num_shards
        self._key_columns = tuple(key_columns)

    def expand(self, rows):
        n, columns = self._num_shards, self._key_columns
        keyed = rows | "KeyByShard" >> beam.Map(lambda row: (shard_of(_row_sort_key(row, columns), n), row))
        every_shard = rows.pipeline | "EveryShard" >> beam.Create([(i, None) for i in range(n)])
        return ({"rows": keyed, "shard": every_shard}
                | "GroupShards" >> beam.CoGroupByKey()
                | "WriteShards" >> beam.ParDo(_WriteShard(self._directory, self._schema, n, columns)))


class _WriteTFRecordShard(beam.DoFn):
    """Writes one shard's records, sorted, as a gzip ``<prefix>-SSSSS-of-NNNNN<suffix>``; yields the file name."""

    def __init__(self, prefix: str, suffix: str, num_shards: int):
        super().__init__()
        self._prefix, self._suffix, self._num_shards = prefix, suffix, num_shards

    def process(self, keyed):
        import tensorflow as tf

        shard, grouped = keyed
        path = f"{self._prefix}-{shard:05d}-of-{self._num_shards:05d}{self._suffix}"
        with tf.io.TFRecordWriter(path, options=tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
            for record in sorted(grouped["records"]):
                writer.write(record)
        yield path


class WriteTFRecordShards(beam.PTransform):
    """Serialized records to gzip TFRecord files ``<directory>/part-SSSSS-of-NNNNN.tfrecord.gz``; outputs file names.

    Like ``WriteParquetShards``: a record's shard is a stable hash of its bytes and each shard is sorted, so every
    shard exists and an identical rerun (or a backfill of the same day) writes byte-identical files, and a trainer
    reading them in file order sees the same order every time. (Beam's ``WriteToTFRecord`` fills shards in bundle
    order, which changed from run to run.)
    """

    def __init__(self, directory: str, num_shards: int, file_name_suffix: str = ".tfrecord.gz"):
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self._directory, self._num_shards, self._suffix = directory, num_shards, file_name_suffix

    def expand(self, records):
        n = self._num_shards
        keyed = records | "KeyByShard" >> beam.Map(lambda record: (zlib.crc32(record) % n, record))
        every_shard = records.pipeline | "EveryShard" >> beam.Create([(i, None) for i in range(n)])
        return ({"records": keyed, "shard": every_shard}
                | "GroupShards" >> beam.CoGroupByKey()
                | "WriteShards" >> beam.ParDo(_WriteTFRecordShard(join(self._directory, "part"), self._suffix, n)))


class _WriteAfter(beam.DoFn):
    """Writes one small file from the element, once the side inputs (earlier writes) are complete."""

    def process(self, element, *completed_writes, path, render):
        yield write_text_file(path, render(element))


def write_after(pcoll_with_one_element, path: str, render, after: Sequence[beam.PCollection], label: str):
    """Writes ``render(element)`` to ``path`` only after every PCollection in ``after`` has been computed."""
    side_inputs = [beam.pvalue.AsList(p) for p in after]
    return pcoll_with_one_element | label >> beam.ParDo(_WriteAfter(), *side_inputs, path=path, render=render)


def _render_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


class WriteSummaryAndSuccess(beam.PTransform):
    """Writes ``summary`` (a one-element PCollection of a dict) as JSON, then the ``_SUCCESS`` marker(s).

    ``after`` lists the data writes the summary must wait for; markers are written after the summary.
    """

    def __init__(self, summary_path: str, success_dirs: Iterable[str], after: Sequence[beam.PCollection]):
        super().__init__()
        self._summary_path, self._success_dirs, self._after = summary_path, list(success_dirs), list(after)

    def expand(self, summary):
        written = write_after(summary, self._summary_path, _render_json, self._after, "WriteSummary")
        markers = [write_after(written, join(d, SUCCESS_MARKER), lambda _: "", [], f"WriteSuccess{i}")
                   for i, d in enumerate(self._success_dirs)]
        return markers


# ---------------------------------------------------------------------------------------------------------------
# Row accounting.
# ---------------------------------------------------------------------------------------------------------------
IN, OUT, DEAD, DROPPED = "in", "out", "dead", "dropped"
STAT = "stat"  # a figure reported beside the accounting (e.g. users written), not part of any balance
CountKey = Tuple[str, str, str, str]  # (table, partition date, IN|OUT|DEAD|DROPPED|STAT, reason or stat name)


def summarize_counts(counts: Iterable[Tuple[CountKey, int]]) -> Dict:
    """Per table and date: rows in, out, dead and dropped (per reason), and whether in = out + dead + dropped.

    ``dropped`` appears only where some job drops rows by design; plus totals over all tables and dates.
    """
    tables: Dict[str, Dict[str, Dict]] = defaultdict(dict)
    stats: Dict[str, int] = {}

    def new_entry():
        return {"rows_in": 0, "rows_out": 0, "rows_dead": 0, "dead_by_reason": {}}

    for (table, date, kind, reason), n in counts:
        if kind == STAT:
            stats[f"{table}.{reason}"] = stats.get(f"{table}.{reason}", 0) + n
            continue
        entry = tables[table].setdefault(date, new_entry())
        if kind == IN:
            entry["rows_in"] += n
        elif kind == OUT:
            entry["rows_out"] += n
        elif kind in (DEAD, DROPPED):
            entry[f"rows_{kind}"] = entry.get(f"rows_{kind}", 0) + n
            by_reason = entry.setdefault(f"{kind}_by_reason", {})
            by_reason[reason] = by_reason.get(reason, 0) + n
        else:
            raise ValueError(f"unknown count kind {kind!r}")
    totals = new_entry()
    for per_date in tables.values():
        for entry in per_date.values():
            entry["balanced"] = entry["rows_in"] == (entry["rows_out"] + entry["rows_dead"]
                                                     + entry.get("rows_dropped", 0))
            for key, value in entry.items():
                if key.endswith("_by_reason"):
                    merged = totals.setdefault(key, {})
                    for reason, n in value.items():
                        merged[reason] = merged.get(reason, 0) + n
                elif key.startswith("rows_"):
                    totals[key] = totals.get(key, 0) + value
    for key in [k for k in totals if k.endswith("_by_reason")]:
        totals[key] = dict(sorted(totals[key].items()))
    totals["balanced"] = totals["rows_in"] == (totals["rows_out"] + totals["rows_dead"]
                                               + totals.get("rows_dropped", 0))
    return {"tables": {t: dict(sorted(d.items())) for t, d in sorted(tables.items())}, "totals": totals,
            "stats": dict(sorted(stats.items()))}


class CountRows(beam.PTransform):
    """Each element becomes a (count key, 1) pair; combine the streams with ``SummarizeCounts``.

    For DEAD the element is a dead-letter row and its ``reason`` goes into the key; for STAT, ``stat`` names it.
    """

    def __init__(self, table: str, date: str, kind: str, stat: str = ""):
        super().__init__()
        self._key_fn = (lambda row, k=(table, date, kind): (k + (row["reason"],), 1)) if kind == DEAD else (
            lambda _, k=(table, date, kind, stat): (k, 1))

    def expand(self, pcoll):
        return pcoll | beam.Map(self._key_fn)


class SummarizeCounts(beam.PTransform):
    """(count key, n) pairs, flattened from several sources, to one summary dict (``summarize_counts``) + ``extra``."""

    def __init__(self, extra: Dict):
        super().__init__()
        self._extra = extra

    def expand(self, count_keys: beam.PCollection):
        return (count_keys
                | "SumPerKey" >> beam.CombinePerKey(sum)
                | "AllCounts" >> beam.combiners.ToList()
                | "Summarize" >> beam.Map(lambda counts, extra: {**extra, **summarize_counts(counts)},
                                          extra=self._extra))


class _WriteDaySummary(beam.DoFn):
    """One date's summary JSON, then its ``_SUCCESS`` markers, once the side input (every data write) is complete."""

    def __init__(self, summary_paths: Dict[str, str], success_dirs: Dict[str, Sequence[str]],
                 extra: Dict[str, Dict]):
        super().__init__()
        self._summary_paths, self._success_dirs, self._extra = summary_paths, success_dirs, extra

    def process(self, keyed, completed_writes):
        date, grouped = keyed
        summary = {**self._extra[date], **summarize_counts(grouped["counts"])}
        yield write_text_file(self._summary_paths[date], _render_json(summary))
        for directory in self._success_dirs[date]:
            write_text_file(join(directory, SUCCESS_MARKER), "")


class WriteDailySummaries(beam.PTransform):
    """Count keys ``((table, date, kind, reason), n)`` of many dates to one summary per date, each written like
    ``SummarizeCounts`` + ``WriteSummaryAndSuccess`` would (``extra[date]`` merged in), after every PCollection of
    ``after``; then each date's ``success_dirs``. A date without any count still gets its (empty) summary."""

    def __init__(self, summary_paths: Dict[str, str], success_dirs: Dict[str, Sequence[str]],
                 extra: Dict[str, Dict], after: beam.PCollection):
        super().__init__()
        self._summary_paths, self._success_dirs, self._extra = summary_paths, success_dirs, extra
        self._after = after

    def expand(self, count_keys):
        by_date = (count_keys
                   | "SumPerKey" >> beam.CombinePerKey(sum)
                   | "ByDate" >> beam.Map(lambda kv: (kv[0][1], kv)))
        every_date = count_keys.pipeline | "EveryDate" >> beam.Create([(d, None) for d in sorted(self._summary_paths)])
        return ({"counts": by_date, "date": every_date}
                | "GroupByDate" >> beam.CoGroupByKey()
                | "WriteSummaries" >> beam.ParDo(_WriteDaySummary(self._summary_paths, self._success_dirs,
                                                                  self._extra), beam.pvalue.AsList(self._after)))
