"""Row validation against the data contract, with a dead-letter path for every rejected row.

The pure part, ``validate_row``, checks one row and returns either the cleaned row (contract types: ids as str,
timestamps as tz-aware UTC datetimes, optional columns filled with their defaults) or a ``Rejection`` with a reason
code. ``ValidateRange`` (what ``validate_inputs`` runs) applies it to Arrow batches of a whole date range
(``validate_batch``: Arrow kernels pass rows that are plainly valid, the rest go through ``validate_row``), then
drops duplicates and writes each (table, date, shard) in one shuffle. ``ValidateRows`` does the same for a
PCollection of row dicts (per-row checks, then duplicate removal on the event key). Either way every input row ends
in ``valid`` or in ``dead`` and is counted in Beam metrics.

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
import pyarrow as pa
import pyarrow.compute as pc
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
# Columnar: whole Arrow record batches, the rows' verdicts exactly those of ``validate_row``.
# ---------------------------------------------------------------------------------------------------------------
# The common case, a column already in its contract type with plainly good values, is checked with Arrow kernels;
# only the rows that do not pass those checks go through ``validate_row`` one by one, so every reason, detail and
# edge case (bytes, surrogates, integer ids, odd types) is decided by the one row-level implementation. The fast
# checks are sufficient conditions for ``validate_row`` to accept a row and give the same clean values.
_VISIBLE_ASCII = "[!-~]"  # for ASCII text, "has one of these" is exactly "not is_blank"
_FLOAT_TYPES = (pa.float16(), pa.float32(), pa.float64())


def _column(batch: pa.Table, name: str) -> Optional[pa.Array]:
    if name not in batch.column_names:
        return None
    column = batch.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _is_text(column: Optional[pa.Array]) -> bool:
    return column is not None and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type))


def _mask(values) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _plain_text_ok(column: Optional[pa.Array], max_chars: int) -> np.ndarray:
    """Non-null ASCII text (so valid UTF-8) with a visible character, at most ``max_chars`` long."""
    if not _is_text(column):
        return np.zeros(0 if column is None else len(column), bool)
    ascii_ = _mask(pc.string_is_ascii(column))
    only_ascii = pc.if_else(pa.array(ascii_), column, pa.scalar(None, column.type))  # regex sees no bad UTF-8
    return (ascii_ & _mask(pc.match_substring_regex(only_ascii, _VISIBLE_ASCII))
            & _mask(pc.less_equal(pc.utf8_length(only_ascii), max_chars)))


def _fast_id(batch, name, n):
    ok = _plain_text_ok(_column(batch, name), schemas.MAX_ID_CHARS)
    return ok if len(ok) == n else np.zeros(n, bool)


def _fast_category(batch, name, n):
    column = _column(batch, name)
    if column is None or column.null_count == len(column):
        return np.ones(n, bool)  # absent or null: the default
    ok = _plain_text_ok(column, MAX_CATEGORY_CHARS)
    return ok | _mask(pc.is_null(column)) if len(ok) == n else np.zeros(n, bool)


def _fast_scenario(batch, n):
    column = _column(batch, "scenario")
    if not _is_text(column):
        return np.zeros(n, bool)
    return _mask(pc.is_in(column, value_set=pa.array(schemas.SCENARIOS, column.type)))


def _timestamp_micros(column: pa.Array) -> Optional[pa.Array]:
    """Microseconds since the epoch (UTC instants, as ``parse_timestamp`` reads them), or None for a type the fast
    path leaves to ``validate_row`` (nanoseconds, strings, dates)."""
    if column is None or not pa.types.is_timestamp(column.type) or column.type.unit == "ns":
        return None
    return column.cast(pa.timestamp("us", tz=column.type.tz)).cast(pa.int64())


def _fast_timestamp(batch, name, partition_date, n):
    micros = _timestamp_micros(_column(batch, name))
    if micros is None:
        return np.zeros(n, bool)
    start, end = schemas.day_bounds(partition_date)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

    def us(moment):
        return (moment - epoch) // dt.timedelta(microseconds=1)

    low, high = max(us(start), us(schemas.MIN_VALID_TS)), min(us(end), us(schemas.MAX_VALID_TS))
    return _mask(pc.and_(pc.greater_equal(micros, low), pc.less(micros, high)))


def _fast_number(batch, name, low, high, low_inclusive, n):
    column = _column(batch, name)
    if column is None or not (column.type in _FLOAT_TYPES or pa.types.is_integer(column.type)):
        return np.zeros(n, bool)
    values = column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # nulls become NaN
    with np.errstate(invalid="ignore"):
        above = values >= low if low_inclusive else values > low
        return above & (values <= high)  # False for NaN


def _fast_flag(batch, name, n):
    column = _column(batch, name)
    if column is None or pa.types.is_null(column.type):
        return np.ones(n, bool)
    return np.ones(n, bool) if pa.types.is_boolean(column.type) else _mask(pc.is_null(column))


def _fast_query(batch, n):
    ok = _plain_text_ok(_column(batch, "query"), schemas.MAX_QUERY_CHARS)
    return ok if len(ok) == n else np.zeros(n, bool)


def _fast_embedding(batch, embedding_dim, n):
    column = _column(batch, "content_embedding")
    if column is None or not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                              or pa.types.is_fixed_size_list(column.type)) or column.type.value_type != pa.float32():
        return np.zeros(n, bool)
    ok = _mask(pc.equal(pc.list_value_length(column), embedding_dim))
    if ok.any():
        values = pc.list_flatten(column.filter(pa.array(ok))).to_numpy(zero_copy_only=False)  # nulls become NaN
        ok[ok] = np.isfinite(values.reshape(-1, embedding_dim)).all(axis=1)
    return ok


def _fast_rows(table: str, batch: pa.Table, partition_date: dt.date, embedding_dim: int) -> np.ndarray:
    """Rows that ``validate_row`` certainly accepts, found with Arrow kernels."""
    n = batch.num_rows
    if table == schemas.WATCH_EVENTS:
        return (_fast_id(batch, "user_id", n) & _fast_id(batch, "video_id", n)
                & _fast_timestamp(batch, "event_ts", partition_date, n) & _fast_scenario(batch, n)
                & _fast_number(batch, "watch_time_s", 0.0, schemas.MAX_WATCH_TIME_S, True, n)
                & _fast_number(batch, "video_duration_s", 0.0, schemas.MAX_WATCH_TIME_S, False, n)
                & _fast_category(batch, "surface", n) & _fast_category(batch, "device", n)
                & _fast_flag(batch, "liked", n) & _fast_flag(batch, "disliked", n))
    if table == schemas.SEARCH_EVENTS:
        return (_fast_id(batch, "user_id", n) & _fast_timestamp(batch, "event_ts", partition_date, n)
                & _fast_query(batch, n))
    return (_fast_id(batch, "video_id", n) & _fast_scenario(batch, n)
            & _fast_embedding(batch, embedding_dim, n) & _fast_timestamp(batch, "publish_ts", partition_date, n))


def _clean_columns(table: str, batch: pa.Table) -> pa.Table:
    """The fast rows in contract types: what ``validate_row`` makes of them, as Arrow columns."""
    schema = schemas.input_schema(table)
    defaults = schemas.OPTIONAL_DEFAULTS[table]
    arrays = []
    for field in schema:
        column = _column(batch, field.name)
        if pa.types.is_timestamp(field.type):
            arrays.append(_timestamp_micros(column).cast(field.type))
        elif column is None or pa.types.is_null(column.type):
            arrays.append(pa.array([defaults[field.name]] * batch.num_rows, field.type))
        else:
            column = column.cast(field.type, safe=False)
            arrays.append(pc.fill_null(column, defaults[field.name]) if field.name in defaults else column)
    return pa.Table.from_arrays(arrays, schema=schema)


def validate_batch(table: str, batch, partition_date: dt.date,
                   embedding_dim: int = schemas.DEFAULT_EMBEDDING_DIM) -> Tuple[pa.Table, list]:
    """One batch of raw rows (an Arrow table as read, or a list of row dicts) to ``(valid, dead)``: the valid rows
    as an Arrow table of the contract schema (not yet deduplicated), the rest as dead-letter rows; same verdicts
    as ``validate_row`` on each row."""
    from transforms.sources import table_to_rows  # sources imports nothing of this module; kept lazy anyway

    schema = schemas.input_schema(table)
    if isinstance(batch, pa.Table):
        fast = _fast_rows(table, batch, partition_date, embedding_dim)
        clean = _clean_columns(table, batch.filter(pa.array(fast))) if fast.any() else schema.empty_table()
        rest = table_to_rows(batch.filter(pa.array(~fast)), list(schema.names)) if not fast.all() else []
    else:
        clean, rest = schema.empty_table(), list(batch)
    slow, dead = [], []
    for row in rest:
        cleaned, rejection = validate_row(table, row, partition_date, embedding_dim)
        if rejection is None:
            slow.append(cleaned)
        else:
            dead.append(dead_letter_row(table, partition_date, row, rejection))
    if slow:
        clean = pa.concat_tables([clean, pa.Table.from_pylist(slow, schema=schema)])
    return clean, dead


def drop_duplicates(table: str, partition_date: dt.date, valid: pa.Table) -> Tuple[pa.Table, list]:
    """``valid`` with each event key once, and a dead-letter row for every other row of a key; among duplicates the
    row kept is ``split_duplicates``' canonical choice (the duplicates themselves are few, so handled as dicts)."""
    key = list(schemas.DEDUP_KEY[table])
    indexed = valid.select(key).append_column("_row", pa.array(np.arange(valid.num_rows)))
    groups = indexed.group_by(key, use_threads=False).aggregate([("_row", "list")])
    rows_of_key = groups.column("_row_list")
    sizes = pc.list_value_length(rows_of_key).to_numpy()
    if (sizes == 1).all():
        return valid, []
    keep = np.ones(valid.num_rows, bool)
    dead = []
    for members in rows_of_key.filter(pa.array(sizes > 1)).to_pylist():
        clean = valid.take(pa.array(members)).to_pylist()
        kept, rejected = split_duplicates(table, partition_date, clean)
        keep[members] = False
        keep[members[clean.index(kept)]] = True
        dead += rejected
    return valid.filter(pa.array(keep)), dead


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


