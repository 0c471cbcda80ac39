"""The data contract: every table the pipelines read or write, defined once.

Each table has a pyarrow schema (Parquet files, the embedded default) and the matching BigQuery table schema
(production). Everything else imports from here; no other module spells out a column list.

Input tables are partitioned by event date:
``<input_root>/<table>/date=YYYY-MM-DD/*.parquet`` locally or on GCS, and date-partitioned BigQuery tables
(``_PARTITIONDATE`` or the column named in ``PARTITION_COLUMN``) in production.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Dict, List

import pyarrow as pa

# ---------------------------------------------------------------------------------------------------------------
# Domain constants of the contract.
# ---------------------------------------------------------------------------------------------------------------
SCENARIOS = ("LFV", "SFV")  # long-form video, short-form video
SURFACES = ("home", "watch_next", "shorts_feed", "search", "subscriptions", "other")
DEVICES = ("IOS", "ANDROID", "WEB", "TV", "OTHER")

DEFAULT_EMBEDDING_DIM = 64  # the sample data's content-embedding width; MovieLens imports use 384
MAX_QUERY_CHARS = 256  # longer queries are dead-lettered, not truncated silently
MAX_ID_CHARS = 128
MAX_WATCH_TIME_S = 24 * 3600.0  # a single watch longer than a day is a logging error

# Events must lie in their partition's day; this bound catches clock garbage (year 1970, year 2200).
MIN_VALID_TS = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
MAX_VALID_TS = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)

TIMESTAMP = pa.timestamp("us", tz="UTC")

# ---------------------------------------------------------------------------------------------------------------
# Input tables.
# ---------------------------------------------------------------------------------------------------------------
WATCH_EVENTS = "watch_events"
SEARCH_EVENTS = "search_events"
VIDEOS = "videos"
INPUT_TABLES = (WATCH_EVENTS, SEARCH_EVENTS, VIDEOS)

WATCH_EVENTS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("video_id", pa.string()),
    pa.field("event_ts", TIMESTAMP),
    pa.field("scenario", pa.string()),
    pa.field("watch_time_s", pa.float64()),
    pa.field("video_duration_s", pa.float64()),
    pa.field("surface", pa.string()),
    pa.field("device", pa.string()),
    pa.field("liked", pa.bool_()),
    pa.field("disliked", pa.bool_()),
])

SEARCH_EVENTS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("event_ts", TIMESTAMP),
    pa.field("query", pa.string()),
])


def videos_schema() -> pa.Schema:
    """The catalog table. The embedding is a variable-length list in the file so that a row of the wrong width
    reaches validation (and the dead-letter output) instead of failing the whole file at read time."""
    return pa.schema([
        pa.field("video_id", pa.string()),
        pa.field("scenario", pa.string()),
        pa.field("content_embedding", pa.list_(pa.float32())),
        pa.field("publish_ts", TIMESTAMP),
    ])


VIDEOS_SCHEMA = videos_schema()

# Item text beside the input tables (not a pipeline input): ``<raw root>/_catalog/items.parquet``, written by the
# dataset importer (the source's titles and genres) and the sample generator (titles from topic vocabularies), read
# by whatever needs item text (reports, SID grounding in text).
CATALOG_DIR = "_catalog"
CATALOG_SCHEMA = pa.schema([
    pa.field("video_id", pa.string()),
    pa.field("item_id", pa.string()),  # the source's id, as text
    pa.field("title", pa.string()),
    pa.field("genres", pa.string()),  # "|"-separated
])

# The column whose UTC date decides a row's partition, per table.
PARTITION_COLUMN = {WATCH_EVENTS: "event_ts", SEARCH_EVENTS: "event_ts", VIDEOS: "publish_ts"}

# Columns every valid row has. Files and BigQuery keep all columns NULLABLE on purpose: a missing value must reach
# validation and be dead-lettered with a reason, not abort a whole file load.
REQUIRED_FIELDS = {
    WATCH_EVENTS: ("user_id", "video_id", "event_ts", "scenario", "watch_time_s", "video_duration_s"),
    SEARCH_EVENTS: ("user_id", "event_ts", "query"),
    VIDEOS: ("video_id", "scenario", "content_embedding", "publish_ts"),
}
OPTIONAL_DEFAULTS = {
    WATCH_EVENTS: {"surface": "other", "device": "OTHER", "liked": False, "disliked": False},
    SEARCH_EVENTS: {},
    VIDEOS: {},
}

# Columns that together identify one event: two rows with equal keys are duplicates.
DEDUP_KEY = {
    WATCH_EVENTS: ("user_id", "video_id", "event_ts", "scenario"),
    SEARCH_EVENTS: ("user_id", "event_ts", "query"),
    VIDEOS: ("video_id",),
}


def input_schema(table: str) -> pa.Schema:
    if table == WATCH_EVENTS:
        return WATCH_EVENTS_SCHEMA
    if table == SEARCH_EVENTS:
        return SEARCH_EVENTS_SCHEMA
    if table == VIDEOS:
        return videos_schema()
    raise ValueError(f"unknown input table {table!r}; expected one of {INPUT_TABLES}")


# ---------------------------------------------------------------------------------------------------------------
# Output tables written by the pipelines.
# ---------------------------------------------------------------------------------------------------------------
DEAD_LETTER = "dead_letter"
# A rejected row: the row as it came (JSON, lossless for every type the readers produce) plus why.
DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("table", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("raw_row", pa.string()),
    pa.field("partition_date", pa.string()),
])

VIDEO_SIDS = "video_sids"
VIDEO_SIDS_SCHEMA = pa.schema([
    pa.field("video_id", pa.string()),
    pa.field("scenario", pa.string()),
    pa.field("sid", pa.list_(pa.int32())),  # one code per RQ level
    pa.field("disambiguation", pa.int32()),  # 0 unless another video shares the full SID
    pa.field("sid_model_version", pa.string()),
    pa.field("assigned_date", pa.string()),
])

# ---------------------------------------------------------------------------------------------------------------
# BigQuery equivalents. Derived from the pyarrow schemas so the two can never drift apart.
# ---------------------------------------------------------------------------------------------------------------
_BQ_TYPES = {
    pa.string(): "STRING",
    pa.float64(): "FLOAT64",
    pa.float32(): "FLOAT64",
    pa.int64(): "INT64",
    pa.int32(): "INT64",
    pa.bool_(): "BOOL",
    TIMESTAMP: "TIMESTAMP",
}


def _bq_field(field: pa.Field) -> Dict:
    mode = "NULLABLE" if field.nullable else "REQUIRED"
    arrow_type = field.type
    if pa.types.is_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        mode, arrow_type = "REPEATED", arrow_type.value_type
        if pa.types.is_list(arrow_type):
            raise TypeError(f"BigQuery has no list of lists ({field.name}): wrap the inner list in a struct")
    if pa.types.is_struct(arrow_type):
        return {"name": field.name, "type": "RECORD", "mode": mode,
                "fields": [_bq_field(arrow_type.field(i)) for i in range(arrow_type.num_fields)]}
    if arrow_type not in _BQ_TYPES:
        raise TypeError(f"no BigQuery type for {field.name}: {arrow_type}")
    return {"name": field.name, "type": _BQ_TYPES[arrow_type], "mode": mode}


def bigquery_schema(schema: pa.Schema) -> Dict[str, List[Dict]]:
    """A pyarrow schema as the dict ``WriteToBigQuery(schema=...)`` and the BigQuery client accept."""
    return {"fields": [_bq_field(f) for f in schema]}


# ---------------------------------------------------------------------------------------------------------------
# Partition paths.
# ---------------------------------------------------------------------------------------------------------------
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_date(value: str) -> dt.date:
    """A ``YYYY-MM-DD`` option value as a date, with an error that names the bad value."""
    if not isinstance(value, str) or not _DATE_RE.match(value):
        raise ValueError(f"expected a date as YYYY-MM-DD, got {value!r}")
    return dt.date.fromisoformat(value)


def partition_dir(root: str, table: str, date: dt.date | str) -> str:
    date_str = date if isinstance(date, str) else date.isoformat()
    parse_date(date_str)
    return f"{str(root).rstrip('/')}/{table}/date={date_str}"


RUN_SUMMARIES = "_runs"
SUMMARY_FILE = "summary.json"


def run_summary_dir(root: str, table: str, date: dt.date | str) -> str:
    """Where a job's run summary for one partition of ``table`` goes: beside the data, in ``<table>/_runs/``, so that
    the Parquet partition holds only Parquet (readers of ``<table>/`` skip ``_``-prefixed names)."""
    return partition_dir(f"{str(root).rstrip('/')}/{table}", RUN_SUMMARIES, date)


def run_summary_path(root: str, table: str, date: dt.date | str) -> str:
    return f"{run_summary_dir(root, table, date)}/{SUMMARY_FILE}"


def day_bounds(date: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a UTC day."""
    start = dt.datetime(date.year, date.month, date.day, tzinfo=dt.timezone.utc)
    return start, start + dt.timedelta(days=1)


