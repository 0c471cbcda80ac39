"""The validation pipeline end to end on Beam's in-process runner: outputs, dead letters, summary, reruns."""
import datetime as dt
import json
import math
import os

import pytest

from pipelines import validate_inputs
from tests.helpers import DAY, FNAPI, MULTIPROCESS, read_parquet_dir, search, video, watch, write_partition
from transforms import schemas, validation as v

LOOSE_SEARCH_SCHEMA = schemas.SEARCH_EVENTS_SCHEMA.set(2, schemas.SEARCH_EVENTS_SCHEMA.field("query").with_type(
    __import__("pyarrow").binary()))


def write_day(root, day=DAY):
    t = dt.datetime(day.year, day.month, day.day, 9, tzinfo=dt.timezone.utc)
    watches = [watch(user_id=f"u{i}", event_ts=t + dt.timedelta(minutes=i)) for i in range(5)]
    watches += [watch(user_id=None, event_ts=t), watch(scenario="XYZ", event_ts=t), watch(watch_time_s=math.nan,
                event_ts=t), watch(user_id="u0", event_ts=t)]  # the last one duplicates the first
    write_partition(root, schemas.WATCH_EVENTS, day, watches)
    queries = [search(user_id="u1", event_ts=t, query=b"cats"), search(query=b"", event_ts=t),
               search(query=b"\xff\xfe", event_ts=t), search(query=b"x" * 300, event_ts=t)]
    write_partition(root, schemas.SEARCH_EVENTS, day, queries, schema=LOOSE_SEARCH_SCHEMA)
    write_partition(root, schemas.VIDEOS, day, [video(video_id="v1", publish_ts=t),
                                                video(video_id="v2", publish_ts=t, content_embedding=[1.0])])
    expected_dead = {v.MISSING_FIELD: 1, v.UNKNOWN_SCENARIO: 1, v.BAD_WATCH_TIME: 1, v.DUPLICATE_EVENT: 1,
                     v.EMPTY_QUERY: 1, v.BAD_QUERY_ENCODING: 1, v.QUERY_TOO_LONG: 1, v.BAD_EMBEDDING: 1}
    return expected_dead


def run(tmp_path, runner_args, extra=()):
    return validate_inputs.run([f"--date={DAY}", f"--input_root={tmp_path}/raw", f"--output_root={tmp_path}/out",
                                *runner_args, *extra])


@pytest.mark.parametrize("runner_args", [FNAPI, MULTIPROCESS], ids=["single", "multiprocess"])
def test_every_row_ends_in_an_output_or_a_dead_letter(tmp_path, runner_args):
    expected_dead = write_day(tmp_path / "raw")
    [summary] = run(tmp_path, runner_args)
    totals = summary["totals"]
    assert (totals["rows_in"], totals["rows_out"], totals["rows_dead"]) == (15, 7, 8)
    assert totals["dead_by_reason"] == dict(sorted(expected_dead.items()))
    assert totals["balanced"] and all(e["balanced"] for d in summary["tables"].values() for e in d.values())

    out = tmp_path / "out"
    valid_watches = read_parquet_dir(schemas.partition_dir(str(out / "validated"), schemas.WATCH_EVENTS, DAY))
    assert sorted(r["user_id"] for r in valid_watches) == ["u0", "u1", "u2", "u3", "u4"]
    dead = read_parquet_dir(schemas.partition_dir(str(out / schemas.DEAD_LETTER), schemas.SEARCH_EVENTS, DAY))
    assert sorted(r["reason"] for r in dead) == [v.BAD_QUERY_ENCODING, v.EMPTY_QUERY, v.QUERY_TOO_LONG]
    [valid_query] = read_parquet_dir(schemas.partition_dir(str(out / "validated"), schemas.SEARCH_EVENTS, DAY))
    assert valid_query["query"] == "cats"  # UTF-8 bytes decoded to the contract's string type
    for table in schemas.INPUT_TABLES:
        assert os.path.exists(os.path.join(schemas.partition_dir(str(out / "validated"), table, DAY), "_SUCCESS"))
    run_dir = validate_inputs.run_dir(str(out), DAY)
    assert json.load(open(os.path.join(run_dir, "summary.json"))) == summary
    assert os.path.exists(os.path.join(run_dir, "_SUCCESS"))


