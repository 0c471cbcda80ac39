"""The history fold as plain functions on Arrow tables and NumPy arrays (no Beam; ``transforms.histories`` runs them).

Events travel as *flat records*: one row per watch (``WATCH_RECORD_SCHEMA``) or search (``SEARCH_RECORD_SCHEMA``),
the fields of a snapshot's nested record plus ``user_id``. A user's records are selected with one sort per batch of
users, not one Python object per event: the per-event work is Arrow kernels and NumPy index arithmetic.

Recency is the total order of the snapshot contract: watches by (event_ts_us, scenario, video_id), searches by
(event_ts_us, query), never by arrival order. Arrow compares strings byte-wise, which for UTF-8 is the order of code
points, i.e. Python's ``str`` order, so the tie-breaks are those of the row-at-a-time implementation this replaced.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import schemas

WATCH_KEY = ("event_ts_us", "scenario", "video_id")
SEARCH_KEY = ("event_ts_us", "query")
USER_ID = schemas.HISTORIES_SCHEMA.field("user_id")
WATCH_RECORD_SCHEMA = pa.schema([USER_ID, *schemas.HISTORY_WATCH_TYPE])
SEARCH_RECORD_SCHEMA = pa.schema([USER_ID, *schemas.HISTORY_SEARCH_TYPE])


# ---------------------------------------------------------------------------------------------------------------
# Records from validated events and from snapshots.
# ---------------------------------------------------------------------------------------------------------------
def _epoch_us(timestamps: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(pc.cast(timestamps, pa.timestamp("us", tz="UTC")), pa.int64())


def sid_rows(video_ids, video_sids: pa.Table) -> pa.Array:
    """For each video id, its row in ``video_sids`` (video_id, sid), or null where the video has no SID."""
    return pc.index_in(video_ids, value_set=video_sids["video_id"])


def with_sids(records: pa.Table, video_sids: pa.Table, schema: pa.Schema) -> Tuple[pa.Table, np.ndarray]:
    """``records`` (with a video_id column) that have a SID, with ``sid`` set from ``video_sids`` and cast to
    ``schema``; and the indices of the rows without one (to dead-letter)."""
    found = sid_rows(records["video_id"], video_sids)
    has_sid = pc.is_valid(found)
    kept = records.filter(has_sid)
    columns = {name: kept[name] for name in schema.names if name != "sid"}
    columns["sid"] = video_sids["sid"].take(found.filter(has_sid))
    missing = np.flatnonzero(~has_sid.to_numpy(zero_copy_only=False))
    return pa.table(columns).select(schema.names).cast(schema), missing


def watch_records(events: pa.Table, video_sids: pa.Table) -> Tuple[pa.Table, np.ndarray]:
    """Validated watch_events rows -> watch records with their video's SID, and the row indices without a SID."""
    events = events.append_column("event_ts_us", _epoch_us(events["event_ts"]))
    return with_sids(events, video_sids, WATCH_RECORD_SCHEMA)


def search_records(events: pa.Table) -> pa.Table:
    """Validated search_events rows -> search records."""
    return pa.table({"user_id": events["user_id"], "event_ts_us": _epoch_us(events["event_ts"]),
                     "query": events["query"]}).cast(SEARCH_RECORD_SCHEMA)


def flatten_snapshots(snapshot_rows: pa.Table, column: str, user_ids: bool = True) -> Tuple[pa.Table, np.ndarray]:
    """Snapshot rows -> the flat records of their ``watches`` or ``searches`` lists, in list order, with user_id
    (unless not ``user_ids``: a copy of the id per record, which a fold by row index does without); and each
    record's row index."""
    lists = snapshot_rows[column].combine_chunks()
    owners = pc.list_parent_indices(lists)
    schema = WATCH_RECORD_SCHEMA if column == "watches" else SEARCH_RECORD_SCHEMA
    columns = pc.list_flatten(lists).flatten()
    if user_ids:
        columns = [snapshot_rows["user_id"].combine_chunks().take(owners), *columns]
    else:
        schema = pa.schema(list(schema)[1:])
    records = pa.Table.from_arrays(columns, names=schema.names).cast(schema)
    return records, owners.to_numpy(zero_copy_only=False).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Most recent per user, and snapshots from records.
