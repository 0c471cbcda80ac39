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
from collections import defaultdict
from typing import Dict, Iterable, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import WriteToParquet

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


class WriteParquetShards(beam.PTransform):
    """Rows (dicts) to ``<directory>/part-SSSSS-of-NNNNN.parquet``; outputs the written file names."""

    def __init__(self, directory: str, schema: pa.Schema, num_shards: int = 1):
        super().__init__()
        self._directory, self._schema, self._num_shards = directory, schema, num_shards

    def expand(self, rows):
        return rows | WriteToParquet(
            file_path_prefix=join(self._directory, "part"), schema=self._schema, codec="zstd",
            file_name_suffix=".parquet", num_shards=self._num_shards, shard_name_template=SHARD_TEMPLATE)


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