# Range jobs: every (table, date) partition of a range validated in one pass over Arrow batches, each partition
# deduplicated and written as ``num_shards`` independent groups, (table, date, shard), one per output shard.
EVENT_KEY_SEPARATOR = "\x1f"


def event_keys(table: str, valid: pa.Table) -> pa.Array:
    """Each valid (clean, contract-typed) row's event key as text: its ``schemas.DEDUP_KEY`` columns joined by
    ``EVENT_KEY_SEPARATOR``, timestamps as integer microseconds since the epoch; so rows that are duplicates of one
    event (equal in those columns, as ``drop_duplicates`` groups them) have equal keys. A few Arrow kernels a batch."""
    parts = []
    for name in schemas.DEDUP_KEY[table]:
        column = _column(valid, name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64())
        parts.append(column.cast(pa.string()))
    return pc.binary_join_element_wise(*parts, EVENT_KEY_SEPARATOR, null_handling="replace")


def event_shards(table: str, valid: pa.Table, num_shards: int) -> np.ndarray:
    """The shard of each valid row: ``outputs.shard_of`` of its ``event_keys`` text (crc32), so every duplicate of an
    event lands in one shard."""
    from transforms import outputs

    if num_shards == 1 or not valid.num_rows:
        return np.zeros(valid.num_rows, np.int64)
    return outputs.shards_of(event_keys(table, valid), num_shards)