# ---------------------------------------------------------------------------------------------------------------
def group_ids(user_ids) -> Tuple[List[str], np.ndarray]:
    """The distinct user ids and, per row, the index of its user among them."""
    users = pc.unique(user_ids)
    return users.to_pylist(), pc.index_in(user_ids, value_set=users).to_numpy(zero_copy_only=False)


def most_recent(records: pa.Table, groups: np.ndarray, limit: int, key: Sequence[str]) -> np.ndarray:
    """Row indices of the ``limit`` most recent records of each group, ordered by group, then oldest first."""
    if records.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    keyed = records.select(list(key)).append_column("_group", pa.array(groups))
    order = pc.sort_indices(keyed, sort_keys=[("_group", "ascending")] + [(c, "ascending") for c in key])
    order = order.to_numpy()
    sorted_groups = groups[order]
    position = np.arange(len(order))
    group_end = np.flatnonzero(np.r_[sorted_groups[1:] != sorted_groups[:-1], True])
    rows_after = group_end[np.searchsorted(group_end, position)] - position
    return order[rows_after < limit]


def split_by_group(records: pa.Table, groups: np.ndarray, num_groups: int) -> Iterator[Tuple[int, pa.Table]]:
    """(group, its rows) for every group in ``range(num_groups)``, empty ones too, of records ordered by group."""
    bounds = np.r_[0, np.cumsum(np.bincount(groups, minlength=num_groups))]
    for group in range(num_groups):
        yield group, records.slice(int(bounds[group]), int(bounds[group + 1] - bounds[group]))


def bound_and_fold(old: pa.Table, old_groups: np.ndarray, new: pa.Table, new_groups: np.ndarray, limit: int,
                   key: Sequence[str]) -> Tuple[pa.Table, np.ndarray, int]:
    """The ``limit`` most recent of (old + the ``limit`` most recent new) records per group, ordered by group then
    oldest first, with their groups; and how many new records the per-group bound kept (the rest are dropped)."""
    new_kept = most_recent(new, new_groups, limit, key)
    merged = pa.concat_tables([old, new.take(new_kept)])
    merged_groups = np.concatenate([old_groups, new_groups[new_kept]]).astype(np.int64)
    kept = most_recent(merged, merged_groups, limit, key)
    return merged.take(kept), merged_groups[kept], len(new_kept)


def _lists(records: pa.Table, groups: np.ndarray, num_groups: int, item_type: pa.StructType) -> pa.ListArray:
    """Records ordered by group -> one list per group (empty where a group has none)."""
    offsets = np.r_[0, np.cumsum(np.bincount(groups, minlength=num_groups))].astype(np.int32)
    items = pa.StructArray.from_arrays([records[f.name].combine_chunks() for f in item_type], fields=list(item_type))
    return pa.ListArray.from_arrays(pa.array(offsets), items, type=pa.list_(item_type))


def snapshots(user_ids: Sequence[str], snapshot_date: str, sid_model_version: str, watches: pa.Table,
              watch_groups: np.ndarray, searches: pa.Table, search_groups: np.ndarray) -> pa.Table:
    """One HISTORIES_SCHEMA row per user from records ordered by group (the user's index in ``user_ids``)."""
    n = len(user_ids)
    return pa.Table.from_arrays([
        pa.array(user_ids, pa.string()), pa.array([snapshot_date] * n, pa.string()),
        pa.array([sid_model_version] * n, pa.string()),
        _lists(watches, watch_groups, n, schemas.HISTORY_WATCH_TYPE),
        _lists(searches, search_groups, n, schemas.HISTORY_SEARCH_TYPE)], schema=schemas.HISTORIES_SCHEMA)


# ---------------------------------------------------------------------------------------------------------------
# Compact encodings for Beam's shuffle: Arrow IPC bytes (a pickled Arrow slice would carry its whole parent buffer).
# ---------------------------------------------------------------------------------------------------------------
def to_ipc(table: pa.Table, compression: str = None) -> bytes:
    """``table`` as Arrow IPC stream bytes (``compression``: None, "lz4" or "zstd" buffers; ``from_ipc`` reads any)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