# ---------------------------------------------------------------------------------------------------------------
# User history snapshots (pipelines.update_histories): each user's recent events as of the end of a day.
# Nested records keep times as int64 UTC epoch microseconds (``event_ts_us``): exact, and cheap to compare.
# ---------------------------------------------------------------------------------------------------------------
HISTORIES = "histories"
DEFAULT_MAX_HISTORY_WATCHES = 1200  # the paper's "last 1,200 watches"
DEFAULT_MAX_HISTORY_SEARCHES = 100

# A watch_events row without user_id (the snapshot's key), its time as event_ts_us, plus the video's SID.
HISTORY_WATCH_TYPE = pa.struct([
    WATCH_EVENTS_SCHEMA.field("video_id"),
    WATCH_EVENTS_SCHEMA.field("scenario"),
    pa.field("event_ts_us", pa.int64()),
    *[f for f in WATCH_EVENTS_SCHEMA if f.name not in ("user_id", "video_id", "scenario", "event_ts")],
    pa.field("sid", pa.list_(pa.int32())),  # full-depth SID codes under sid_model_version
])
HISTORY_SEARCH_TYPE = pa.struct([
    pa.field("event_ts_us", pa.int64()),
    pa.field("query", pa.string()),
])
HISTORIES_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("snapshot_date", pa.string()),  # the day whose end this snapshot describes
    pa.field("sid_model_version", pa.string()),
    pa.field("watches", pa.list_(HISTORY_WATCH_TYPE)),  # oldest first, at most max_history_watches
    pa.field("searches", pa.list_(HISTORY_SEARCH_TYPE)),  # oldest first, at most max_history_searches
])


