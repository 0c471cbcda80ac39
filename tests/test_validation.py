"""Each bad-row kind is rejected with its reason; valid rows come out in contract types; duplicates are resolved
deterministically. Pure functions, no Beam."""
import datetime as dt
import json
import math

import pytest

from tests.helpers import DAY, T0, search, video, watch
from transforms import schemas, validation as v


def check(table, row, embedding_dim=schemas.DEFAULT_EMBEDDING_DIM):
    return v.validate_row(table, row, DAY, embedding_dim)


def test_valid_watch_is_cleaned_to_contract_types():
    clean, rejection = check(schemas.WATCH_EVENTS, watch(user_id=123, surface=None, device=None, liked=None,
                                                          disliked=1))
    assert rejection is None
    assert clean["user_id"] == "123"  # integer ids normalise to strings
    assert clean["surface"] == "other" and clean["device"] == "OTHER"
    assert clean["liked"] is False and clean["disliked"] is True
    assert clean["event_ts"] == T0 and clean["event_ts"].tzinfo is not None
    assert set(clean) == set(schemas.WATCH_EVENTS_SCHEMA.names)


@pytest.mark.parametrize("table,row,reason", [
    (schemas.WATCH_EVENTS, watch(user_id=None), v.MISSING_FIELD),
    (schemas.WATCH_EVENTS, watch(user_id="  "), v.MISSING_FIELD),
    (schemas.WATCH_EVENTS, watch(video_id=None), v.MISSING_FIELD),
    (schemas.WATCH_EVENTS, watch(video_id="x" * 200), v.BAD_ID),
    (schemas.WATCH_EVENTS, watch(video_id=1.5), v.BAD_ID),
    (schemas.WATCH_EVENTS, watch(event_ts="yesterday-ish"), v.BAD_TIMESTAMP),
    (schemas.WATCH_EVENTS, watch(event_ts=12345), v.BAD_TIMESTAMP),
    (schemas.WATCH_EVENTS, watch(event_ts=T0 + dt.timedelta(days=1)), v.TIMESTAMP_OUT_OF_RANGE),
    (schemas.WATCH_EVENTS, watch(event_ts=T0 - dt.timedelta(hours=11)), v.TIMESTAMP_OUT_OF_RANGE),
    (schemas.WATCH_EVENTS, watch(event_ts=dt.datetime(2250, 1, 1, tzinfo=dt.timezone.utc)),
     v.TIMESTAMP_OUT_OF_RANGE),
    (schemas.WATCH_EVENTS, watch(scenario="XYZ"), v.UNKNOWN_SCENARIO),
    (schemas.WATCH_EVENTS, watch(scenario=None), v.MISSING_FIELD),
    (schemas.WATCH_EVENTS, watch(watch_time_s=-1.0), v.BAD_WATCH_TIME),
    (schemas.WATCH_EVENTS, watch(watch_time_s=math.nan), v.BAD_WATCH_TIME),
    (schemas.WATCH_EVENTS, watch(watch_time_s=math.inf), v.BAD_WATCH_TIME),
    (schemas.WATCH_EVENTS, watch(watch_time_s="12"), v.BAD_WATCH_TIME),
    (schemas.WATCH_EVENTS, watch(video_duration_s=0.0), v.BAD_DURATION),
    (schemas.WATCH_EVENTS, watch(liked="yes"), v.BAD_FIELD),
    (schemas.SEARCH_EVENTS, search(query=""), v.EMPTY_QUERY),
    (schemas.SEARCH_EVENTS, search(query="   "), v.EMPTY_QUERY),
    (schemas.SEARCH_EVENTS, search(query="q" * (schemas.MAX_QUERY_CHARS + 1)), v.QUERY_TOO_LONG),
    (schemas.SEARCH_EVENTS, search(query=b"\xff\xfe cats"), v.BAD_QUERY_ENCODING),
    (schemas.SEARCH_EVENTS, search(query="cats \udc80"), v.BAD_QUERY_ENCODING),
    (schemas.SEARCH_EVENTS, search(query=None), v.MISSING_FIELD),
    (schemas.VIDEOS, video(content_embedding=[0.1] * 3), v.BAD_EMBEDDING),
    (schemas.VIDEOS, video(content_embedding=[math.nan] * schemas.DEFAULT_EMBEDDING_DIM), v.BAD_EMBEDDING),
    (schemas.VIDEOS, video(content_embedding="not a vector"), v.BAD_EMBEDDING),
    (schemas.VIDEOS, video(publish_ts=None), v.MISSING_FIELD),
], ids=lambda x: x if isinstance(x, str) and x in v.REASONS else None)
def test_each_bad_row_kind_is_rejected_with_its_reason(table, row, reason):
    clean, rejection = check(table, row)
    assert clean is None
    assert rejection.reason == reason, rejection


