"""User history snapshots: each user's most recent watches (with SIDs) and searches as of the end of a day.

A user's model input covers their last 1,200 watches, which can span months. Re-reading months of raw events every
day would make the daily job cost grow with history length, so each day folds its validated events into the
previous day's snapshot instead:

    snapshot(D) = most_recent(snapshot(D-1) + events(D))

Everything moves as Arrow tables of flat records (``transforms.history_fold``), never one Python object per event:
per-event Beam coders, DoFn calls and datetimes cost 5-6x the fold itself. Usually (``FoldShards``) yesterday's
snapshot never crosses a shuffle: its part s holds the users of today's part s, so the day's events are cut into
one Arrow IPC payload per shard (LZ4-compressed), grouped by shard, and each shard's fold streams yesterday's part,
folding and writing ``SNAPSHOT_ROW_GROUP_USERS`` users at a time with one array sort per table; a backfill (no
snapshot yesterday) folds its window's events the same way, from nothing. After a SID model change or a change of
shard count (``FoldHistories``), each input row group is cut into one payload per user, the shuffle groups a user's
payloads (yesterday's snapshot and the day's events), and the fold runs on batches of users. Input row groups are
keyed ``EVENT_SLICE_ROWS`` rows at a time. A heavy user's (or bot's) day is bounded before the shuffle to the
``max`` most recent events of each slice, and
again after it; events the bounds drop are counted, so the run summary shows every input row in a snapshot, dropped
by design, or dead-lettered. Memory is a group of users plus one shard's day (``FoldShards``) or, per key, bounded by
the history caps. Snapshot files hold row groups of ``SNAPSHOT_ROW_GROUP_USERS`` users, so their readers' is too.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.parquetio import ReadAllFromParquetBatched, ReadFromParquetBatched
from apache_beam.metrics import Metrics

from transforms import history_fold as hf
from transforms import outputs, schemas
from transforms.sources import check_partition_files, table_to_rows
from transforms.validation import parse_timestamp, row_to_json  # one serializer for every dead letter

# A row dropped here goes to the dead-letter output with this reason.
VIDEO_WITHOUT_SID = "video_without_sid"
DROPPED_BY_HISTORY_BOUND = "over_daily_history_bound"
COUNTS, DEAD = "counts", "dead"
# Users per row group of a snapshot file: a reader (build_examples' merge join, the next day's fold)
# decodes one row group at a time, so this bounds its memory to 128 users' histories, not a shard's.
SNAPSHOT_ROW_GROUP_USERS = 128
# Snapshots are written without dictionary encoding: in 128-user row groups a dictionary per column chunk costs
# about a third of the write (the fold's largest cost) and zstd compresses the plain pages a little smaller.
SNAPSHOT_DICTIONARY = False
# Events keyed at a time (``_KeyByUser``).
EVENT_SLICE_ROWS = 1 << 17
# A shard's payload holds the shard's share of a whole row group of events (a backfill's can be most of a day's
# data), shuffled and, on an in-process runner, held in memory until the fold: LZ4 halves it for less CPU than the
# copies it saves.
SHARD_PAYLOAD_COMPRESSION = "lz4"
# What a user's shuffled payload holds: (records of the previous snapshot?, watches?).
OLD_WATCHES, OLD_SEARCHES, WATCHES, SEARCHES = (True, True), (True, False), (False, True), (False, False)


def _count(table: str, date: str, kind: str, n: int, reason: str = ""):
    return beam.pvalue.TaggedOutput(COUNTS, ((table, date, kind, reason), n))


# ---------------------------------------------------------------------------------------------------------------
# Reading: Arrow row groups, not rows.
# ---------------------------------------------------------------------------------------------------------------
class ReadValidated(beam.PTransform):
    """Days of a validated event table (``validate_inputs``' output) as Arrow tables, one per row group: a backfill's
    whole window in one read (one listing, one read step), not one branch per day."""

    def __init__(self, validated_root: str, table: str, dates: Sequence):
        super().__init__()
        self._root, self._table, self._dates = validated_root, table, list(dates)

    def expand(self, pbegin):
        files = [path for date in self._dates for path in check_partition_files(self._root, self._table, date)]
        return (pbegin | "ListFiles" >> beam.Create(files)
                | "ReadFiles" >> ReadAllFromParquetBatched(columns=schemas.input_schema(self._table).names))


def read_video_sids(pipeline: beam.Pipeline, directory: str) -> beam.pvalue.AsSingleton:
    """Every video's SID as one (video_id, sid) Arrow table, a side input: its size is the catalog's, not the
    histories', and a lookup by ``pc.index_in`` replaces a shuffle join of every event."""
    return beam.pvalue.AsSingleton(
        pipeline
        | "ReadVideoSids" >> ReadFromParquetBatched(outputs.join(directory, "*.parquet"), columns=["video_id", "sid"])
        | "AllVideoSids" >> beam.combiners.ToList()
        | "OneSidTable" >> beam.Map(lambda tables: pa.concat_tables(tables) if tables else pa.table(
            {"video_id": pa.array([], pa.string()), "sid": pa.array([], pa.list_(pa.int32()))})))


# ---------------------------------------------------------------------------------------------------------------
# Records: SIDs attached (or the row dead-lettered), keyed by user.
# ---------------------------------------------------------------------------------------------------------------
def _dead_letter(row: Dict, date: str) -> Dict:
    return {"table": schemas.WATCH_EVENTS, "reason": VIDEO_WITHOUT_SID,
            "detail": f"video {row['video_id']} has no SID under the current SID model",
            "raw_row": row_to_json(row), "partition_date": date}


class _KeyByUser(beam.DoFn):
    """Arrow tables of events or snapshots -> (user_id, (payload kind, IPC bytes of the user's flat records)), plus
    dead letters (watches without a SID) and counts."""

    def __init__(self, date: str, table: str, limit=None, key=(), num_shards: int = 0):
        super().__init__()
        self._date, self._table, self._limit, self._key = date, table, limit, key
        self._num_shards = num_shards  # > 0: key records by their user's snapshot shard, not by user
        self._without_sid = Metrics.counter("update_histories", "watches_without_sid")

    def process(self, batch: pa.Table, video_sids=None):
        if self._table == schemas.HISTORIES:
            yield from self._snapshots(batch, video_sids)
            return
        # A row group of validated events can hold a million rows: keyed a slice at a time, the copies made on the
        # way (records with SIDs, the bound's order, the payloads) stay a slice's size.
        for start in range(0, max(batch.num_rows, 1), EVENT_SLICE_ROWS):
            yield from self._events(batch.slice(start, EVENT_SLICE_ROWS), video_sids)

    def _events(self, batch: pa.Table, video_sids):
        yield _count(self._table, self._date, outputs.IN, batch.num_rows)
        if self._table == schemas.SEARCH_EVENTS:
            yield from self._by_user(hf.search_records(batch), SEARCHES)
            return
        records, missing = hf.watch_records(batch, video_sids)
        dead = table_to_rows(batch.take(pa.array(missing, pa.int64())), batch.column_names)
        yield from self._dead([{**row, "event_ts": parse_timestamp(row["event_ts"])} for row in dead],
                              schemas.WATCH_EVENTS)
        yield from self._by_user(records, WATCHES)

    def _dead(self, rows: List[Dict], table: str):
        self._without_sid.inc(len(rows))
        if rows:
            yield _count(table, self._date, outputs.DEAD, len(rows), VIDEO_WITHOUT_SID)
        for row in rows:
            yield beam.pvalue.TaggedOutput(DEAD, _dead_letter(row, self._date))

    def _by_user(self, records: pa.Table, kind, users=None, groups=None):
        """One payload per user, the day's bounded to the ``limit`` most recent (the drops counted)."""
        if users is None:
            users, groups = hf.group_ids(records["user_id"])
        if kind[0]:  # yesterday's snapshot: already within the caps; the fold orders it
            kept = np.argsort(groups, kind="stable")
        else:
            kept = hf.most_recent(records, groups, self._limit, self._key)
            if len(kept) < records.num_rows:
                yield _count(self._table, self._date, outputs.DROPPED, records.num_rows - len(kept),
                             DROPPED_BY_HISTORY_BOUND)
        if self._num_shards:
            yield from self._by_shard(records, kind, users, groups, kept)
            return
        parts = records.drop_columns(["user_id"]).take(pa.array(kept, pa.int64()))
        for group, part in hf.split_by_group(parts, groups[kept], len(users)):
            yield users[group], (kind, hf.to_ipc(part))

    def _by_shard(self, records: pa.Table, kind, users, groups: np.ndarray, kept: np.ndarray):
        """One payload per snapshot shard (``outputs.shard_of`` of the user id, hashed once per user), user ids
        kept: the shuffle groups the day's events by shard, and the fold reads the previous shard itself."""
        user_shards = np.array([outputs.shard_of(user, self._num_shards) for user in users], np.int64)
        kept = kept[np.argsort(user_shards[groups[kept]], kind="stable")]
        parts = records.take(pa.array(kept, pa.int64()))
        for shard, part in hf.split_by_group(parts, user_shards[groups[kept]], self._num_shards):
            if part.num_rows:
                yield shard, (kind, hf.to_ipc(part, SHARD_PAYLOAD_COMPRESSION))

    def _snapshots(self, rows: pa.Table, video_sids):
        """Yesterday's snapshot rows -> a watches and a searches payload for every user (even empty ones, so every
        user carries over); with ``video_sids`` (a new SID model), each watch's SID is looked up again."""
        users = rows["user_id"].to_pylist()
        if len(set(users)) != len(users):
            raise ValueError(f"previous snapshot has several rows for one user among {sorted(users)[:5]}...")
        for kind, column in ((OLD_WATCHES, "watches"), (OLD_SEARCHES, "searches")):
            records, owners = hf.flatten_snapshots(rows, column)
            if column == "watches" and video_sids is not None:
                yield _count(schemas.HISTORIES, self._date, outputs.IN, records.num_rows)
                remapped, missing = hf.with_sids(records, video_sids, hf.WATCH_RECORD_SCHEMA)
                dead = records.take(pa.array(missing, pa.int64())).to_pylist()
                yield from self._dead([{**w, "event_ts": schemas.from_epoch_us(w["event_ts_us"])} for w in dead],
                                      schemas.HISTORIES)
                yield _count(schemas.HISTORIES, self._date, outputs.OUT, remapped.num_rows)
                records, owners = remapped, np.delete(owners, missing)
            yield from self._by_user(records, kind, users, owners)


class KeyByUser(beam.PTransform):
    """Arrow tables of ``table`` (validated watch_events or search_events, or ``histories`` snapshot rows) ->
    {"keyed": (user_id, payload), "dead", "counts"}. ``video_sids`` (a side input) attaches SIDs to watches, and to
    a snapshot's watches when given for one (after a SID model change). With ``num_shards``, events are keyed by
    their user's snapshot shard instead (``FoldShards``' input), each payload holding user ids."""

    def __init__(self, date: str, table: str, max_events: int = 0, video_sids=None, num_shards: int = 0):
        super().__init__()
        key = hf.WATCH_KEY if table == schemas.WATCH_EVENTS else hf.SEARCH_KEY
        self._fn, self._video_sids = _KeyByUser(date, table, max_events, key, num_shards), video_sids

    def expand(self, tables):
        side = [self._video_sids] if self._video_sids is not None else []
        result = tables | beam.ParDo(self._fn, *side).with_outputs(COUNTS, DEAD, main="keyed")
        return {"keyed": result.keyed, "dead": result[DEAD], "counts": result[COUNTS]}


# ---------------------------------------------------------------------------------------------------------------
# The fold.
# ---------------------------------------------------------------------------------------------------------------
class _Fold(beam.DoFn):
    """A batch of (user_id, payloads) -> one Arrow table of their snapshots, and the day's kept (OUT) and
    per-user-bound (DROPPED) counts."""

    def __init__(self, date, version, max_watches, max_searches):
        super().__init__()
        self._date, self._version, self._max_watches, self._max_searches = date, version, max_watches, max_searches

    def process(self, batch: List[Tuple[str, List]]):
        users = [user for user, _ in batch]
        parts = {kind: ([], []) for kind in (OLD_WATCHES, OLD_SEARCHES, WATCHES, SEARCHES)}
        for group, (user, payloads) in enumerate(batch):
            payloads = list(payloads)
            if sum(kind == OLD_WATCHES for kind, _ in payloads) > 1:
                raise ValueError(f"previous snapshot has several rows for user {user!r}")
            for kind, data in payloads:
                part = hf.from_ipc(data)
                parts[kind][0].append(part)
                parts[kind][1].append(np.full(part.num_rows, group, dtype=np.int64))
        folded = []
        for table, old, new, limit, key, schema in (
                (schemas.WATCH_EVENTS, OLD_WATCHES, WATCHES, self._max_watches, hf.WATCH_KEY,
                 schemas.HISTORY_WATCH_TYPE),
                (schemas.SEARCH_EVENTS, OLD_SEARCHES, SEARCHES, self._max_searches, hf.SEARCH_KEY,
                 schemas.HISTORY_SEARCH_TYPE)):
            (old_tables, old_groups), (new_tables, new_groups) = parts[old], parts[new]
            empty = pa.schema(list(schema)).empty_table()
            records, groups, kept = hf.bound_and_fold(
                pa.concat_tables([empty, *old_tables]), np.concatenate([np.zeros(0, np.int64), *old_groups]),
                pa.concat_tables([empty, *new_tables]), np.concatenate([np.zeros(0, np.int64), *new_groups]),
                limit, key)
            new_rows = sum(part.num_rows for part in new_tables)
            # The day's events are newer than anything in the previous snapshot, so all that survived the
            # per-user bound are in the new snapshot.
            if new_rows:
                yield _count(table, self._date, outputs.OUT, kept)
            if new_rows > kept:
                yield _count(table, self._date, outputs.DROPPED, new_rows - kept, DROPPED_BY_HISTORY_BOUND)
            folded += [records, groups]
        yield hf.snapshots(users, self._date, self._version, *folded)


class FoldHistories(beam.PTransform):
    """Keyed payloads (``KeyByUser``'s, of yesterday's snapshot and the day's events) -> {"snapshots": Arrow tables
    of HISTORIES_SCHEMA rows, "counts": (count key, n) pairs for ``outputs.SummarizeCounts``}."""

    USERS_PER_BATCH = 256  # enough to amortise the per-batch Arrow calls; at most 256 x (caps) records in memory

    def __init__(self, snapshot_date: str, sid_model_version: str, max_watches: int, max_searches: int):
        super().__init__()
        self._fn = _Fold(snapshot_date, sid_model_version, max_watches, max_searches)

    def expand(self, keyed):
        folded = (keyed
                  | "GroupByUser" >> beam.GroupByKey()
                  | "BatchUsers" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.USERS_PER_BATCH)
                  | "Fold" >> beam.ParDo(self._fn).with_outputs(COUNTS, main="snapshots"))
        return {"snapshots": folded.snapshots, "counts": folded[COUNTS]}


