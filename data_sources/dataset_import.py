"""Convert a real interaction dataset (MovieLens and the like) into the project's input tables.

A one-off bulk conversion done in memory with pyarrow and NumPy, like the sample generator
(``data_sources/sample_data.py``), not a Beam job. The output has the generator's layout:
``<root>/<table>/date=YYYY-MM-DD/part-00000.parquet`` for ``watch_events``, ``search_events`` and ``videos`` (zstd,
exactly the contract's schemas), ``<root>/_catalog/items.parquet`` (titles, for people reading results) and
``<root>/_dataset.json`` (the manifest), so every pipeline runs on it with ``--input_root=<root>
--embedding_dim=<manifest embedding_dim>``.

Source format (a directory)
---------------------------
* ``interactions.parquet`` with ``user_id``, ``item_id``, ``timestamp`` (unix seconds) and optionally ``rating``;
  or, where there is no ``interactions.parquet``, ``ratings.parquet`` (MovieLens: ``userId``, ``movieId``,
  ``rating``, ``timestamp``). Column names are mapped by ``INTERACTION_COLUMNS``.
* ``items.parquet`` with ``item_id`` (or ``movieId``), ``title``, ``content_embedding`` (a float list, every row the
  same width) and optionally ``genres``.
* optionally ``tags.parquet`` (MovieLens: ``userId``, ``movieId``, ``tag``, ``timestamp``), here or in the
  directory given as the tags dataset.
A required column that is absent (under all of its accepted names) fails with ``DatasetFormatError`` naming the file
and the column.

The mapping
-----------
* **Ids.** ``user_id = "u" + source user id``, ``video_id = "v" + source item id`` (``USER_PREFIX``,
  ``VIDEO_PREFIX``), so ids read as what they are and never look like numbers.
* **Watches.** Each interaction is one LFV watch: ``event_ts`` = its timestamp (kept as it is, to the second),
  ``scenario="LFV"``, ``surface="home"``, ``device="WEB"``, ``video_duration_s = VIDEO_DURATION_S`` (6,000 s, a
  feature film), ``watch_time_s = video_duration_s * ratio`` with ``ratio = rating / 5`` where the source has
  ratings (0.5 stars watch 10 %, 5 stars all of it: the rating carries engagement into the watch-time reward) and
  ``DEFAULT_WATCH_RATIO`` (0.8) for implicit feedback or a null rating. ``liked = rating >= 4.5``,
  ``disliked = rating <= 1.5``; both false without a rating. Ratings must lie in [0, 5].
* **Order and duplicates.** MovieLens rates in bulk sessions: about half of a user's consecutive events share one
  timestamp, and the source file's order is the order the dataset means (which item is a user's last decides
  leave-one-out's test item). So equal timestamps of one user are made distinct in source order: the k-th row of a
  run of equal timestamps gets k microseconds added (``TIE_BREAK``; within the second, so the day never changes).
  Rows are written ordered by (``user_id``, ``event_ts``), comparing the id *strings* as the pipelines do
  ("u10" < "u2"). Exact duplicate (user, item, timestamp) rows are dropped, the first in source order kept, and
  counted.
* **Videos.** Every item of ``items.parquet`` is one LFV video with its ``content_embedding`` (as float32; the width
  is inferred from the file and recorded as ``embedding_dim``). ``publish_ts`` is midnight UTC of the day of the
  item's first interaction anywhere in the source, clamped into [first_date, last_date] of the import: items first
  seen before the window, and items nobody interacted with, are in the first day's catalog. So no watch ever
  precedes its video's publish time, and a video's SID exists from the day of its first watch. Interactions with
  items missing from ``items.parquet`` are dropped and counted.
* **Searches.** Each tag is one search: ``user_id``, ``event_ts`` = the tag's timestamp, ``query`` = the tag text
  (item ignored). Tags of the main dataset (its own ``tags.parquet``, or a tags dataset that is the same directory)
  belong to the same users, so their searches interleave with those users' watches (prefix ``"u"``). Tags from a
  *different* dataset belong to other people: their users get ``TAG_USER_PREFIX`` (``"t"``) so they never collide
  with the main users. Tags that are empty or longer than ``schemas.MAX_QUERY_CHARS``, and exact duplicate
  (user, timestamp, query) searches, are dropped and counted. ``shift_tags_days`` moves a foreign tag set in time
  (MovieLens-latest-small's tags, 2006-2016, do not overlap MovieLens-1M, 2000-2003).
* **Dates.** Every table is partitioned by UTC day (an event at 23:59:59 and one at 00:00:00 are on two days). The
  import covers [first_date, last_date]: the days of the main dataset's interactions, narrowed to the requested
  ``start_date``/``end_date`` (or the last ``last_days`` days) and to the contract's plausible range
  (``schemas.MIN_VALID_TS`` .. ``MAX_VALID_TS``: MovieLens-latest-small's 1995-1999 ratings are outside it, and
  validation would reject them anyway). Events outside are dropped and counted. Every day in the range gets a
  partition of all three tables, empty where nothing happened, so a daily job runs on any day of the range.

The manifest (``_dataset.json``) records the source files and columns used, the mapping constants, ``embedding_dim``,
``dates``, ``first_date``/``last_date``, ``row_counts`` (per table per date), ``totals``, what was dropped and why
(``dropped``), distinct users/videos, and ``densest_dates`` (the days with the most watches: good days to run a
pipeline on).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_sources.sample_data import write_landing_marker
from transforms import outputs, schemas

# ---------------------------------------------------------------------------------------------------------------
# The mapping's constants (recorded in the manifest).
# ---------------------------------------------------------------------------------------------------------------
USER_PREFIX = "u"
VIDEO_PREFIX = "v"
TAG_USER_PREFIX = "t"  # users of a tags dataset other than the main one
SCENARIO = "LFV"
SURFACE = "home"
DEVICE = "WEB"
VIDEO_DURATION_S = 6000.0  # 100 minutes: a feature film
MAX_RATING = 5.0  # ratio = rating / MAX_RATING
DEFAULT_WATCH_RATIO = 0.8  # implicit feedback (no rating): a watch of most of the film
LIKE_MIN_RATING = 4.5
DISLIKE_MAX_RATING = 1.5
DENSEST_DATES = 10  # how many of the busiest days the manifest lists
TIE_BREAK = "equal timestamps of a user: +k microseconds for the k-th row in source order"

INTERACTIONS_FILES = ("interactions.parquet", "ratings.parquet")  # the first that exists is used
ITEMS_FILE = "items.parquet"
TAGS_FILE = "tags.parquet"

# Canonical column -> the names accepted for it in the source, in order of preference.
INTERACTION_COLUMNS = {"user_id": ("user_id", "userId"), "item_id": ("item_id", "movieId"),
                       "timestamp": ("timestamp",), "rating": ("rating",)}
INTERACTION_REQUIRED = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = {"item_id": ("item_id", "movieId"), "title": ("title",), "content_embedding": ("content_embedding",),
                "genres": ("genres",)}
ITEM_REQUIRED = ("item_id", "title", "content_embedding")
TAG_COLUMNS = {"user_id": ("user_id", "userId"), "tag": ("tag",), "timestamp": ("timestamp",)}
TAG_REQUIRED = ("user_id", "tag", "timestamp")

MANIFEST_FILE = "_dataset.json"
PART_FILE = "part-00000.parquet"
# Written by the sample generator; removed so a root never mixes an import with a stale synthetic ground truth.
STALE_DIRS = ("_truth",)

SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US
_EPOCH = dt.date(1970, 1, 1)


class DatasetFormatError(ValueError):
    """A source file that is missing, lacks a required column, or holds values the mapping cannot convert."""


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    """What to import. The same config over the same files always gives byte-identical output."""

    dataset: str  # directory with interactions.parquet (or ratings.parquet) and items.parquet
    tags_dataset: Optional[str] = None  # directory with tags.parquet; None: the dataset's own, if it has one
    use_tags: bool = True
    start_date: Optional[str] = None  # first UTC day to import, YYYY-MM-DD (default: the data's first)
    end_date: Optional[str] = None  # last UTC day to import, inclusive (default: the data's last)
    last_days: Optional[int] = None  # instead of start_date: this many days ending on the (window's) last day
    shift_tags_days: int = 0  # whole days added to every tag timestamp (to move a foreign tag set into the window)

    def __post_init__(self):
        for name in ("start_date", "end_date"):
            if getattr(self, name) is not None:
                schemas.parse_date(getattr(self, name))
        if self.start_date and self.end_date and self.end_date < self.start_date:
            raise ValueError(f"end_date {self.end_date} is before start_date {self.start_date}")
        if self.last_days is not None:
            if self.start_date is not None:
                raise ValueError("give either start_date or last_days, not both")
            if self.last_days < 1:
                raise ValueError(f"last_days must be >= 1, got {self.last_days}")


@dataclasses.dataclass(frozen=True, eq=False)
class ImportedDataset:
    """The converted tables, keyed ``tables[table][date]`` (every date in ``dates``), and what the manifest says."""

    tables: Dict[str, Dict[str, pa.Table]]
    catalog: pa.Table  # schemas.CATALOG_SCHEMA
    dates: List[str]
    embedding_dim: int
    info: Dict  # source, mapping, dropped, users/videos: the manifest's descriptive part

    def table(self, name: str) -> pa.Table:
        """All partitions of one table as a single table, in date order."""
        return pa.concat_tables([self.tables[name][date] for date in self.dates])

    def row_counts(self) -> Dict[str, Dict[str, int]]:
        return {name: {date: by_date[date].num_rows for date in self.dates} for name, by_date in self.tables.items()}

    def densest_dates(self, count: int = DENSEST_DATES) -> List[Dict]:
        """The days with the most watches (ties: the earlier day first), with their searches and active users."""
        counts = self.row_counts()
        ranked = sorted(self.dates, key=lambda d: (-counts[schemas.WATCH_EVENTS][d], d))[:count]
        return [{"date": d, "watch_events": counts[schemas.WATCH_EVENTS][d],
                 "search_events": counts[schemas.SEARCH_EVENTS][d],
                 "watch_users": len(pc.unique(self.tables[schemas.WATCH_EVENTS][d]["user_id"]))}
                for d in ranked if counts[schemas.WATCH_EVENTS][d] > 0]

    def manifest(self) -> Dict:
        counts = self.row_counts()
        return {
            **self.info,
            "embedding_dim": self.embedding_dim,
            "dates": list(self.dates),
            "first_date": self.dates[0],
            "last_date": self.dates[-1],
            "row_counts": counts,
            "totals": {name: sum(by_date.values()) for name, by_date in counts.items()},
            "dates_with_watches": sum(1 for n in counts[schemas.WATCH_EVENTS].values() if n),
            "densest_dates": self.densest_dates(),
            "planted_bad_rows": {},  # real data: nothing planted (the sample generator's manifest has this key)
        }


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------
def import_dataset(config: ImportConfig) -> ImportedDataset:
    """Read the source files and convert them into the three input tables, partitioned by UTC day."""
    source = _read_source(config)
    dropped: Dict[str, int] = {}
    events = _interaction_events(source, dropped)
    first_day, last_day = _window(config, int(events["day"][events["in_contract"]].min()),
                                  int(events["day"][events["in_contract"]].max()))
    watches = _watches(source, events, first_day, last_day, dropped)
    publish_day = _publish_days(source, events, first_day, last_day)
    if source.tags is not None:
        searches = _searches(source.tags_path, source.tags, source.tags_same_users, config.shift_tags_days,
                             first_day, last_day, dropped)
    else:
        searches = _empty_searches()

    dates = [_day_date(d) for d in range(first_day, last_day + 1)]
    video_order = np.lexsort((_string_ranks(source.video_names), publish_day))
    tables = {
        schemas.VIDEOS: _split_by_day(_video_table(source, publish_day, video_order),
                                      publish_day[video_order] - first_day, dates),
        schemas.WATCH_EVENTS: _split_by_day(watches["table"], watches["day"] - first_day, dates),
        schemas.SEARCH_EVENTS: _split_by_day(searches["table"], searches["day"] - first_day, dates),
    }
    info = {
        "generator": "pipelines.import_dataset",
        "config": dataclasses.asdict(config),
        "source": {**source.describe(), "interactions_span": events["span"], "tags_span": searches["span"]},
        "mapping": _mapping(source),
        "dropped": dropped,
        "users": {"watch": len(pc.unique(watches["table"]["user_id"])),
                  "search": len(pc.unique(searches["table"]["user_id"]))},
        "videos": {"total": len(source.item_ids), "watched": len(pc.unique(watches["table"]["video_id"]))},
    }
    return ImportedDataset(tables=tables, catalog=_catalog_table(source, video_order), dates=dates,
                           embedding_dim=source.embedding_dim, info=info)


def write_imported_dataset(dataset: ImportedDataset, output_root: str) -> Dict:
    """Write the dataset under ``output_root`` (a local directory) and return the manifest written.

    Each ``<table>/date=D/`` partition gets its data file, then its landing marker ``_SUCCESS`` (what the daily DAG's
    first sensor waits for). The input-table directories and ``_catalog`` (and a stale ``_truth`` of the sample
    generator) are removed first, so a rerun replaces the previous output instead of mixing with it; nothing else
    under the root is touched.
    """
    os.makedirs(output_root, exist_ok=True)
    for owned_dir in (*schemas.INPUT_TABLES, schemas.CATALOG_DIR, *STALE_DIRS):
        shutil.rmtree(os.path.join(output_root, owned_dir), ignore_errors=True)

    for table_name, by_date in dataset.tables.items():
        for date, rows in by_date.items():
            partition = schemas.partition_dir(output_root, table_name, date)
            os.makedirs(partition)
            pq.write_table(rows, os.path.join(partition, PART_FILE), compression="zstd")
            write_landing_marker(partition)  # last: the day of this table has landed (the DAG's first sensor)
    os.makedirs(os.path.join(output_root, schemas.CATALOG_DIR))
    pq.write_table(dataset.catalog, os.path.join(output_root, schemas.CATALOG_DIR, "items.parquet"), compression="zstd")

    manifest = dataset.manifest()
    outputs.write_json_atomically(os.path.join(output_root, MANIFEST_FILE), manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Reading the source.
# ---------------------------------------------------------------------------------------------------------------
class _Columns(dict):
    """Canonical column name -> chunked array, plus which source column each came from."""

    def __init__(self, columns: Dict[str, pa.ChunkedArray], mapped: Dict[str, str], num_rows: int):
        super().__init__(columns)
        self.mapped = mapped
        self.num_rows = num_rows


@dataclasses.dataclass(frozen=True, eq=False)
class _Source:
    """The source files' columns, checked, plus the catalog's ids in both forms."""

    interactions_path: str
    interactions: _Columns
    items_path: str
    items: _Columns
    tags_path: Optional[str]
    tags: Optional[_Columns]
    tags_same_users: bool
    item_ids: np.ndarray  # source ids (int64 or str objects), unique
    video_names: np.ndarray  # VIDEO_PREFIX + id, aligned with item_ids
    embeddings: pa.Array  # list<float32>, aligned with item_ids
    embedding_dim: int

    @property
    def has_ratings(self) -> bool:
        return "rating" in self.interactions

    def describe(self) -> Dict:
        return {
            "dataset": os.path.dirname(self.interactions_path),
            "interactions_file": os.path.basename(self.interactions_path),
            "interactions_columns": self.interactions.mapped,
            "items_file": os.path.basename(self.items_path),
            "items_columns": self.items.mapped,
            "tags_file": self.tags_path,
            "tags_columns": self.tags.mapped if self.tags is not None else None,
            "tags_users": (None if self.tags is None else "the dataset's own" if self.tags_same_users
                           else f"another dataset's, prefixed {TAG_USER_PREFIX!r}"),
            "rows": {"interactions": self.interactions.num_rows, "items": self.items.num_rows,
                     "tags": self.tags.num_rows if self.tags is not None else 0},
        }


def _read_source(config: ImportConfig) -> _Source:
    interactions_path = _interactions_file(config.dataset)
    interactions = _read_columns(interactions_path, INTERACTION_COLUMNS, INTERACTION_REQUIRED)
    items_path = os.path.join(config.dataset, ITEMS_FILE)
    items = _read_columns(items_path, ITEM_COLUMNS, ITEM_REQUIRED)
    tags_path, tags_same_users = _tags_file(config)
    tags = _read_columns(tags_path, TAG_COLUMNS, TAG_REQUIRED) if tags_path else None
    embeddings, dim = _embeddings(items_path, items["content_embedding"])
    item_ids = _ids(items_path, "item_id", items["item_id"])
    _check_unique(items_path, item_ids)
    video_names = np.array([VIDEO_PREFIX + _text(i) for i in item_ids], dtype=object)
    return _Source(interactions_path, interactions, items_path, items, tags_path, tags, tags_same_users,
                   item_ids, video_names, embeddings, dim)


def _interactions_file(dataset: str) -> str:
    if not os.path.isdir(dataset):
        raise DatasetFormatError(f"dataset directory {dataset} does not exist")
    for name in INTERACTIONS_FILES:
        path = os.path.join(dataset, name)
        if os.path.exists(path):
            return path
    raise DatasetFormatError(f"{dataset}: no interactions file; expected one of {list(INTERACTIONS_FILES)}")


def _tags_file(config: ImportConfig) -> Tuple[Optional[str], bool]:
    """The tags file to read (or None) and whether its users are the main dataset's users."""
    if not config.use_tags:
        return None, True
    if config.tags_dataset is None:
        own = os.path.join(config.dataset, TAGS_FILE)
        return (own if os.path.exists(own) else None), True
    path = os.path.join(config.tags_dataset, TAGS_FILE)
    if not os.path.exists(path):
        raise DatasetFormatError(f"tags dataset {config.tags_dataset} has no {TAGS_FILE}")
    return path, os.path.realpath(config.tags_dataset) == os.path.realpath(config.dataset)


