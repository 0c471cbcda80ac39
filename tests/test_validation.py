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


def _row_by_row(table, rows):
    valid, dead = [], []
    for row in rows:
        clean, rejection = v.validate_row(table, row, DAY)
        if rejection is None:
            valid.append(clean)
        else:
            dead.append(v.dead_letter_row(table, DAY, row, rejection))
    return valid, dead


def _json_rows(rows):
    return sorted(v.row_to_json(r) for r in rows)


@pytest.mark.parametrize("table,rows", [
    (schemas.WATCH_EVENTS, [
        watch(), watch(user_id="u2", surface=None, device=None, liked=None), watch(user_id="   "),
        watch(user_id="\u200b"), watch(user_id="ünï"), watch(user_id=None), watch(video_id="v" * 300),
        watch(watch_time_s=float("nan")), watch(watch_time_s=-1.0), watch(video_duration_s=0.0),
        watch(scenario="XYZ"), watch(event_ts=T0 - dt.timedelta(seconds=1)), watch(surface=""),
        watch(device="x" * 65), watch(device="\u00e9cran")]),
    (schemas.SEARCH_EVENTS, [search(), search(query=""), search(query=" \t"), search(query="q" * 1000),
                             search(query="caf\u00e9"), search(user_id=None)]),
    (schemas.VIDEOS, [video(), video(video_id="v2", content_embedding=[0.5] * 3),
                      video(video_id="v3", content_embedding=[float("inf")] + [0.0] * 63),
                      video(video_id="v4", content_embedding=[None] + [0.0] * 63), video(scenario="lfv")]),
])
def test_validate_batch_gives_validate_rows_verdicts(table, rows):
    import pyarrow as pa

    batch = pa.Table.from_pylist(rows, schema=schemas.input_schema(table))
    valid, dead = v.validate_batch(table, batch, DAY)
    expected_valid, expected_dead = _row_by_row(table, batch.to_pylist())
    assert valid.schema.equals(schemas.input_schema(table))
    assert _json_rows(valid.to_pylist()) == _json_rows(expected_valid)
    assert _json_rows(dead) == _json_rows(expected_dead)
    # Row dicts (the BigQuery source) take the row-by-row path, with the same outcome.
    valid_from_dicts, dead_from_dicts = v.validate_batch(table, rows, DAY)
    assert _json_rows(valid_from_dicts.to_pylist()) == _json_rows(_row_by_row(table, rows)[0])
    assert len(dead_from_dicts) == len(_row_by_row(table, rows)[1])


def test_drop_duplicates_keeps_the_canonical_row_and_dead_letters_the_rest():
    import pyarrow as pa

    rows = [watch(watch_time_s=30.0), watch(user_id="u2"), watch(watch_time_s=10.0), watch(watch_time_s=30.0)]
    valid, _ = v.validate_batch(schemas.WATCH_EVENTS, pa.Table.from_pylist(rows), DAY)
    kept, dead = v.drop_duplicates(schemas.WATCH_EVENTS, DAY, valid)
    clean = [v.validate_row(schemas.WATCH_EVENTS, r, DAY)[0] for r in rows]
    expected_kept, expected_dead = v.split_duplicates(schemas.WATCH_EVENTS, DAY, [clean[0], clean[2], clean[3]])
    assert _json_rows(kept.to_pylist()) == _json_rows([expected_kept, clean[1]])
    assert _json_rows(dead) == _json_rows(expected_dead)
    assert {r["reason"] for r in dead} == {v.DUPLICATE_EVENT}


# ---------------------------------------------------------------------------------------------------------------
# Whole-row sort keys built with Arrow kernels (outputs.row_json_keys): exactly json.dumps(row, sort_keys=True,
# default=str), which WriteParquetShards shards and sorts by, so ValidateRange's files stay byte-identical.
# ---------------------------------------------------------------------------------------------------------------
def _python_keys(table):
    return [json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist()]


