"""User history snapshots: the pure fold and bound, and update_histories end to end on hand-written days."""
import datetime as dt
import json
import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import update_histories
from tests.helpers import FNAPI, MULTIPROCESS, read_parquet_dir, search, watch, write_partition
from transforms import histories, outputs, schemas

D1, D2 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)


def at(day, hour, minute=0):
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.timezone.utc)


def record(video_id, ts_us, scenario="LFV"):
    return {"video_id": video_id, "scenario": scenario, "event_ts_us": ts_us, "sid": [1, 2, 3]}


def test_most_recent_keeps_the_newest_oldest_first_with_deterministic_ties():
    records = [record("b", 5), record("a", 5), record("c", 1), record("d", 9)]
    kept = histories.most_recent(records, 3, histories.watch_recency_key)
    assert [r["video_id"] for r in kept] == ["a", "b", "d"]
    assert histories.most_recent(list(reversed(records)), 3, histories.watch_recency_key) == kept


def test_fold_appends_the_day_and_caps_to_the_most_recent():
    previous = {"user_id": "u", "watches": [record(f"old{i}", i) for i in range(4)],
                "searches": [{"event_ts_us": 1, "query": "a"}]}
    new = [record("new0", 100), record("new1", 101)]
    folded = histories.fold_history("u", "2026-01-02", "m1", previous, new, [{"event_ts_us": 50, "query": "b"}],
                                    max_watches=5, max_searches=1)
    assert [w["video_id"] for w in folded["watches"]] == ["old1", "old2", "old3", "new0", "new1"]
    assert folded["searches"] == [{"event_ts_us": 50, "query": "b"}]
    assert (folded["snapshot_date"], folded["sid_model_version"]) == ("2026-01-02", "m1")


def test_most_recent_events_combiner_bounds_and_counts_what_it_drops():
    fn = histories.MostRecentEvents(3, histories.watch_recency_key)
    parts = [[record(f"v{i}", i) for i in range(0, 5)], [record(f"v{i}", i) for i in range(5, 9)]]
    accumulators = []
    for part in parts:
        acc = fn.create_accumulator()
        for r in part:
            acc = fn.add_input(acc, r)
        accumulators.append(acc)
        assert len(acc[0]) <= 3  # bounded on the map side already
    out = fn.extract_output(fn.merge_accumulators(accumulators))
    assert [r["video_id"] for r in out["events"]] == ["v6", "v7", "v8"] and out["dropped"] == 6


def test_combiner_in_a_pipeline_bounds_a_heavy_user(tmp_path):
    heavy = [("heavy", record(f"v{i}", i)) for i in range(500)] + [("light", record("x", 1))]
    with TestPipeline(options=PipelineOptions(FNAPI)) as p:
        out = (p | beam.Create(heavy)
               | beam.CombinePerKey(histories.MostRecentEvents(10, histories.watch_recency_key))
               | beam.MapTuple(lambda user, o: (user, len(o["events"]), o["dropped"])))
        assert_that(out, equal_to([("heavy", 10, 490), ("light", 1, 0)]))


# ---------------------------------------------------------------------------------------------------------------
# The pipeline, on hand-written validated days and SID tables.
# ---------------------------------------------------------------------------------------------------------------
def write_validated(root, day, watches, searches):
    base = f"{root}/validated"
    for table, rows in ((schemas.WATCH_EVENTS, watches), (schemas.SEARCH_EVENTS, searches)):
        write_partition(base, table, day, rows)
        outputs.write_text_file(os.path.join(schemas.partition_dir(base, table, day), "_SUCCESS"), "")


def write_sids(root, day, sids, version="m1"):
    rows = [{"video_id": v, "scenario": "LFV", "sid": list(s), "disambiguation": 0, "sid_model_version": version,
             "assigned_date": day.isoformat()} for v, s in sids.items()]
    directory = schemas.partition_dir(root, schemas.VIDEO_SIDS, day)
    write_partition(root, schemas.VIDEO_SIDS, day, rows, schema=schemas.VIDEO_SIDS_SCHEMA)
    outputs.write_text_file(schemas.run_summary_path(root, schemas.VIDEO_SIDS, day),
                            json.dumps({"sid_model_version": version}))
    outputs.write_text_file(os.path.join(directory, "_SUCCESS"), "")


def run(root, day, *extra, runner=FNAPI):
    [summary] = update_histories.run([f"--date={day}", f"--output_root={root}", *runner, *extra])
    rows = read_parquet_dir(update_histories.snapshot_dir(str(root), day))
    return summary, {r["user_id"]: r for r in rows}