def dead_shard(dead_row: Dict[str, str], num_shards: int) -> int:
    """The shard of a row rejected before deduplication (it has no valid event key): a stable hash of the row as it
    came (its dead-letter ``raw_row``)."""
    from transforms import outputs

    return outputs.shard_of(dead_row["raw_row"], num_shards) if num_shards > 1 else 0


class _ValidateBatch(beam.DoFn):
    """((table, date), raw batch) to ((table, date, shard), (valid Arrow rows, dead-letter rows)), one element per
    shard that has rows: valid rows by ``event_shards``, rejected rows by ``dead_shard``. Row counts (in, dead per
    reason) as a tagged output."""
    COUNTS = "counts"

    def __init__(self, embedding_dim: int, num_shards: int):
        super().__init__()
        self._embedding_dim, self._num_shards = embedding_dim, num_shards
        self._rows_in = {t: Metrics.counter(f"validate.{t}", "rows_in") for t in _VALIDATORS}
        self._dead = {(t, r): Metrics.counter(f"validate.{t}", f"rows_dead.{r}") for t in _VALIDATORS
                      for r in REASONS}

    def process(self, keyed_batch):
        from transforms import outputs

        (table, date), batch = keyed_batch
        rows_in = batch.num_rows if isinstance(batch, pa.Table) else len(batch)
        if not rows_in:
            return
        self._rows_in[table].inc(rows_in)
        yield beam.pvalue.TaggedOutput(self.COUNTS, ((table, date, outputs.IN, ""), rows_in))
        valid, dead = validate_batch(table, batch, dt.date.fromisoformat(date), self._embedding_dim)
        for reason, n in sorted(_reason_counts(dead).items()):
            self._dead[(table, reason)].inc(n)
            yield beam.pvalue.TaggedOutput(self.COUNTS, ((table, date, outputs.DEAD, reason), n))
        n = self._num_shards
        dead_of: Dict[int, list] = {}
        for row in dead:
            dead_of.setdefault(dead_shard(row, n), []).append(row)
        shard = event_shards(table, valid, n)
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(n + 1))
        for s in range(n):
            start, end = int(bounds[s]), int(bounds[s + 1])
            if start == end and s not in dead_of:
                continue
            if end - start == valid.num_rows:
                piece = valid  # the whole batch in one shard (always so with one shard): no copy
            else:  # a copy, not a slice: a pickled slice would carry the whole batch's buffers
                piece = valid.take(pa.array(order[start:end]))
            yield (table, date, s), (piece, dead_of.get(s, []))