# ---------------------------------------------------------------------------------------------------------------
# User representations: what the nightly refresh publishes and downstream ranking models read.
# ---------------------------------------------------------------------------------------------------------------
USER_REPRESENTATIONS = "user_representations"
DEFAULT_REPRESENTATION_TTL_HOURS = 24.0  # the paper's 24-hour refresh cadence
# One decoded user token: a SID prefix of one scenario, its rank (0 = best) and log-probability score. A struct per
# token (not parallel lists) because BigQuery has no list of lists.
USER_TOKEN_TYPE = pa.struct([
    pa.field("scenario", pa.string()),
    pa.field("rank", pa.int32()),
    pa.field("sid", pa.list_(pa.int32())),  # prefix-L codes
    pa.field("score", pa.float32()),
    pa.field("token", pa.string()),  # the SID tokens as strings, e.g. "<sid_0_12> <sid_1_3>"
])
USER_REPRESENTATIONS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("snapshot_date", pa.string()),  # the history snapshot (end of this day) the representation describes
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("user_tokens", pa.list_(USER_TOKEN_TYPE)),  # per scenario, best first
    pa.field("model_version", pa.string()),
    pa.field("vocabulary_version", pa.string()),
    pa.field("sid_model_version", pa.string()),
    pa.field("generated_at", TIMESTAMP),
    pa.field("expires_at", TIMESTAMP),
    pa.field("carried_over_from", pa.string()),  # null, or the earlier date whose row is kept after a failure
])
# BigQuery: one table partitioned by DAY on snapshot_date (as a DATE column there, see bigquery_representations_schema).
USER_REPRESENTATIONS_PARTITION_FIELD = "partition_date"


def bigquery_representations_schema() -> Dict[str, List[Dict]]:
    """The BigQuery schema of user_representations: the Parquet columns plus a DATE column to partition on."""
    schema = bigquery_schema(USER_REPRESENTATIONS_SCHEMA)
    schema["fields"].append({"name": USER_REPRESENTATIONS_PARTITION_FIELD, "type": "DATE", "mode": "REQUIRED"})
    return schema


# ---------------------------------------------------------------------------------------------------------------
# Downstream adaptation artifacts (pipelines.build_adaptation).
# ---------------------------------------------------------------------------------------------------------------
ADAPTATION = "adaptation"
PREFIX_EMBEDDINGS = "prefix_embeddings"
PREFIX_EMBEDDINGS_SCHEMA = pa.schema([
    pa.field("scenario", pa.string()),
    pa.field("prefix_len", pa.int32()),
    pa.field("prefix", pa.list_(pa.int32())),  # the first prefix_len codes of the SIDs
    pa.field("num_videos", pa.int64()),
    pa.field("embedding", pa.list_(pa.float32())),  # mean content embedding of those videos
])


def to_epoch_us(ts: dt.datetime) -> int:
    """Exact microseconds since the epoch (float timestamps lose microseconds for present-day dates)."""
    return (ts - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)


def from_epoch_us(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))