def _read_columns(path: str, accepted: Dict[str, Sequence[str]], required: Sequence[str]) -> _Columns:
    """The file's columns under their canonical names; an absent required column raises, naming file and column."""
    if not os.path.exists(path):
        raise DatasetFormatError(f"{path} does not exist")
    try:
        names = pq.read_schema(path).names
    except Exception as err:  # pyarrow raises several types for a corrupt footer
        raise DatasetFormatError(f"{path}: cannot read Parquet file: {err}") from err
    mapped = {}
    for canonical, aliases in accepted.items():
        found = next((a for a in aliases if a in names), None)
        if found is not None:
            mapped[canonical] = found
        elif canonical in required:
            spelled = " or ".join(repr(a) for a in aliases)
            raise DatasetFormatError(f"{path}: missing required column {spelled}; it has {names}")
    table = pq.read_table(path, columns=list(mapped.values()))
    return _Columns({canonical: table[source] for canonical, source in mapped.items()}, mapped, table.num_rows)


def _ids(path: str, name: str, column: pa.ChunkedArray, allow_null: bool = False) -> np.ndarray:
    """Integer ids as int64 (nulls as a sentinel), string ids as an object array (nulls as None)."""
    kind = column.type
    if pa.types.is_integer(kind):
        if column.null_count and not allow_null:
            raise DatasetFormatError(f"{path}: column {name!r} has {column.null_count} null ids")
        return column.fill_null(np.iinfo(np.int64).min).to_numpy().astype(np.int64)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if column.null_count and not allow_null:
            raise DatasetFormatError(f"{path}: column {name!r} has {column.null_count} null ids")
        return np.array(column.to_pylist(), dtype=object)
    raise DatasetFormatError(f"{path}: column {name!r} has type {kind}; expected integer or string ids")