def _reason_counts(dead: Sequence[Dict[str, str]]) -> Dict[str, int]:
    reasons: Dict[str, int] = {}
    for row in dead:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    return reasons


def _sorted_by_row_key(rows: pa.Table) -> pa.Table:
    """``rows`` in ``WriteParquetShards``' order (by each row's whole-row JSON key)."""
    from transforms import outputs

    if rows.num_rows < 2:
        return rows
    keys = outputs.row_json_keys(rows)
    # The keys are ASCII JSON (json.dumps escapes the rest), so Arrow's byte order is Python's str order; the sort
    # is stable, as ``sorted`` is (rows with one key are identical anyway).
    return rows.take(pc.sort_indices(keys))


class _DeduplicateAndWrite(beam.DoFn):
    """One (table, date, shard)'s pieces: duplicates dropped (every duplicate of an event is in this shard), then
    validated shard ``shard`` of ``num_shards`` and dead-letter shard ``shard`` of ``num_shards`` of the partition
    written, each sorted by the whole-row JSON key; a shard without rows (only the ``None`` that makes every shard
    a group) gets its empty files. Yields the file names; out and duplicate counts as a tagged output."""
    COUNTS = "counts"

    def __init__(self, valid_dirs: Dict[Tuple[str, str], str], dead_dirs: Dict[Tuple[str, str], str],
                 num_shards: int):
        super().__init__()
        self._valid_dirs, self._dead_dirs, self._num_shards = valid_dirs, dead_dirs, num_shards
        self._rows_out = {t: Metrics.counter(f"validate.{t}", "rows_out") for t in _VALIDATORS}
        self._duplicates = {t: Metrics.counter(f"validate.{t}", f"rows_dead.{DUPLICATE_EVENT}") for t in _VALIDATORS}

    def process(self, keyed_pieces):
        from transforms import outputs

        (table, date, shard), pieces = keyed_pieces
        pieces = [p for p in pieces if p is not None]
        schema = schemas.input_schema(table)
        valid = [v for v, _ in pieces if v.num_rows]
        dead = [row for _, d in pieces for row in d]
        del pieces
        kept, duplicates = drop_duplicates(table, dt.date.fromisoformat(date),
                                           pa.concat_tables(valid) if valid else schema.empty_table())
        del valid
        if kept.num_rows:  # a count key only where there are rows, as CountRows has it
            self._rows_out[table].inc(kept.num_rows)
            yield beam.pvalue.TaggedOutput(self.COUNTS, ((table, date, outputs.OUT, ""), kept.num_rows))
        if duplicates:
            self._duplicates[table].inc(len(duplicates))
            yield beam.pvalue.TaggedOutput(self.COUNTS, ((table, date, outputs.DEAD, DUPLICATE_EVENT),
                                                         len(duplicates)))
        yield write_partition_file(self._valid_dirs[(table, date)], shard, self._num_shards, schema,
                                   _sorted_by_row_key(kept))
        del kept
        dead_rows = pa.Table.from_pylist(dead + duplicates, schema=schemas.DEAD_LETTER_SCHEMA)
        yield write_partition_file(self._dead_dirs[(table, date)], shard, self._num_shards,
                                   schemas.DEAD_LETTER_SCHEMA, _sorted_by_row_key(dead_rows))