# ---------------------------------------------------------------------------------------------------------------
# The fold shard by shard: yesterday's snapshot never crosses a shuffle.
# ---------------------------------------------------------------------------------------------------------------
def _parquet_names(directory: str) -> set:
    from apache_beam.io.filesystems import FileSystems

    return {FileSystems.split(m.path)[1]
            for m in FileSystems.match([outputs.join(directory, "*.parquet")])[0].metadata_list}


def snapshot_shard_count(directory: str):
    """N when ``directory`` holds exactly the files ``WriteSnapshots`` writes with N shards (``part-SSSSS-of-NNNNN``,
    every S < N), else None: the snapshot's part s then holds the users of shard s (``outputs.shard_of``)."""
    import re

    names = _parquet_names(directory)
    counts = {int(m.group(1)) for m in (re.fullmatch(r"part-\d{5}-of-(\d{5})\.parquet", n) for n in names) if m}
    if len(counts) != 1:
        return None
    num_shards = counts.pop()
    return num_shards if is_sharded_snapshot(directory, num_shards, names) else None


def is_sharded_snapshot(directory: str, num_shards: int, names=None) -> bool:
    """Whether ``directory`` holds exactly the files ``WriteSnapshots`` writes with ``num_shards`` shards (so its part
    s holds the users of shard s, as today's will)."""
    from apache_beam.io.filesystems import FileSystems

    found = names if names is not None else _parquet_names(directory)
    return found == {FileSystems.split(outputs.shard_path(directory, s, num_shards))[1] for s in range(num_shards)}


