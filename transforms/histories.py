"""User history snapshots: each user's most recent watches (with SIDs) and searches as of the end of a day.

A user's model input covers their last 1,200 watches, which can span months. Re-reading months of raw events every
day would make the daily job cost grow with history length, so each day folds its validated events into the
previous day's snapshot instead:

    snapshot(D) = most_recent(snapshot(D-1) + events(D))

Heavy users (or bots) must neither blow up a worker's memory nor become hot keys, so each user's day is bounded
*before* the shuffle by ``MostRecentEvents``, a combiner Beam lifts into the map side: at most ``max_events``
events per user ever cross the network, whatever the user did that day. Events the bound drops are counted, so the
run summary can show that every input row is either in a snapshot, dropped by design, or dead-lettered.

Snapshot records are plain dicts shaped as ``schemas.HISTORY_WATCH_TYPE`` / ``HISTORY_SEARCH_TYPE``.
"""
from __future__ import annotations

import heapq
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import outputs, schemas

# A row dropped here goes to the dead-letter output with this reason.
VIDEO_WITHOUT_SID = "video_without_sid"


# ---------------------------------------------------------------------------------------------------------------
# Pure functions.
# ---------------------------------------------------------------------------------------------------------------
def watch_recency_key(watch: Dict[str, Any]) -> Tuple:
    """Total order on a user's watches: by time, ties broken by scenario then video id (never by arrival order)."""
    return watch["event_ts_us"], watch["scenario"], watch["video_id"]


def search_recency_key(search: Dict[str, Any]) -> Tuple:
    return search["event_ts_us"], search["query"]


def watch_record(validated_row: Dict[str, Any], sid: Sequence[int]) -> Dict[str, Any]:
    """A validated watch_events row plus its video's SID, as stored in a snapshot."""
    return {
        "video_id": validated_row["video_id"],
        "scenario": validated_row["scenario"],
        "event_ts_us": schemas.to_epoch_us(validated_row["event_ts"]),
        "watch_time_s": float(validated_row["watch_time_s"]),
        "video_duration_s": float(validated_row["video_duration_s"]),
        "surface": validated_row["surface"],
        "device": validated_row["device"],
        "liked": bool(validated_row["liked"]),
        "disliked": bool(validated_row["disliked"]),
        "sid": [int(c) for c in sid],
    }


def search_record(validated_row: Dict[str, Any]) -> Dict[str, Any]:
    return {"event_ts_us": schemas.to_epoch_us(validated_row["event_ts"]), "query": validated_row["query"]}


def most_recent(records: Iterable[Dict[str, Any]], limit: int, key) -> List[Dict[str, Any]]:
    """The ``limit`` most recent records by ``key``, oldest first."""
    return sorted(heapq.nlargest(limit, records, key=key), key=key)


def fold_history(user_id: str, snapshot_date: str, sid_model_version: str, previous: Optional[Dict[str, Any]],
                 new_watches: Iterable[Dict[str, Any]], new_searches: Iterable[Dict[str, Any]],
                 max_watches: int, max_searches: int) -> Dict[str, Any]:
    """The snapshot after folding a day's events into the previous snapshot (``None`` for a new user)."""
    old_watches = previous["watches"] if previous else []
    old_searches = previous["searches"] if previous else []
    return {
        "user_id": user_id,
        "snapshot_date": snapshot_date,
        "sid_model_version": sid_model_version,
        "watches": most_recent(list(old_watches) + list(new_watches), max_watches, watch_recency_key),
        "searches": most_recent(list(old_searches) + list(new_searches), max_searches, search_recency_key),
    }


