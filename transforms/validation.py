"""Row validation against the data contract, with a dead-letter path for every rejected row.

The pure part, ``validate_row``, checks one row and returns either the cleaned row (contract types: ids as str,
timestamps as tz-aware UTC datetimes, optional columns filled with their defaults) or a ``Rejection`` with a reason
code. ``ValidateRows`` wraps it for Beam: per-row checks, then duplicate removal (a shuffle on the event key), with
every input row ending either in ``valid`` or in ``dead`` and counted in Beam metrics.

Text: every string a valid row keeps is valid Unicode that encodes as UTF-8 (the Parquet writer and BigQuery need
that). String columns accept ``str`` or UTF-8 ``bytes``; bytes that are not UTF-8 (what the Parquet source passes on
for an undecodable value) and strings holding lone surrogates are rejected with ``bad_query_encoding`` for ``query``
and ``bad_encoding`` for every other string column (ids, scenario, surface, device), the column named in the detail.
A value made only of invisible characters (controls, format characters such as zero-width spaces, separators,
whitespace) counts as empty.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import math
import numbers
import unicodedata
from typing import Any, Dict, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms import schemas

# Reason codes, stable strings: dashboards and alerts key on them.
MISSING_FIELD = "missing_field"
BAD_ID = "bad_id"
BAD_TIMESTAMP = "bad_timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
UNKNOWN_SCENARIO = "unknown_scenario"
BAD_WATCH_TIME = "bad_watch_time"
BAD_DURATION = "bad_duration"
BAD_FIELD = "bad_field"
BAD_EMBEDDING = "bad_embedding"
EMPTY_QUERY = "empty_query"
QUERY_TOO_LONG = "query_too_long"
BAD_QUERY_ENCODING = "bad_query_encoding"  # query not UTF-8 / not valid Unicode
BAD_ENCODING = "bad_encoding"  # any other string column (ids, scenario, surface, device) not UTF-8 / valid Unicode
DUPLICATE_EVENT = "duplicate_event"
REASONS = (MISSING_FIELD, BAD_ID, BAD_TIMESTAMP, TIMESTAMP_OUT_OF_RANGE, UNKNOWN_SCENARIO, BAD_WATCH_TIME,
           BAD_DURATION, BAD_FIELD, BAD_EMBEDDING, EMPTY_QUERY, QUERY_TOO_LONG, BAD_QUERY_ENCODING, BAD_ENCODING,
           DUPLICATE_EVENT)

MAX_CATEGORY_CHARS = 64


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


# ---------------------------------------------------------------------------------------------------------------
# Field checks. Each returns the cleaned value or raises _Reject.
# ---------------------------------------------------------------------------------------------------------------
def _required(row: Dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value) and name.endswith("_id")):
        raise _Reject(MISSING_FIELD, f"{name} is missing")
    return value


# Characters that show nothing: controls (Cc), format characters (Cf: zero-width spaces and joiners, BOM, bidi
# marks, soft hyphen) and separators (Zs, Zl, Zp). A value made only of these (and whitespace) is empty.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def is_blank(text: str) -> bool:
    """True when ``text`` has no visible character (only whitespace, controls, format characters, separators)."""
    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE_CATEGORIES for ch in text)


def _as_text(value: Any, name: str, reason: str) -> Any:
    """A string column's value as text: UTF-8 bytes are decoded; bytes that are not UTF-8, and strings that cannot
    be encoded as UTF-8 (lone surrogates), are rejected with ``reason``. Other types pass through unchanged."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Reject(reason, f"{name} is not UTF-8: {err}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _Reject(reason, f"{name} is not valid Unicode: {err}")
    return value


def _clean_id(row: Dict[str, Any], name: str) -> str:
    value = _as_text(_required(row, name), name, BAD_ENCODING)
    # Integer ids (e.g. from an upstream system keyed by numbers) are accepted and normalised to strings.
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = str(int(value))
    if not isinstance(value, str):
        raise _Reject(BAD_ID, f"{name} has type {type(value).__name__}")
    if is_blank(value):
        raise _Reject(MISSING_FIELD, f"{name} is empty")
    if len(value) > schemas.MAX_ID_CHARS:
        raise _Reject(BAD_ID, f"{name} is {len(value)} chars, over {schemas.MAX_ID_CHARS}")
    return value