def open_snapshot_shard(path: str):
    """A snapshot part as a ``pq.ParquetFile`` (read row group by row group, not whole), and the handle to close."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    handle = open(path, "rb") if "://" not in path else FileSystems.open(path)
    return pq.ParquetFile(handle), handle


def check_snapshot_part(path: str, user_ids: List[str], shard: int, num_shards: int) -> bool:
    """Whether a snapshot part's user ids are sorted (as written); raises if it is not part ``shard`` of
    ``num_shards`` or holds a user twice."""
    if len(set(user_ids)) != len(user_ids):
        raise ValueError(f"snapshot {path} has several rows for one user")
    misplaced = [user for user in user_ids if outputs.shard_of(user, num_shards) != shard]
    if misplaced:
        raise ValueError(f"snapshot {path} holds users of other shards (e.g. {misplaced[0]!r}): it was not written "
                         f"by update_histories with --history_shards={num_shards}")
    return all(a < b for a, b in zip(user_ids, user_ids[1:]))


def open_checked_part(path: str, shard: int, num_shards: int):
    """Snapshot part ``shard`` of ``num_shards`` opened (``open_snapshot_shard``) and checked
    (``check_snapshot_part``): (source, handle to close, its user ids, whether they are sorted)."""
    source, handle = open_snapshot_shard(path)
    try:
        ids = source.read(columns=["user_id"])["user_id"]
        return source, handle, ids, check_snapshot_part(path, ids.to_pylist(), shard, num_shards)
    except Exception:
        handle.close()
        raise


def rows_in_user_order(source, in_order: bool, order: np.ndarray, batch_users: int, columns=None):
    """A snapshot part's rows in user_id order, about ``batch_users`` at a time: streamed row group by row group when
    the file is sorted (as written), else read whole and taken in ``order``. Whole row groups, read as tables: a
    record-batch reader (``iter_batches``) holds several times a batch's bytes in read-ahead buffers, and with three
    parts open (build_examples) that, not the batch, was most of the job's memory at long histories."""
    if not in_order:
        rows = source.read(columns=columns).take(pa.array(order, pa.int64()))
        for start in range(0, rows.num_rows, batch_users):
            yield rows.slice(start, batch_users)
        return
    metadata, groups, users = source.metadata, [], 0
    for index in range(metadata.num_row_groups):
        groups.append(index)
        users += metadata.row_group(index).num_rows
        if users >= batch_users or index == metadata.num_row_groups - 1:
            yield source.read_row_groups(groups, columns=columns)
            groups, users = [], 0