def write_partition_file(directory: str, shard: int, num_shards: int, schema: pa.Schema, rows: pa.Table) -> str:
    """One shard file of a partition, its rows already in order: ``WriteParquetShards``' file for them."""
    from transforms import outputs

    return outputs.write_parquet_file(outputs.shard_path(directory, shard, num_shards),
                                      rows.cast(schema).combine_chunks())


class ValidateRange(beam.PTransform):
    """Validates every ``((table, "YYYY-MM-DD"), batch)`` of a range (``sources.ReadTableBatches``: one PCollection,
    or a dict of them by table) and writes each partition's valid rows to ``valid_dirs[(table, date)]`` and its
    dead-letter rows to ``dead_dirs[(table, date)]``, ``num_shards`` shards each (empty ones too).

    Columnar: rows travel as Arrow pieces, never one element per row, and a range costs one branch, not one per
    date. One shuffle, keyed by (table, date, shard): a valid row's shard is a stable hash of its event key
    (``event_shards``), so all duplicates of an event meet in one group, which drops them and writes that shard's
    validated and dead-letter files straight away (rows sorted by the whole-row JSON key, as ``WriteParquetShards``
    orders them). So a worker holds one shard of one partition, never a whole day: more ``num_shards``, less memory
    per worker. (Unlike ``ValidateRows`` + ``WriteParquetShards``, which shard by the whole-row key, a row's shard
    follows its event key; each partition holds the same rows.)
    Returns ``{"written": file names, "counts": ((table, date, kind, reason), n)}`` for ``outputs`` summaries:
    every row read is counted in, and out or dead (per reason).
    """

    def __init__(self, valid_dirs: Dict[Tuple[str, str], str], dead_dirs: Dict[Tuple[str, str], str],
                 num_shards: int, embedding_dim: int = schemas.DEFAULT_EMBEDDING_DIM):
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if set(valid_dirs) != set(dead_dirs):
            raise ValueError("valid_dirs and dead_dirs must name the same (table, date) partitions")
        self._valid_dirs, self._dead_dirs = dict(valid_dirs), dict(dead_dirs)
        self._num_shards, self._embedding_dim = num_shards, embedding_dim

    def expand(self, batches):
        # One PCollection of every table's batches, or {table: its batches} (then one "Validate <table>" step each).
        by_table = batches if isinstance(batches, dict) else {"": batches}
        keyed = Tuple[Tuple[str, str, int], Any]
        checks = [pcoll | (f"Validate {table}" if table else "CheckBatches") >> beam.ParDo(
                      _ValidateBatch(self._embedding_dim, self._num_shards)).with_output_types(keyed).with_outputs(
                          _ValidateBatch.COUNTS, main="checked")
                  for table, pcoll in sorted(by_table.items())]
        pipeline = next(iter(by_table.values())).pipeline
        # Every (table, date, shard) is a group, so every shard's files are written, those without rows too.
        every_shard = pipeline | "EveryShard" >> beam.Create(
            [((t, d, s), None) for t, d in sorted(self._valid_dirs) for s in range(self._num_shards)]
        ).with_output_types(keyed)
        deduped = ([c.checked for c in checks] + [every_shard]
                   | "AllChecked" >> beam.Flatten().with_output_types(keyed)
                   | "GroupByShard" >> beam.GroupByKey()
                   | "DeduplicateAndWrite" >> beam.ParDo(
                       _DeduplicateAndWrite(self._valid_dirs, self._dead_dirs, self._num_shards)).with_outputs(
                           _DeduplicateAndWrite.COUNTS, main="written"))
        counts = ([c[_ValidateBatch.COUNTS] for c in checks] + [deduped[_DeduplicateAndWrite.COUNTS]]
                  | "AllCounts" >> beam.Flatten())
        return {"written": deduped.written, "counts": counts}