def test_non_mapping_row_is_rejected_not_raised():
    assert check(schemas.WATCH_EVENTS, ["not", "a", "dict"])[1].reason == v.BAD_FIELD


def test_timestamps_in_bigquery_and_iso_forms_parse_to_the_same_instant():
    for text in ("2026-01-01 10:00:00 UTC", "2026-01-01T10:00:00Z", "2026-01-01T11:00:00+01:00"):
        assert v.parse_timestamp(text) == T0
    assert v.parse_timestamp(T0.replace(tzinfo=None)) == T0  # naive = UTC


def test_partition_boundaries_start_inclusive_end_exclusive():
    start, end = schemas.day_bounds(DAY)
    assert check(schemas.WATCH_EVENTS, watch(event_ts=start))[1] is None
    assert check(schemas.WATCH_EVENTS, watch(event_ts=end))[1].reason == v.TIMESTAMP_OUT_OF_RANGE


def test_embedding_width_is_the_configured_one():
    assert check(schemas.VIDEOS, video(dim=384), embedding_dim=384)[1] is None
    assert check(schemas.VIDEOS, video(dim=384))[1].reason == v.BAD_EMBEDDING


def test_dead_letter_keeps_the_row_as_it_came():
    raw = watch(watch_time_s=math.nan, extra=b"\x00\x01")
    _, rejection = check(schemas.WATCH_EVENTS, raw)
    dead = v.dead_letter_row(schemas.WATCH_EVENTS, DAY, raw, rejection)
    assert dead["reason"] == v.BAD_WATCH_TIME and dead["partition_date"] == "2026-01-01"
    replay = json.loads(dead["raw_row"])
    assert math.isnan(replay["watch_time_s"])
    assert replay["event_ts"] == T0.isoformat()
    assert replay["extra"] == {"bytes_base64": "AAE="}
    assert set(dead) == set(schemas.DEAD_LETTER_SCHEMA.names)


def test_duplicates_keep_one_canonical_row_whatever_the_arrival_order():
    a = check(schemas.WATCH_EVENTS, watch(watch_time_s=10.0))[0]
    b = check(schemas.WATCH_EVENTS, watch(watch_time_s=20.0))[0]  # same event key, other payload
    assert v.dedup_key(schemas.WATCH_EVENTS, a) == v.dedup_key(schemas.WATCH_EVENTS, b)
    kept_ab, dead_ab = v.split_duplicates(schemas.WATCH_EVENTS, DAY, [a, b])
    kept_ba, dead_ba = v.split_duplicates(schemas.WATCH_EVENTS, DAY, [b, a])
    assert kept_ab == kept_ba
    assert [d["reason"] for d in dead_ab] == [v.DUPLICATE_EVENT]
    assert dead_ab == dead_ba


def test_distinct_events_have_distinct_keys():
    a = check(schemas.WATCH_EVENTS, watch())[0]
    b = check(schemas.WATCH_EVENTS, watch(scenario="SFV"))[0]
    c = check(schemas.WATCH_EVENTS, watch(event_ts=T0 + dt.timedelta(microseconds=1)))[0]
    assert len({v.dedup_key(schemas.WATCH_EVENTS, r) for r in (a, b, c)}) == 3