class _FoldShard(beam.DoFn):
    """(shard, {"events": the day's payloads of the shard's users, "shard": [None]}) -> today's part ``shard``, folded
    from yesterday's part ``shard`` and the day's events, streamed: today's users (yesterday's and the day's, sorted
    by user_id) are folded ``SNAPSHOT_ROW_GROUP_USERS`` at a time, each group written as one row group as it is made,
    so memory is one group of users plus the shard's day, not the shard. Writes the bytes ``WriteSnapshots`` writes
    for the same rows; yields the file name, and counts."""

    def __init__(self, date, version, max_watches, max_searches, previous_dir: str, out_dir: str, num_shards: int):
        super().__init__()
        self._date, self._version, self._max_watches, self._max_searches = date, version, max_watches, max_searches
        self._previous_dir, self._out_dir, self._num_shards = previous_dir, out_dir, num_shards

    def process(self, keyed):
        import pyarrow.compute as pc

        shard, grouped = keyed
        group_users = SNAPSHOT_ROW_GROUP_USERS
        payloads = {WATCHES: [], SEARCHES: []}
        for kind, data in grouped["events"]:
            payloads[kind].append(hf.from_ipc(data))
        new = {kind: pa.concat_tables([schema.empty_table(), *payloads[kind]])
               for kind, schema in ((WATCHES, hf.WATCH_RECORD_SCHEMA), (SEARCHES, hf.SEARCH_RECORD_SCHEMA))}
        del payloads
        source = handle = None
        if self._previous_dir is None:  # a backfill: no snapshot before the day
            previous_ids, in_order = pa.chunked_array([], pa.string()), True
        else:
            source, handle, previous_ids, in_order = open_checked_part(
                outputs.shard_path(self._previous_dir, shard, self._num_shards), shard, self._num_shards)
        try:
            # Today's users in user_id order (Arrow's byte order, Python's str order): yesterday's and the day's.
            ids = pa.chunked_array([*previous_ids.chunks, *new[WATCHES]["user_id"].chunks,
                                    *new[SEARCHES]["user_id"].chunks], pa.string())
            users = pc.unique(ids)
            users = users.take(pc.sort_indices(users))
            # Each previous row's (and, by kind, each day's record's) position among today's users, in that order.
            previous_at = pc.index_in(previous_ids, value_set=users).to_numpy(zero_copy_only=False).astype(np.int64)
            previous_order = np.argsort(previous_at, kind="stable")
            previous_at = previous_at[previous_order]
            days = {}
            for kind in (WATCHES, SEARCHES):
                at = pc.index_in(new[kind]["user_id"], value_set=users).to_numpy(zero_copy_only=False)
                order = np.argsort(at, kind="stable")
                days[kind] = (new[kind].drop_columns(["user_id"]).take(pa.array(order, pa.int64())),
                              at[order].astype(np.int64))
            new_rows = {kind: new[kind].num_rows for kind in new}
            del new
            kept = {WATCHES: 0, SEARCHES: 0}
            batches = (iter(()) if source is None
                       else rows_in_user_order(source, in_order, previous_order, group_users))
            pending = schemas.HISTORIES_SCHEMA.empty_table() if source is None else source.schema_arrow.empty_table()
            out_path = outputs.shard_path(self._out_dir, shard, self._num_shards)
            with outputs.ParquetFileWriter(out_path, schemas.HISTORIES_SCHEMA, group_users,
                                           SNAPSHOT_DICTIONARY) as writer:
                for first in range(0, len(users), group_users):
                    last = min(first + group_users, len(users))
                    # Yesterday's rows of these users: the next ones in user_id order.
                    lo, hi = np.searchsorted(previous_at, [first, last])
                    while pending.num_rows < hi - lo:
                        pending = pa.concat_tables([pending, next(batches)])
                    old_rows, pending = pending.slice(0, hi - lo), pending.slice(hi - lo)
                    old_at = previous_at[lo:hi] - first
                    folded = []
                    for kind, column, limit, key in (
                            (WATCHES, "watches", self._max_watches, hf.WATCH_KEY),
                            (SEARCHES, "searches", self._max_searches, hf.SEARCH_KEY)):
                        old, owners = hf.flatten_snapshots(old_rows, column, user_ids=False)
                        records, at = days[kind]
                        start, stop = np.searchsorted(at, [first, last])
                        records, groups, n = hf.bound_and_fold(old, old_at[owners], records.slice(start, stop - start),
                                                               at[start:stop] - first, limit, key)
                        kept[kind] += n
                        folded += [records, groups]
                    rows = hf.snapshots(users.slice(first, last - first).to_pylist(), self._date, self._version,
                                        *folded)
                    writer.write(rows.cast(schemas.HISTORIES_SCHEMA).combine_chunks())
        finally:
            if handle is not None:
                handle.close()
        for table, kind in ((schemas.WATCH_EVENTS, WATCHES), (schemas.SEARCH_EVENTS, SEARCHES)):
            if new_rows[kind]:
                yield _count(table, self._date, outputs.OUT, kept[kind])
            if new_rows[kind] > kept[kind]:
                yield _count(table, self._date, outputs.DROPPED, new_rows[kind] - kept[kind],
                             DROPPED_BY_HISTORY_BOUND)
        yield _count(schemas.HISTORIES, self._date, outputs.STAT, len(users), "users")
        yield out_path