def test_row_json_keys_equal_json_dumps_on_edge_values(monkeypatch):
    import numpy as np
    import pyarrow as pa

    from transforms import outputs

    monkeypatch.setattr(outputs, "_FEW_ROWS", 2)  # the Arrow kernels, not the few-rows json.dumps path
    floats = [0.0, -0.0, 530.0, 448.398, 1e-4, 9.999999999999999e-05, 1e-5, 1e15, 1e16, 9999999999999998.0, 1 / 3,
              float("nan"), float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308, None]
    texts = ["", "plain", 'quo"te', "back\\slash", "tab\there", "\x00", "\x7f", "é", "\u200b", "\U0001F600", "~ !",
             None, "a", "b", "c", "d", "e"]
    micros = [0, 1, 10 ** 6, 1_767_225_600_000_000, 1_767_225_600_123_456, -1, -62_135_596_800_000_000,
              253_402_300_799_999_999, None, 5, 6, 7, 8, 9, 10, 11, 12]
    lists = [[1.5, 2.0], [], None, [None, 1e-7], [float("nan")], [0.25] * 3] + [[float(i)] for i in range(11)]
    n = len(floats)
    for tz in (None, "UTC"):
        table = pa.table({
            "f64": pa.array(floats, pa.float64()), "f32": pa.array(floats, pa.float32()), "s": pa.array(texts),
            "ts": pa.array(micros, pa.timestamp("us", tz=tz)), "b": pa.array([True, False, None] * 5 + [True, False]),
            "i": pa.array(list(range(n - 1)) + [None], pa.int64()), "l": pa.array(lists, pa.list_(pa.float32())),
            "z": pa.array([None] * n)})
        assert outputs.row_json_keys(table).to_pylist() == _python_keys(table)
        sliced = table.slice(3, 9)
        assert outputs.row_json_keys(sliced).to_pylist() == _python_keys(sliced)
    rng = np.random.default_rng(7)
    random_bits = np.frombuffer(rng.integers(0, 2 ** 63, 20000, dtype=np.int64).tobytes(), np.float64)
    table = pa.table({"x": random_bits, "y": np.round(rng.random(20000) * 5000, 3)})
    assert outputs.row_json_keys(table).to_pylist() == _python_keys(table)


def test_row_json_keys_and_shards_on_validated_rows(monkeypatch):
    import pyarrow as pa

    from transforms import outputs

    monkeypatch.setattr(outputs, "_FEW_ROWS", 2)  # the Arrow kernels, not the few-rows json.dumps path

    rows = [watch(user_id=f"u{i}", watch_time_s=i * 1.25, event_ts=T0 + dt.timedelta(seconds=i, microseconds=i % 3))
            for i in range(50)]
    valid, dead = v.validate_batch(schemas.WATCH_EVENTS, pa.Table.from_pylist(rows), DAY)
    assert not dead and valid.num_rows == 50
    keys = outputs.row_json_keys(valid)
    assert keys.to_pylist() == _python_keys(valid) == outputs.row_sort_keys(valid)
    for shards in (1, 2, 7):
        assert outputs.shards_of(keys, shards).tolist() == [outputs.shard_of(k, shards) for k in keys.to_pylist()]
    assert outputs.row_json_keys(pa.table({"a": pa.array([], pa.int64())})).to_pylist() == []


def test_validate_range_writes_empty_files_for_a_partition_without_rows(tmp_path):
    import apache_beam as beam
    import pyarrow.parquet as pq

    day = DAY.isoformat()
    valid_dirs = {(t, day): str(tmp_path / "valid" / t) for t in schemas.INPUT_TABLES}
    dead_dirs = {(t, day): str(tmp_path / "dead" / t) for t in schemas.INPUT_TABLES}
    rows = [watch(), watch(device="ANDROID"), watch(user_id="")]  # a duplicate and a rejected row
    with beam.Pipeline() as pipeline:
        batches = {schemas.WATCH_EVENTS: pipeline | "Watch" >> beam.Create(
                       [((schemas.WATCH_EVENTS, day), pa_table(rows))]),
                   schemas.SEARCH_EVENTS: pipeline | "Search" >> beam.Create([])}
        _ = batches | v.ValidateRange(valid_dirs, dead_dirs, num_shards=3)
    for table in schemas.INPUT_TABLES:
        written = sorted(p.name for p in (tmp_path / "valid" / table).iterdir())
        assert written == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
        assert sorted(p.name for p in (tmp_path / "dead" / table).iterdir()) == written
    valid = pq.read_table(str(tmp_path / "valid" / schemas.WATCH_EVENTS))
    dead = pq.read_table(str(tmp_path / "dead" / schemas.WATCH_EVENTS))
    assert valid.num_rows == 1 and sorted(dead.column("reason").to_pylist()) == [v.DUPLICATE_EVENT, v.MISSING_FIELD]
    assert pq.read_table(str(tmp_path / "valid" / schemas.VIDEOS)).num_rows == 0