@pytest.mark.parametrize("runner", [FNAPI, MULTIPROCESS], ids=["single", "multiprocess"])
def test_daily_fold_with_bound_dead_letters_and_accounting(tmp_path, runner):
    write_sids(tmp_path, D1, {"v1": (1, 1, 1), "v2": (2, 2, 2)})
    write_validated(tmp_path, D1, [watch(user_id="a", video_id="v1", event_ts=at(D1, 9)),
                                   watch(user_id="b", video_id="v2", event_ts=at(D1, 9))],
                    [search(user_id="a", event_ts=at(D1, 8), query="cats")])
    summary1, snap1 = run(tmp_path, D1, "--backfill_days=1", runner=runner)
    assert summary1["built_from"] == "backfill_1_days" and set(snap1) == {"a", "b"}

    write_sids(tmp_path, D2, {"v1": (1, 1, 1), "v2": (2, 2, 2), "v3": (3, 3, 3)})
    day2 = [watch(user_id="a", video_id="v3", event_ts=at(D2, 10, m)) for m in range(5)]
    day2 += [watch(user_id="c", video_id="unknown", event_ts=at(D2, 11))]
    write_validated(tmp_path, D2, day2, [search(user_id="c", event_ts=at(D2, 12), query="dogs")])
    summary2, snap2 = run(tmp_path, D2, "--max_history_watches=3", runner=runner)

    assert summary2["built_from"] == "previous_snapshot"
    a = snap2["a"]
    assert [w["video_id"] for w in a["watches"]] == ["v3", "v3", "v3"]  # capped to the 3 most recent
    assert [w["event_ts_us"] for w in a["watches"]] == [schemas.to_epoch_us(at(D2, 10, m)) for m in (2, 3, 4)]
    assert a["watches"][0]["sid"] == [3, 3, 3] and a["searches"][0]["query"] == "cats"
    assert snap2["b"]["watches"][0]["video_id"] == "v2"  # inactive users carry over
    assert snap2["c"]["watches"] == [] and snap2["c"]["searches"][0]["query"] == "dogs"
    watches = summary2["tables"][schemas.WATCH_EVENTS][D2.isoformat()]
    assert watches == {"rows_in": 6, "rows_out": 3, "rows_dead": 1, "dead_by_reason": {"video_without_sid": 1},
                       "rows_dropped": 2, "dropped_by_reason": {"over_daily_history_bound": 2}, "balanced": True}
    assert summary2["stats"]["histories.users"] == 3
    [dead] = read_parquet_dir(schemas.partition_dir(f"{tmp_path}/dead_letter", schemas.HISTORIES, D2))
    assert dead["reason"] == "video_without_sid" and json.loads(dead["raw_row"])["video_id"] == "unknown"
    assert os.path.exists(os.path.join(update_histories.snapshot_dir(str(tmp_path), D2), "_SUCCESS"))


def test_new_sid_model_remaps_previous_watches(tmp_path):
    write_sids(tmp_path, D1, {"v1": (1, 1, 1)}, version="m1")
    write_validated(tmp_path, D1, [watch(user_id="a", video_id="v1", event_ts=at(D1, 9))], [])
    run(tmp_path, D1, "--backfill_days=1")
    write_sids(tmp_path, D2, {"v1": (7, 7, 7)}, version="m2")
    write_validated(tmp_path, D2, [], [])
    summary, snap = run(tmp_path, D2)
    assert summary["remapped_previous_sids"] and summary["sid_model_version"] == "m2"
    assert snap["a"]["watches"][0]["sid"] == [7, 7, 7] and snap["a"]["sid_model_version"] == "m2"


def test_backfill_builds_from_raw_days_when_there_is_no_previous_snapshot(tmp_path):
    write_sids(tmp_path, D2, {"v1": (1, 1, 1)})
    write_validated(tmp_path, D1, [watch(user_id="a", video_id="v1", event_ts=at(D1, 9))], [])
    write_validated(tmp_path, D2, [watch(user_id="a", video_id="v1", event_ts=at(D2, 9))], [])
    summary, snap = run(tmp_path, D2, "--backfill_days=2")
    assert summary["built_from"] == "backfill_2_days"
    assert len(snap["a"]["watches"]) == 2


def test_missing_inputs_fail_before_the_job_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="video_sids/date=2026-01-01/_SUCCESS"):
        run(tmp_path, D1)