class FoldShards(beam.PTransform):
    """The day's payloads keyed by shard (``KeyByUser(..., num_shards=n)``) -> today's snapshot files, one per shard
    (empty ones too), each folded from yesterday's part of the same shard: {"files": file names, "counts"}.
    Only the day's events are shuffled; memory and cost are one shard's read, sort and rewrite. Needs yesterday's
    snapshot written with the same shard count (``is_sharded_snapshot``) and the same SID model, or none
    (``previous_dir`` None: a backfill, every user's history built from the window's events alone)."""

    def __init__(self, snapshot_date: str, sid_model_version: str, max_watches: int, max_searches: int,
                 previous_dir: Optional[str], out_dir: str, num_shards: int):
        super().__init__()
        self._num_shards = num_shards
        self._fn = _FoldShard(snapshot_date, sid_model_version, max_watches, max_searches, previous_dir, out_dir,
                              num_shards)

    def expand(self, keyed):
        every_shard = keyed.pipeline | "EveryShard" >> beam.Create([(s, None) for s in range(self._num_shards)])
        folded = ({"events": keyed, "shard": every_shard}
                  | "GroupByShard" >> beam.CoGroupByKey()
                  | "FoldShard" >> beam.ParDo(self._fn).with_outputs(COUNTS, main="files"))
        return {"files": folded.files, "counts": folded[COUNTS]}