# ---------------------------------------------------------------------------------------------------------------
# Bounding a user's day before the shuffle.
# ---------------------------------------------------------------------------------------------------------------
class MostRecentEvents(beam.CombineFn):
    """Keeps the ``max_events`` most recent records of a key and counts the ones it dropped.

    Beam's ``Top.LargestPerKey`` would bound the same way, but drops silently; the count is what lets the run
    summary account for every row. The accumulator is (min-heap of (key, record), dropped count), so memory per
    key is bounded by ``max_events`` at every stage of combiner lifting.
    """

    def __init__(self, max_events: int, recency_key):
        super().__init__()
        self._max, self._key = max_events, recency_key

    def create_accumulator(self):
        return [], 0

    def _push(self, heap, dropped, record):
        item = (self._key(record), record)
        if len(heap) < self._max:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
            dropped += 1
        else:
            dropped += 1
        return dropped

    def add_input(self, accumulator, record):
        heap, dropped = accumulator
        dropped = self._push(heap, dropped, record)
        return heap, dropped

    def merge_accumulators(self, accumulators):
        heap, dropped = [], 0
        for other_heap, other_dropped in accumulators:
            dropped += other_dropped
            for _, record in other_heap:
                dropped = self._push(heap, dropped, record)
        return heap, dropped

    def extract_output(self, accumulator):
        heap, dropped = accumulator
        return {"events": [record for _, record in sorted(heap, key=lambda item: item[0])], "dropped": dropped}


# ---------------------------------------------------------------------------------------------------------------
# Beam.
# ---------------------------------------------------------------------------------------------------------------
class _AttachSids(beam.DoFn):
    """(video_id, {"watches": [...], "sids": [...]}) -> snapshot watch records keyed by user, or dead letters."""
    DEAD = "dead"

    def __init__(self, date: str):
        super().__init__()
        self._date = date
        self._without_sid = Metrics.counter("update_histories", "watches_without_sid")

    def process(self, joined):
        video_id, groups = joined
        sids = list(groups["sids"])
        sid = sids[0] if sids else None
        for row in groups["watches"]:
            if sid is None:
                self._without_sid.inc()
                yield beam.pvalue.TaggedOutput(self.DEAD, {
                    "table": schemas.WATCH_EVENTS, "reason": VIDEO_WITHOUT_SID,
                    "detail": f"video {video_id} has no SID under the current SID model",
                    "raw_row": _row_json(row), "partition_date": self._date})
            else:
                yield row["user_id"], watch_record(row, sid)


def _row_json(row):
    from transforms.validation import row_to_json  # one serializer for every dead-letter row

    return row_to_json(row)


class AttachSids(beam.PTransform):
    """Validated watch rows + a video_id -> SID mapping -> {"watches": (user_id, record), "dead": dead letters}."""

    def __init__(self, date: str):
        super().__init__()
        self._date = date

    def expand(self, inputs):
        watches, video_sids = inputs
        by_video = watches | "KeyByVideo" >> beam.Map(lambda row: (row["video_id"], row))
        joined = {"watches": by_video, "sids": video_sids} | "JoinSids" >> beam.CoGroupByKey()
        attached = joined | "AttachSid" >> beam.ParDo(_AttachSids(self._date)).with_output_types(
            Tuple[str, Dict[str, Any]]).with_outputs(_AttachSids.DEAD, main="watches")
        return {"watches": attached.watches, "dead": attached[_AttachSids.DEAD]}


class RemapSnapshotSids(beam.PTransform):
    """Snapshots written under an older SID model -> the same snapshots with every watch's SID from ``video_sids``.

    Input: (snapshots, (video_id, sid) pairs). Output: {"snapshots", "dead", "counts"}; watches whose video has no
    SID under the new model are dead-lettered, and the accounting is reported under the table "histories".
    """

    def __init__(self, date: str):
        super().__init__()
        self._date = date

    def expand(self, inputs):
        snapshots, video_sids = inputs
        rows = snapshots | "FlattenWatches" >> beam.FlatMap(
            lambda snap: [{**w, "user_id": snap["user_id"], "event_ts": schemas.from_epoch_us(w["event_ts_us"])}
                          for w in snap["watches"]])
        attached = (rows, video_sids) | "AttachNewSids" >> AttachSids(self._date)
        regrouped = ({"snapshot": snapshots | "KeyByUser" >> beam.Map(lambda snap: (snap["user_id"], snap)),
                      "watches": attached["watches"]}
                     | "Regroup" >> beam.CoGroupByKey()
                     | "Rebuild" >> beam.MapTuple(lambda _, g: {
                         **list(g["snapshot"])[0],
                         "watches": sorted(g["watches"], key=watch_recency_key)}))
        table, day = schemas.HISTORIES, self._date
        counts = [rows | "CountIn" >> outputs.CountRows(table, day, outputs.IN),
                  attached["watches"] | "CountOut" >> outputs.CountRows(table, day, outputs.OUT),
                  attached["dead"] | "CountDead" >> outputs.CountRows(table, day, outputs.DEAD)]
        return {"snapshots": regrouped, "dead": attached["dead"],
                "counts": counts | "AllCounts" >> beam.Flatten()}


