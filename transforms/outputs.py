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
from typing import Dict, Iterable, Sequence, Tuple

import apache_beam as beam
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


class _WriteShard(beam.DoFn):
    """Writes one shard's rows, sorted by key, as ``<prefix>-SSSSS-of-NNNNN.parquet``; yields the file name."""

    def __init__(self, prefix: str, schema: pa.Schema, num_shards: int, key_columns: Sequence[str]):
        super().__init__()
        self._prefix, self._schema, self._num_shards = prefix, schema, num_shards
        self._key_columns = tuple(key_columns)

    def process(self, keyed):
        import pyarrow.parquet as pq

        shard, grouped = keyed
        rows = sorted(grouped["rows"], key=lambda row: _row_sort_key(row, self._key_columns))
        path = f"{self._prefix}-{shard:05d}-of-{self._num_shards:05d}.parquet"
        table = pa.Table.from_pylist(rows, schema=self._schema)
        with FileSystems.create(path) as handle:
            pq.write_table(table, handle, compression="zstd")
        yield path


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
                | "WriteShards" >> beam.ParDo(_WriteShard(join(self._directory, "part"), self._schema, n, columns)))


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