def _is_null_id(ids: np.ndarray) -> np.ndarray:
    if ids.dtype == object:
        return np.array([v is None for v in ids], dtype=bool)
    return ids == np.iinfo(np.int64).min


def _timestamps_us(path: str, column: pa.ChunkedArray) -> np.ndarray:
    """Unix seconds (integer or float) or a timestamp column as int64 microseconds; nulls as a sentinel."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        values = column.cast(pa.timestamp("us", tz=kind.tz)).cast(pa.int64())
        return values.fill_null(np.iinfo(np.int64).min).to_numpy()
    if pa.types.is_integer(kind):
        return column.cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy() * SECOND_US
    if pa.types.is_floating(kind):
        seconds = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        micros = np.round(np.nan_to_num(seconds, nan=0.0) * SECOND_US).astype(np.int64)
        return np.where(np.isfinite(seconds), micros, np.iinfo(np.int64).min)
    raise DatasetFormatError(f"{path}: column 'timestamp' has type {kind}; expected unix seconds or a timestamp")


def _ratings(path: str, column: Optional[pa.ChunkedArray], rows: int) -> np.ndarray:
    """Ratings as float64, NaN where absent."""
    if column is None:
        return np.full(rows, np.nan)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise DatasetFormatError(f"{path}: column 'rating' has type {column.type}; expected numbers")
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = np.isfinite(values) & ((values < 0) | (values > MAX_RATING))
    if bad.any():
        raise DatasetFormatError(f"{path}: column 'rating' has {int(bad.sum())} values outside [0, {MAX_RATING:g}], "
                                 f"e.g. {values[bad][0]!r}")
    return values


def _embeddings(path: str, column: pa.ChunkedArray) -> Tuple[pa.Array, int]:
    """The embeddings as a list<float32> array and their common width."""
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise DatasetFormatError(f"{path}: column 'content_embedding' has type {kind}; expected a list of floats")
    if column.null_count:
        raise DatasetFormatError(f"{path}: column 'content_embedding' has {column.null_count} null rows")
    if len(column) == 0:
        raise DatasetFormatError(f"{path}: no items")
    lengths = pc.list_value_length(column).to_numpy()
    if lengths.min() != lengths.max() or lengths[0] == 0:
        raise DatasetFormatError(f"{path}: column 'content_embedding' rows differ in width "
                                 f"({lengths.min()}..{lengths.max()}); every item needs the same width")
    return column.combine_chunks().cast(pa.list_(pa.float32())), int(lengths[0])


def _check_unique(path: str, item_ids: np.ndarray) -> None:
    unique, counts = np.unique(item_ids, return_counts=True)
    if (counts > 1).any():
        raise DatasetFormatError(f"{path}: {int((counts > 1).sum())} item ids occur more than once, "
                                 f"e.g. {unique[counts > 1][0]!r}")


def _not_null(*arrays: np.ndarray) -> np.ndarray:
    valid = np.ones(len(arrays[0]), dtype=bool)
    for values in arrays:
        valid &= ~_is_null_id(values)
    return valid


# ---------------------------------------------------------------------------------------------------------------
# Converting.
# ---------------------------------------------------------------------------------------------------------------
def _text(value) -> str:
    return str(int(value)) if isinstance(value, (int, np.integer)) else str(value)


def _lookup(keys: np.ndarray, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """For each value, its index in ``keys`` (unique), or -1 where it is absent or invalid."""
    if keys.dtype != values.dtype:  # integer ids on one side, strings on the other: compare as text
        keys = np.array([_text(k) for k in keys], dtype=object)
        values = np.array([_text(v) if ok else "" for v, ok in zip(values, valid)], dtype=object)
    sorter = np.argsort(keys, kind="stable")
    safe = np.where(valid, values, keys[sorter[0]])  # any valid key for invalid rows; masked below
    position = np.clip(np.searchsorted(keys, safe, sorter=sorter), 0, len(keys) - 1)
    index = sorter[position]
    return np.where(valid & (keys[index] == safe), index, -1)


def _in_contract_range(ts_us: np.ndarray) -> np.ndarray:
    return (ts_us >= schemas.to_epoch_us(schemas.MIN_VALID_TS)) & (ts_us < schemas.to_epoch_us(schemas.MAX_VALID_TS))


def _window(config: ImportConfig, data_first: int, data_last: int) -> Tuple[int, int]:
    """[first, last] epoch days to import: the data's days narrowed to the requested ones."""
    last = data_last if config.end_date is None else min(data_last, _date_day(config.end_date))
    if config.last_days is not None:
        first = max(data_first, last - config.last_days + 1)
    else:
        first = data_first if config.start_date is None else max(data_first, _date_day(config.start_date))
    if first > last:
        span = f"{_day_date(data_first)}..{_day_date(data_last)}"
        raise DatasetFormatError(f"{config.dataset}: no interactions in the requested window "
                                 f"{config.start_date or '...'}..{config.end_date or '...'}; the data spans {span}")
    return first, last