# ---------------------------------------------------------------------------------------------------------------
# Encodings: every string a row keeps must be valid UTF-8 text; invisible-only queries are empty.
# ---------------------------------------------------------------------------------------------------------------
STRING_COLUMNS = [(schemas.WATCH_EVENTS, watch, name) for name in ("user_id", "video_id", "scenario", "surface",
                                                                    "device")]
STRING_COLUMNS += [(schemas.SEARCH_EVENTS, search, "user_id"), (schemas.VIDEOS, video, "video_id"),
                   (schemas.VIDEOS, video, "scenario")]


@pytest.mark.parametrize("table,make,name", STRING_COLUMNS, ids=lambda x: x if isinstance(x, str) else None)
def test_undecodable_bytes_in_any_string_column_are_bad_encoding(table, make, name):
    # What the Parquet source passes on for a value of a string column that is not UTF-8.
    clean, rejection = check(table, make(**{name: b"\xff\xfe" + b"x"}))
    assert clean is None and rejection.reason == v.BAD_ENCODING, rejection
    assert name in rejection.detail


@pytest.mark.parametrize("table,make,name", STRING_COLUMNS, ids=lambda x: x if isinstance(x, str) else None)
def test_lone_surrogates_in_any_string_column_are_bad_encoding(table, make, name):
    good = make()[name]
    clean, rejection = check(table, make(**{name: good + "\ud800"}))
    assert clean is None and rejection.reason == v.BAD_ENCODING, rejection


def test_utf8_bytes_in_string_columns_are_decoded_to_text():
    clean, rejection = check(schemas.WATCH_EVENTS, watch(user_id=b"u\xc3\xa9", video_id=b"v1", scenario=b"SFV",
                                                         surface=b"home", device=b"TV"))
    assert rejection is None
    assert (clean["user_id"], clean["video_id"], clean["scenario"], clean["surface"], clean["device"]) == (
        "u\u00e9", "v1", "SFV", "home", "TV")


@pytest.mark.parametrize("query", ["\u200b\u200c", "\x00\x01", "\u2060 \ufeff", "\u2028\u2029\u3000\t",
                                   "\u200e\u200f\u00ad", b"\xe2\x80\x8b"])
def test_query_of_only_invisible_characters_is_empty(query):
    clean, rejection = check(schemas.SEARCH_EVENTS, search(query=query))
    assert clean is None and rejection.reason == v.EMPTY_QUERY, rejection


def test_query_with_invisible_characters_around_text_is_kept_as_it_came():
    clean, rejection = check(schemas.SEARCH_EVENTS, search(query="\u200bcats\u00a0dogs "))
    assert rejection is None and clean["query"] == "\u200bcats\u00a0dogs "


@pytest.mark.parametrize("name", ["user_id", "video_id"])
def test_ids_of_only_invisible_characters_are_missing(name):
    clean, rejection = check(schemas.WATCH_EVENTS, watch(**{name: "\u200b\ufeff"}))
    assert clean is None and rejection.reason == v.MISSING_FIELD


def test_dead_letter_of_undecodable_bytes_and_lone_surrogates_is_writable_and_replayable():
    import pyarrow as pa

    raw = search(user_id="u\ud800", query=b"\xff\xfe cats")
    _, rejection = check(schemas.SEARCH_EVENTS, raw)
    dead = v.dead_letter_row(schemas.SEARCH_EVENTS, DAY, raw, rejection)
    for value in dead.values():
        value.encode("utf-8")  # every field is valid UTF-8, so the dead-letter writer can take it
    pa.Table.from_pylist([dead], schema=schemas.DEAD_LETTER_SCHEMA)
    replay = json.loads(dead["raw_row"])
    assert replay["user_id"] == "u\ud800"  # JSON escapes keep the lone surrogate, losslessly
    assert replay["query"] == {"bytes_base64": "//4gY2F0cw=="}
    assert "caf\u00e9" in v.row_to_json(search(query="caf\u00e9"))  # valid text stays readable, not \u-escaped