def _event_key_text(row, key):
    """validation.event_keys of one row, in plain Python."""
    micros = lambda t: (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)
    return "\x1f".join(str(micros(row[k])) if isinstance(row[k], dt.datetime) else row[k] for k in key)


def test_event_shards_hash_the_event_key_so_duplicates_share_a_shard():
    import pyarrow as pa

    from transforms import outputs

    rows = [watch(user_id=f"u{i % 7}", video_id=f"v{i % 5}", event_ts=T0 + dt.timedelta(seconds=i % 11),
                  watch_time_s=float(i)) for i in range(200)]  # many events repeat with other watch times
    valid, _ = v.validate_batch(schemas.WATCH_EVENTS, pa.Table.from_pylist(rows), DAY)
    key = list(schemas.DEDUP_KEY[schemas.WATCH_EVENTS])
    for shards in (1, 2, 7):
        got = v.event_shards(schemas.WATCH_EVENTS, valid, shards).tolist()
        expected = [outputs.shard_of(_event_key_text(r, key), shards) for r in valid.to_pylist()]
        assert got == expected
        by_event = {}
        for r, s in zip(valid.to_pylist(), got):
            assert by_event.setdefault(v.dedup_key(schemas.WATCH_EVENTS, r), s) == s
    assert v.event_shards(schemas.VIDEOS, schemas.videos_schema().empty_table(), 3).tolist() == []
    searches, _ = v.validate_batch(schemas.SEARCH_EVENTS, pa.Table.from_pylist([search(), search(query="a\x1fb")]), DAY)
    assert v.event_keys(schemas.SEARCH_EVENTS, searches).to_pylist() == [
        _event_key_text(r, schemas.DEDUP_KEY[schemas.SEARCH_EVENTS]) for r in searches.to_pylist()]
    videos, _ = v.validate_batch(schemas.VIDEOS, pa.Table.from_pylist([video(), video(video_id="v2")]), DAY)
    assert v.event_keys(schemas.VIDEOS, videos).to_pylist() == ["v1", "v2"]


def test_validate_range_shards_by_event_key_and_drops_duplicates_across_batches(tmp_path):
    import apache_beam as beam
    import pyarrow.parquet as pq

    from transforms import outputs

    day = DAY.isoformat()
    valid_dirs = {(t, day): str(tmp_path / "valid" / t) for t in schemas.INPUT_TABLES}
    dead_dirs = {(t, day): str(tmp_path / "dead" / t) for t in schemas.INPUT_TABLES}
    events = [dict(user_id=f"u{i}", event_ts=T0 + dt.timedelta(seconds=i)) for i in range(40)]
    first = [watch(**e, watch_time_s=10.0) for e in events]
    second = [watch(**e, watch_time_s=20.0) for e in events[::2]] + [watch(user_id=None)]  # 20 duplicates, 1 bad
    with beam.Pipeline() as pipeline:
        _ = (pipeline | beam.Create([((schemas.WATCH_EVENTS, day), pa_table(first)),
                                     ((schemas.WATCH_EVENTS, day), pa_table(second))])
             | v.ValidateRange(valid_dirs, dead_dirs, num_shards=4))
    key = list(schemas.DEDUP_KEY[schemas.WATCH_EVENTS])
    kept = []
    for s in range(4):
        shard = pq.read_table(outputs.shard_path(valid_dirs[(schemas.WATCH_EVENTS, day)], s, 4)).to_pylist()
        assert [json.dumps(r, sort_keys=True, default=str) for r in shard] == sorted(
            json.dumps(r, sort_keys=True, default=str) for r in shard)  # each shard in whole-row key order
        assert all(outputs.shard_of(_event_key_text(r, key), 4) == s for r in shard)
        kept += shard
    assert sorted(r["user_id"] for r in kept) == sorted(e["user_id"] for e in events)
    assert all(r["watch_time_s"] == 10.0 for r in kept)  # the canonical choice, whatever the batch
    dead = pq.read_table(str(tmp_path / "dead" / schemas.WATCH_EVENTS)).column("reason").to_pylist()
    assert sorted(dead) == [v.DUPLICATE_EVENT] * 20 + [v.MISSING_FIELD]


def pa_table(rows):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)