def _date_day(date: str) -> int:
    return (schemas.parse_date(date) - _EPOCH).days


def _day_date(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=int(day))).isoformat()


def _id_strings(prefix: str, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct ids as prefixed strings (an object array) and each row's index into them."""
    distinct, code = np.unique(ids, return_inverse=True)
    return np.array([prefix + _text(v) for v in distinct], dtype=object), code.reshape(-1)


def _string_ranks(names: np.ndarray) -> np.ndarray:
    """Each name's position in sorted (code point, i.e. UTF-8 byte) order."""
    ranks = np.empty(len(names), np.int64)
    ranks[np.argsort(names.astype(str), kind="stable")] = np.arange(len(names))
    return ranks


def _first_of_runs(*keys: np.ndarray) -> np.ndarray:
    """In rows sorted so that equal keys are adjacent: True for the first row of each run of equal keys."""
    first = np.ones(len(keys[0]), dtype=bool)
    if len(first) > 1:
        same = np.ones(len(first) - 1, dtype=bool)
        for values in keys:
            same &= values[1:] == values[:-1]
        first[1:] = ~same
    return first


def _interaction_events(source: _Source, dropped: Dict[str, int]) -> Dict[str, np.ndarray]:
    """The interactions as arrays, with masks of the rows that can be placed (``known``: a non-null key and an item
    of the catalog) and that lie in the contract's plausible time range (``in_contract``)."""
    path, columns = source.interactions_path, source.interactions
    user = _ids(path, "user_id", columns["user_id"], allow_null=True)
    item = _ids(path, "item_id", columns["item_id"], allow_null=True)
    ts_us = _timestamps_us(path, columns["timestamp"])
    rating = _ratings(path, columns.get("rating"), len(ts_us))
    valid = _not_null(user, item, ts_us)
    item_index = _lookup(source.item_ids, item, valid)
    known = valid & (item_index >= 0)
    day = np.where(known, np.floor_divide(ts_us, DAY_US), 0)
    in_contract = known & _in_contract_range(ts_us)
    dropped["interactions_null_key"] = int((~valid).sum())
    dropped["interactions_unknown_item"] = int((valid & ~known).sum())
    dropped["interactions_outside_contract_range"] = int((known & ~in_contract).sum())
    if not in_contract.any():
        raise DatasetFormatError(f"{path}: no interaction of a known item between "
                                 f"{schemas.MIN_VALID_TS.date()} and {schemas.MAX_VALID_TS.date()}")
    return {"user": user, "item_index": item_index, "ts_us": ts_us, "rating": rating, "day": day, "known": known,
            "in_contract": in_contract, "span": [_day_date(day[known].min()), _day_date(day[known].max())]}


def _watches(source: _Source, events: Dict[str, np.ndarray], first_day: int, last_day: int,
             dropped: Dict[str, int]) -> Dict:
    """The window's interactions as watch rows ordered by (day, user, time), comparing id strings; of exact
    duplicate (user, item, time) rows only the first in source order is kept.

    Equal times of one user (bulk rating sessions, day-resolution data) are made distinct in SOURCE order: the k-th
    row (0-based, in the source file's order) of a run of equal timestamps gets ``k`` microseconds added
    (``TIE_BREAK``). Every pipeline orders a user's events by time, so the source's order decides which item comes
    first and which is last (leave-one-out's test item), not the video ids. The offset stays within the second (a
    run of more than a million rows in one second is refused), so the day of every row is unchanged."""
    day = events["day"]
    keep = np.nonzero(events["in_contract"] & (day >= first_day) & (day <= last_day))[0]  # in source order
    dropped["interactions_outside_window"] = int(events["in_contract"].sum()) - len(keep)
    user_names, user_code = _id_strings(USER_PREFIX, events["user"][keep])
    day, ts_us, item, rating = (events[name][keep] for name in ("day", "ts_us", "item_index", "rating"))
    user_rank = _string_ranks(user_names)[user_code]
    # Exact duplicates: the first in source order is kept (lexsort is stable, and rows are in source order).
    by_key = np.lexsort((item, ts_us, user_rank))
    duplicate = np.zeros(len(keep), dtype=bool)
    duplicate[by_key] = ~_first_of_runs(user_rank[by_key], ts_us[by_key], item[by_key])
    dropped["interactions_duplicate"] = int(duplicate.sum())
    unique = ~duplicate
    day, ts_us, item, rating, user_rank, user_code = (a[unique] for a in (day, ts_us, item, rating, user_rank,
                                                                           user_code))
    order = np.lexsort((np.arange(len(ts_us)), ts_us, user_rank, day))  # ties: source order
    day, ts_us, item, rating, user_rank, user_code = (a[order] for a in (day, ts_us, item, rating, user_rank,
                                                                          user_code))
    ts_us = ts_us + _tie_offsets_us(user_rank, ts_us)
    return {"table": _watch_table(user_names, user_code, source.video_names, item, ts_us, rating), "day": day}


def _tie_offsets_us(user_rank: np.ndarray, ts_us: np.ndarray) -> np.ndarray:
    """In rows sorted by (user, time, source order): 0, 1, 2, ... microseconds along each run of equal (user, time)."""
    first = _first_of_runs(user_rank, ts_us)
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(ts_us)), 0))
    offsets = np.arange(len(ts_us)) - run_start
    if len(offsets) and offsets.max() >= SECOND_US:
        raise DatasetFormatError(f"a user has {offsets.max() + 1} interactions with one timestamp; at most "
                                 f"{SECOND_US} can be ordered within its second")
    if len(ts_us) > 1:  # sub-second source times: the offsets must not reorder or merge distinct events
        same_user = user_rank[1:] == user_rank[:-1]
        shifted = ts_us + offsets
        if (same_user & (shifted[1:] <= shifted[:-1])).any():
            raise DatasetFormatError("timestamps closer than the tie-break offsets (sub-second source times); "
                                     "order ties in the source file instead")
    return offsets