def _shard_pieces(table: pa.Table, num_shards: int):
    """Snapshot rows -> (shard, the rows of the shard's users), the shard ``WriteParquetShards`` picks with
    key_columns=("user_id",): ``outputs.shard_of`` the user id itself (a string, so its own ``str``)."""
    shards = np.array([outputs.shard_of(user, num_shards) for user in table["user_id"].to_pylist()], np.int64)
    for shard in np.unique(shards):
        yield int(shard), table.filter(pa.array(shards == shard))


class _WriteSnapshotShard(beam.DoFn):
    """(shard, {"pieces": snapshot tables of the shard's users, "shard": [None]}) -> the shard's file, rows sorted
    by user_id in row groups of ``SNAPSHOT_ROW_GROUP_USERS``; yields the file name."""

    def __init__(self, directory: str, num_shards: int):
        super().__init__()
        self._directory, self._num_shards = directory, num_shards

    def process(self, keyed):
        import pyarrow.compute as pc

        shard, grouped = keyed
        pieces = [piece for piece in grouped["pieces"] if piece.num_rows]
        rows = pa.concat_tables(pieces) if pieces else schemas.HISTORIES_SCHEMA.empty_table()
        order = pc.sort_indices(rows, [("user_id", "ascending")])
        path = outputs.shard_path(self._directory, shard, self._num_shards)
        # A row group at a time: the shard is never copied whole (sorted, cast, combined) next to its pieces.
        with outputs.ParquetFileWriter(path, schemas.HISTORIES_SCHEMA, SNAPSHOT_ROW_GROUP_USERS,
                                       SNAPSHOT_DICTIONARY) as writer:
            for start in range(0, len(order), SNAPSHOT_ROW_GROUP_USERS):
                writer.write(rows.take(order.slice(start, SNAPSHOT_ROW_GROUP_USERS)).cast(schemas.HISTORIES_SCHEMA))
        yield path


class WriteSnapshots(beam.PTransform):
    """Snapshot tables -> ``<directory>/part-SSSSS-of-NNNNN.parquet``, every shard (empty ones too): the rows
    ``WriteParquetShards`` writes for the same rows as dicts (sharded and sorted by user_id), without a dict per row,
    in row groups of ``SNAPSHOT_ROW_GROUP_USERS`` users (the bytes ``FoldShards`` writes)."""

    def __init__(self, directory: str, num_shards: int):
        super().__init__()
        self._directory, self._num_shards = directory, num_shards

    def expand(self, tables):
        n = self._num_shards
        pieces = tables | "ShardPieces" >> beam.FlatMap(_shard_pieces, n)
        every_shard = tables.pipeline | "EveryShard" >> beam.Create([(s, None) for s in range(n)])
        return ({"pieces": pieces, "shard": every_shard}
                | "GroupShards" >> beam.CoGroupByKey()
                | "WriteShards" >> beam.ParDo(_WriteSnapshotShard(self._directory, n)))