def test_validated_output_is_itself_a_valid_input_root(tmp_path):
    write_day(tmp_path / "raw")
    run(tmp_path, FNAPI)
    [summary] = validate_inputs.run([f"--date={DAY}", f"--input_root={tmp_path}/out/validated",
                                     f"--output_root={tmp_path}/again", *FNAPI])
    assert summary["totals"]["rows_in"] == summary["totals"]["rows_out"] == 7
    assert summary["totals"]["rows_dead"] == 0


def test_rerun_replaces_the_days_output_without_stale_shards(tmp_path):
    write_day(tmp_path / "raw")
    run(tmp_path, FNAPI, ["--validated_shards=3"])
    first = read_parquet_dir(schemas.partition_dir(str(tmp_path / "out/validated"), schemas.WATCH_EVENTS, DAY))
    run(tmp_path, FNAPI, ["--validated_shards=1"])
    directory = schemas.partition_dir(str(tmp_path / "out/validated"), schemas.WATCH_EVENTS, DAY)
    assert sorted(os.listdir(directory)) == ["_MANIFEST.json", "_SUCCESS", "part-00000-of-00001.parquet"]
    second = read_parquet_dir(directory)
    key = lambda r: (r["user_id"], r["event_ts"])
    assert sorted(first, key=key) == sorted(second, key=key)


def test_range_run_validates_each_day_into_its_own_partition(tmp_path):
    days = [DAY, DAY + dt.timedelta(days=1)]
    for day in days:
        write_day(tmp_path / "raw", day)
    summaries = validate_inputs.run([f"--start_date={days[0]}", f"--end_date={days[1]}",
                                     f"--input_root={tmp_path}/raw", f"--output_root={tmp_path}/out", *FNAPI])
    assert [s["date"] for s in summaries] == [d.isoformat() for d in days]
    assert all(s["totals"]["rows_in"] == 15 and s["totals"]["rows_out"] == 7 for s in summaries)


def test_unknown_table_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tables"):
        run(tmp_path, FNAPI, ["--tables=watch_events,clicks"])


PLANTED_KIND_TO_REASON = {
    "null_user_id": v.MISSING_FIELD, "nan_watch_time": v.BAD_WATCH_TIME, "negative_watch_time": v.BAD_WATCH_TIME,
    "unknown_scenario": v.UNKNOWN_SCENARIO, "duplicate_watch_event": v.DUPLICATE_EVENT,
    "duplicate_search_event": v.DUPLICATE_EVENT, "watch_ts_outside_partition": v.TIMESTAMP_OUT_OF_RANGE,
    "search_ts_outside_partition": v.TIMESTAMP_OUT_OF_RANGE, "empty_query": v.EMPTY_QUERY,
    "overlong_query": v.QUERY_TOO_LONG, "wrong_embedding_length": v.BAD_EMBEDDING,
}


def test_generated_sample_data_dead_letters_exactly_the_planted_bad_rows(tmp_path):
    from data_sources.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset

    config = SampleDataConfig(users=300, days=2, seed=3, lfv_videos=300, sfv_videos=600, bad_row_rate=0.01)
    manifest = write_sample_dataset(generate_sample_dataset(config), str(tmp_path / "raw"))
    summaries = validate_inputs.run([f"--start_date={config.dates[0]}", f"--end_date={config.dates[-1]}",
                                     f"--input_root={tmp_path}/raw", f"--output_root={tmp_path}/out", *FNAPI])
    expected = {}
    for kind, n in manifest["planted_bad_rows"].items():
        expected[PLANTED_KIND_TO_REASON[kind]] = expected.get(PLANTED_KIND_TO_REASON[kind], 0) + n
    found = {}
    for summary in summaries:
        assert summary["totals"]["balanced"]
        for reason, n in summary["totals"]["dead_by_reason"].items():
            found[reason] = found.get(reason, 0) + n
    assert found == {r: n for r, n in expected.items() if n}
    rows_in = sum(s["totals"]["rows_in"] for s in summaries)
    assert rows_in == sum(sum(per_day.values()) for per_day in manifest["row_counts"].values())