def _publish_days(source: _Source, events: Dict[str, np.ndarray], first_day: int, last_day: int) -> np.ndarray:
    """Per item: the day of its first interaction anywhere in the source, clamped into the window; never
    interacted: the window's first day."""
    never = np.iinfo(np.int64).max
    first_seen = np.full(len(source.item_ids), never)
    known = events["known"]
    np.minimum.at(first_seen, events["item_index"][known], events["day"][known])
    return np.clip(np.where(first_seen == never, first_day, first_seen), first_day, last_day)


def _mapping(source: _Source) -> Dict:
    rated = source.has_ratings
    return {
        "user_prefix": USER_PREFIX, "video_prefix": VIDEO_PREFIX,
        "tag_user_prefix": (None if source.tags is None else USER_PREFIX if source.tags_same_users
                            else TAG_USER_PREFIX),
        "scenario": SCENARIO, "surface": SURFACE, "device": DEVICE, "video_duration_s": VIDEO_DURATION_S,
        "has_ratings": rated,
        "watch_ratio": f"rating / {MAX_RATING:g}" if rated else DEFAULT_WATCH_RATIO,
        "unrated_watch_ratio": DEFAULT_WATCH_RATIO,
        "liked": f"rating >= {LIKE_MIN_RATING:g}" if rated else False,
        "disliked": f"rating <= {DISLIKE_MAX_RATING:g}" if rated else False,
        "publish_ts": "midnight UTC of the item's first interaction day, clamped into [first_date, last_date]",
        "row_order": "user_id, event_ts (id strings)",
        "tie_break": TIE_BREAK,
    }