def parse_timestamp(value: Any) -> dt.datetime:
    """A contract timestamp as a tz-aware UTC datetime. Naive datetimes are taken as UTC (Parquet without tz)."""
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
    if isinstance(value, np.datetime64):
        micros = value.astype("datetime64[us]").astype(np.int64)
        return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(micros))
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(" UTC"):  # BigQuery's JSON rendering of TIMESTAMP
            text = text[:-4] + "+00:00"
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parse_timestamp(parsed)
    raise TypeError(f"cannot interpret {type(value).__name__} as a timestamp")


def _clean_timestamp(row: Dict[str, Any], name: str, partition_date: dt.date) -> dt.datetime:
    value = _required(row, name)
    try:
        ts = parse_timestamp(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise _Reject(BAD_TIMESTAMP, f"{name}={value!r}: {err}")
    if not schemas.MIN_VALID_TS <= ts < schemas.MAX_VALID_TS:
        raise _Reject(TIMESTAMP_OUT_OF_RANGE, f"{name}={ts.isoformat()} outside the plausible range")
    start, end = schemas.day_bounds(partition_date)
    if not start <= ts < end:
        raise _Reject(TIMESTAMP_OUT_OF_RANGE, f"{name}={ts.isoformat()} outside partition {partition_date}")
    return ts


def _clean_scenario(row: Dict[str, Any]) -> str:
    value = _as_text(_required(row, "scenario"), "scenario", BAD_ENCODING)
    if not isinstance(value, str) or value not in schemas.SCENARIOS:
        raise _Reject(UNKNOWN_SCENARIO, f"scenario={value!r}")
    return value


def _clean_number(row: Dict[str, Any], name: str, reason: str, low: float, high: float,
                  low_inclusive: bool = True) -> float:
    value = _required(row, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Reject(reason, f"{name} has type {type(value).__name__}")
    value = float(value)
    above_low = value >= low if low_inclusive else value > low
    if math.isnan(value) or not above_low or value > high:
        raise _Reject(reason, f"{name}={value!r} outside {'[' if low_inclusive else '('}{low}, {high}]")
    return value


def _clean_category(row: Dict[str, Any], name: str, default: str) -> str:
    value = row.get(name)
    if value is None:
        return default
    value = _as_text(value, name, BAD_ENCODING)
    if not isinstance(value, str) or is_blank(value) or len(value) > MAX_CATEGORY_CHARS:
        raise _Reject(BAD_FIELD, f"{name}={value!r}")
    return value


def _clean_flag(row: Dict[str, Any], name: str) -> bool:
    value = row.get(name)
    if value is None:
        return False
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise _Reject(BAD_FIELD, f"{name}={value!r} is not a boolean")


def _clean_query(row: Dict[str, Any]) -> str:
    value = _as_text(_required(row, "query"), "query", BAD_QUERY_ENCODING)
    if not isinstance(value, str):
        raise _Reject(BAD_FIELD, f"query has type {type(value).__name__}")
    if is_blank(value):  # e.g. only zero-width spaces or control characters; an accepted query is kept as it came
        raise _Reject(EMPTY_QUERY, "query is empty" if not value else
                      f"query has no visible character ({len(value)} invisible or blank chars)")
    if len(value) > schemas.MAX_QUERY_CHARS:
        raise _Reject(QUERY_TOO_LONG, f"query is {len(value)} chars, over {schemas.MAX_QUERY_CHARS}")
    return value


def _clean_embedding(row: Dict[str, Any], embedding_dim: int) -> list:
    value = _required(row, "content_embedding")
    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise _Reject(BAD_EMBEDDING, f"content_embedding is not numeric: {err}")
    if vector.shape != (embedding_dim,):
        raise _Reject(BAD_EMBEDDING, f"content_embedding has shape {vector.shape}, expected ({embedding_dim},)")
    if not np.all(np.isfinite(vector)):
        raise _Reject(BAD_EMBEDDING, "content_embedding has NaN or infinite values")
    return vector.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Whole rows.
# ---------------------------------------------------------------------------------------------------------------
def _validate_watch_event(row, partition_date, embedding_dim):
    return {
        "user_id": _clean_id(row, "user_id"),
        "video_id": _clean_id(row, "video_id"),
        "event_ts": _clean_timestamp(row, "event_ts", partition_date),
        "scenario": _clean_scenario(row),
        "watch_time_s": _clean_number(row, "watch_time_s", BAD_WATCH_TIME, 0.0, schemas.MAX_WATCH_TIME_S),
        "video_duration_s": _clean_number(row, "video_duration_s", BAD_DURATION, 0.0, schemas.MAX_WATCH_TIME_S,
                                          low_inclusive=False),
        "surface": _clean_category(row, "surface", schemas.OPTIONAL_DEFAULTS[schemas.WATCH_EVENTS]["surface"]),
        "device": _clean_category(row, "device", schemas.OPTIONAL_DEFAULTS[schemas.WATCH_EVENTS]["device"]),
        "liked": _clean_flag(row, "liked"),
        "disliked": _clean_flag(row, "disliked"),
    }


def _validate_search_event(row, partition_date, embedding_dim):
    return {
        "user_id": _clean_id(row, "user_id"),
        "event_ts": _clean_timestamp(row, "event_ts", partition_date),
        "query": _clean_query(row),
    }


def _validate_video(row, partition_date, embedding_dim):
    return {
        "video_id": _clean_id(row, "video_id"),
        "scenario": _clean_scenario(row),
        "content_embedding": _clean_embedding(row, embedding_dim),
        "publish_ts": _clean_timestamp(row, "publish_ts", partition_date),
    }


_VALIDATORS = {
    schemas.WATCH_EVENTS: _validate_watch_event,
    schemas.SEARCH_EVENTS: _validate_search_event,
    schemas.VIDEOS: _validate_video,
}


def validate_row(table: str, row: Any, partition_date: dt.date,
                 embedding_dim: int = schemas.DEFAULT_EMBEDDING_DIM) -> Tuple[Optional[Dict], Optional[Rejection]]:
    """``(clean_row, None)`` for a valid row, ``(None, Rejection)`` otherwise. Never raises for any row content."""
    if not isinstance(row, dict):
        return None, Rejection(BAD_FIELD, f"row is a {type(row).__name__}, not a mapping")
    try:
        return _VALIDATORS[table](row, partition_date, embedding_dim), None
    except _Reject as rejected:
        return None, rejected.rejection


def dedup_key(table: str, clean_row: Dict[str, Any]) -> str:
    """A stable digest of the columns that identify one event (see ``schemas.DEDUP_KEY``)."""
    parts = []
    for name in schemas.DEDUP_KEY[table]:
        value = clean_row[name]
        parts.append(value.isoformat() if isinstance(value, dt.datetime) else str(value))
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=16).hexdigest()


def _json_default(value: Any):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return {"bytes_base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


def row_to_json(row: Any) -> str:
    """The row as it came, losslessly enough to replay it: NaN stays NaN, bytes become base64, times ISO-8601.

    Always valid UTF-8: text that cannot be encoded (lone surrogates) is written as JSON ``\\uXXXX`` escapes, which
    ``json.loads`` turns back into the same string.
    """
    if isinstance(row, dict) and not all(isinstance(k, str) for k in row):
        row = {k if isinstance(k, str) else repr(k): val for k, val in row.items()}  # JSON keys are strings
    text = json.dumps(row, default=_json_default, sort_keys=True, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(row, default=_json_default, sort_keys=True, ensure_ascii=True)
    return text


def _utf8_safe(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) written as a backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def canonical_order_key(clean_row: Dict[str, Any]) -> str:
    """Among duplicates, the row kept is the smallest in this order, so the choice never depends on arrival order."""
    return row_to_json(clean_row)


def dead_letter_row(table: str, partition_date: dt.date, raw_row: Any, rejection: Rejection) -> Dict[str, str]:
    return {
        "table": table,
        "reason": rejection.reason,
        "detail": _utf8_safe(rejection.detail),
        "raw_row": row_to_json(raw_row),
        "partition_date": partition_date.isoformat(),
    }


def split_duplicates(table: str, partition_date: dt.date, rows: Sequence[Dict[str, Any]]):
    """Rows sharing one dedup key: the canonical first is kept, each other becomes a dead-letter row."""
    ordered = sorted(rows, key=canonical_order_key)
    kept = ordered[0]
    dead = [dead_letter_row(table, partition_date, row,
                            Rejection(DUPLICATE_EVENT, f"duplicate of event key {dedup_key(table, kept)}"))
            for row in ordered[1:]]
    return kept, dead


# ---------------------------------------------------------------------------------------------------------------
# Beam.
# ---------------------------------------------------------------------------------------------------------------
class _CheckRows(beam.DoFn):
    DEAD = "dead"

    def __init__(self, table: str, partition_date: dt.date, embedding_dim: int):
        super().__init__()
        self._table, self._date, self._embedding_dim = table, partition_date, embedding_dim
        namespace = f"validate.{table}"
        self._rows_in = Metrics.counter(namespace, "rows_in")
        self._dead = {reason: Metrics.counter(namespace, f"rows_dead.{reason}") for reason in REASONS}

    def process(self, row):
        self._rows_in.inc()
        clean, rejection = validate_row(self._table, row, self._date, self._embedding_dim)
        if rejection is not None:
            self._dead[rejection.reason].inc()
            yield beam.pvalue.TaggedOutput(self.DEAD, dead_letter_row(self._table, self._date, row, rejection))
        else:
            yield dedup_key(self._table, clean), clean


class _KeepFirstOfDuplicates(beam.DoFn):
    DEAD = "dead"

    def __init__(self, table: str, partition_date: dt.date):
        super().__init__()
        self._table, self._date = table, partition_date
        self._rows_out = Metrics.counter(f"validate.{table}", "rows_out")
        self._duplicates = Metrics.counter(f"validate.{table}", f"rows_dead.{DUPLICATE_EVENT}")

    def process(self, keyed_rows):
        _, rows = keyed_rows
        kept, dead = split_duplicates(self._table, self._date, list(rows))
        self._rows_out.inc()
        yield kept
        for row in dead:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(self.DEAD, row)


class ValidateRows(beam.PTransform):
    """Splits one partition's raw rows into ``valid`` (clean, deduplicated) and ``dead`` (dead-letter rows).

    Returns a dict of two PCollections, ``{"valid": ..., "dead": ...}``; every input row is in exactly one.
    """

    def __init__(self, table: str, partition_date: dt.date, embedding_dim: int = schemas.DEFAULT_EMBEDDING_DIM):
        super().__init__()
        if table not in _VALIDATORS:
            raise ValueError(f"unknown input table {table!r}")
        self._table, self._date, self._embedding_dim = table, partition_date, embedding_dim

    def expand(self, rows):
        # Output types are declared because Beam would otherwise infer a union with TaggedOutput from the generator.
        checked = rows | "CheckRows" >> beam.ParDo(
            _CheckRows(self._table, self._date, self._embedding_dim)).with_output_types(
                Tuple[str, Dict[str, Any]]).with_outputs(_CheckRows.DEAD, main="keyed")
        deduped = (checked.keyed
                   | "GroupByEventKey" >> beam.GroupByKey()
                   | "DropDuplicates" >> beam.ParDo(
                       _KeepFirstOfDuplicates(self._table, self._date)).with_outputs(
                           _KeepFirstOfDuplicates.DEAD, main="valid"))
        dead = (checked[_CheckRows.DEAD], deduped[_KeepFirstOfDuplicates.DEAD]) | "AllDead" >> beam.Flatten()
        return {"valid": deduped.valid, "dead": dead}