class FoldHistories(beam.PTransform):
    """Previous snapshots + a day's keyed watch and search records -> new snapshots and per-user drop counts.

    Input: dict with "previous" (snapshot rows), "watches" and "searches" ((user_id, record) pairs).
    Output: dict with "snapshots" and "counts": (count key, n) pairs for ``outputs.SummarizeCounts``: the day's
    events kept in a snapshot (OUT) and those a per-user bound cut off (DROPPED).
    """

    def __init__(self, snapshot_date: str, sid_model_version: str, max_watches: int, max_searches: int):
        super().__init__()
        self._date, self._version = snapshot_date, sid_model_version
        self._max_watches, self._max_searches = max_watches, max_searches

    def expand(self, inputs):
        bounded_watches = (inputs["watches"]
                           | "BoundWatchesPerUser" >> beam.CombinePerKey(
                               MostRecentEvents(self._max_watches, watch_recency_key)))
        bounded_searches = (inputs["searches"]
                            | "BoundSearchesPerUser" >> beam.CombinePerKey(
                                MostRecentEvents(self._max_searches, search_recency_key)))
        previous = inputs["previous"] | "KeyPrevious" >> beam.Map(lambda row: (row["user_id"], row))
        grouped = ({"previous": previous, "watches": bounded_watches, "searches": bounded_searches}
                   | "GroupByUser" >> beam.CoGroupByKey())
        folded = grouped | "Fold" >> beam.ParDo(
            _Fold(self._date, self._version, self._max_watches, self._max_searches)).with_output_types(
                Dict[str, Any]).with_outputs(
                _Fold.COUNTS, main="snapshots")
        return {"snapshots": folded.snapshots, "counts": folded[_Fold.COUNTS]}


DROPPED_BY_HISTORY_BOUND = "over_daily_history_bound"


class _Fold(beam.DoFn):
    COUNTS = "counts"

    def __init__(self, date, version, max_watches, max_searches):
        super().__init__()
        self._date, self._version, self._max_watches, self._max_searches = date, version, max_watches, max_searches

    def process(self, grouped):
        user_id, groups = grouped
        previous = list(groups["previous"])
        if len(previous) > 1:
            raise ValueError(f"previous snapshot has {len(previous)} rows for user {user_id!r}")
        day_watches = list(groups["watches"])
        day_searches = list(groups["searches"])
        new_watches = day_watches[0]["events"] if day_watches else []
        new_searches = day_searches[0]["events"] if day_searches else []
        for table, bounded in ((schemas.WATCH_EVENTS, day_watches), (schemas.SEARCH_EVENTS, day_searches)):
            if bounded:
                # The day's events are newer than anything in the previous snapshot, so all that survived the
                # per-user bound are in the new snapshot.
                kept, dropped = len(bounded[0]["events"]), bounded[0]["dropped"]
                yield beam.pvalue.TaggedOutput(self.COUNTS, ((table, self._date, outputs.OUT, ""), kept))
                if dropped:
                    yield beam.pvalue.TaggedOutput(
                        self.COUNTS, ((table, self._date, outputs.DROPPED, DROPPED_BY_HISTORY_BOUND), dropped))
        yield fold_history(user_id, self._date, self._version, previous[0] if previous else None,
                           new_watches, new_searches, self._max_watches, self._max_searches)