def _watch_ratio(rating: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(rating), DEFAULT_WATCH_RATIO, rating / MAX_RATING)


def _strings(names: np.ndarray, index: np.ndarray) -> pa.Array:
    """``names[index]`` as a pyarrow string array, built by a take from the distinct names (fast for many rows)."""
    return pa.array(names, pa.string()).take(pa.array(index, pa.int64()))


def _constant(value: str, rows: int) -> pa.Array:
    return _strings(np.array([value], dtype=object), np.zeros(rows, np.int64))


def _watch_table(user_names: np.ndarray, user_code: np.ndarray, video_names: np.ndarray, video_index: np.ndarray,
                 ts_us: np.ndarray, rating: np.ndarray) -> pa.Table:
    n = len(ts_us)
    rated = ~np.isnan(rating)
    return pa.Table.from_arrays([
        _strings(user_names, user_code),
        _strings(video_names, video_index),
        pa.array(ts_us, schemas.TIMESTAMP),
        _constant(SCENARIO, n),
        pa.array(VIDEO_DURATION_S * _watch_ratio(rating), pa.float64()),
        pa.array(np.full(n, VIDEO_DURATION_S), pa.float64()),
        _constant(SURFACE, n),
        _constant(DEVICE, n),
        pa.array(rated & (rating >= LIKE_MIN_RATING), pa.bool_()),
        pa.array(rated & (rating <= DISLIKE_MAX_RATING), pa.bool_()),
    ], schema=schemas.WATCH_EVENTS_SCHEMA)


def _video_table(source: _Source, publish_day: np.ndarray, order: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays([
        _strings(source.video_names, order),
        _constant(SCENARIO, len(order)),
        source.embeddings.take(pa.array(order)),
        pa.array(publish_day[order].astype(np.int64) * DAY_US, schemas.TIMESTAMP),
    ], schema=schemas.VIDEOS_SCHEMA)


def _catalog_table(source: _Source, order: np.ndarray) -> pa.Table:
    take = pa.array(order)
    items = source.items
    genres = items["genres"].take(take).cast(pa.string()) if "genres" in items else pa.nulls(len(order), pa.string())
    return pa.Table.from_arrays([
        _strings(source.video_names, order),
        pa.array([_text(i) for i in source.item_ids[order]], pa.string()),
        items["title"].take(take).cast(pa.string()),
        genres,
    ], schema=schemas.CATALOG_SCHEMA)


def _empty_searches() -> Dict:
    return {"table": schemas.SEARCH_EVENTS_SCHEMA.empty_table(), "day": np.zeros(0, np.int64), "span": None}


def _searches(path: str, tags: _Columns, same_users: bool, shift_days: int, first_day: int, last_day: int,
              dropped: Dict[str, int]) -> Dict:
    """Tags as search rows inside [first_day, last_day], ordered by (day, user, time, query); counts what is dropped."""
    user = _ids(path, "user_id", tags["user_id"], allow_null=True)
    ts_us = _timestamps_us(path, tags["timestamp"])
    if not (pa.types.is_string(tags["tag"].type) or pa.types.is_large_string(tags["tag"].type)):
        raise DatasetFormatError(f"{path}: column 'tag' has type {tags['tag'].type}; expected text")
    query = np.array(tags["tag"].to_pylist(), dtype=object)
    valid = _not_null(user, ts_us) & np.array([q is not None for q in query], dtype=bool)
    dropped["tags_null"] = int((~valid).sum())
    ts_us = np.where(valid, ts_us, 0) + np.where(valid, shift_days * DAY_US, 0)
    usable = valid & np.array([q is not None and q.strip() != "" and len(q) <= schemas.MAX_QUERY_CHARS
                               for q in query], dtype=bool)
    dropped["tags_empty_or_overlong"] = int((valid & ~usable).sum())
    day = np.floor_divide(ts_us, DAY_US)
    span = [_day_date(day[usable].min()), _day_date(day[usable].max())] if usable.any() else None
    keep = usable & _in_contract_range(ts_us) & (day >= first_day) & (day <= last_day)
    dropped["tags_outside_window"] = int((usable & ~keep).sum())

    prefix = USER_PREFIX if same_users else TAG_USER_PREFIX
    if not keep.any():
        dropped["tags_duplicate"] = 0
        return {**_empty_searches(), "span": span}
    user_names, user_code = _id_strings(prefix, user[keep])
    queries, query_code = np.unique(query[keep].astype(str), return_inverse=True)
    day, ts_us = day[keep], ts_us[keep]
    order = np.lexsort((query_code, ts_us, _string_ranks(user_names)[user_code], day))
    day, ts_us, user_code, query_code = day[order], ts_us[order], user_code[order], query_code[order]
    unique = _first_of_runs(user_code, ts_us, query_code)
    dropped["tags_duplicate"] = int((~unique).sum())
    table = pa.Table.from_arrays([
        _strings(user_names, user_code[unique]),
        pa.array(ts_us[unique], schemas.TIMESTAMP),
        _strings(queries.astype(object), query_code[unique]),
    ], schema=schemas.SEARCH_EVENTS_SCHEMA)
    return {"table": table, "day": day[unique], "span": span}


def _split_by_day(table: pa.Table, day: np.ndarray, dates: List[str]) -> Dict[str, pa.Table]:
    """Rows sorted by day (0-based within the window), one zero-copy slice per date; empty days get empty tables."""
    bounds = np.searchsorted(day, np.arange(len(dates) + 1))
    return {date: table.slice(bounds[d], bounds[d + 1] - bounds[d]) for d, date in enumerate(dates)}
