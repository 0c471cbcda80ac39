"""User history snapshots: the columnar fold and bound (no Beam), and update_histories end to end on hand-written
days."""
import datetime as dt
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import update_histories
from tests.helpers import FNAPI, MULTIPROCESS, read_parquet_dir, search, watch, write_partition
from transforms import history_fold, outputs, schemas

D1, D2 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)


def at(day, hour, minute=0):
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.timezone.utc)


def record(video_id, ts_us, scenario="LFV", user_id="u"):
    return {"user_id": user_id, "video_id": video_id, "scenario": scenario, "event_ts_us": ts_us,
            "watch_time_s": 1.0, "video_duration_s": 2.0, "surface": "home", "device": "IOS", "liked": False,
            "disliked": False, "sid": [1, 2, 3]}


def records(rows):
    return pa.Table.from_pylist(rows, schema=history_fold.WATCH_RECORD_SCHEMA)


def test_most_recent_keeps_the_newest_per_user_oldest_first_with_deterministic_ties():
    rows = [record("b", 5), record("a", 5), record("c", 1), record("d", 9), record("x", 1, user_id="w"),
            record("a", 5, scenario="SFV")]
    for order in (rows, rows[::-1]):  # never by arrival order
        table = records(order)
        users, groups = history_fold.group_ids(table["user_id"])
        kept = table.take(history_fold.most_recent(table, groups, 3, history_fold.WATCH_KEY)).to_pylist()
        by_user = {u: [(r["video_id"], r["scenario"]) for r in kept if r["user_id"] == u] for u in users}
        # (5, "LFV", "b") < (5, "SFV", "a"): time, then scenario, then video id
        assert by_user == {"u": [("b", "LFV"), ("a", "SFV"), ("d", "LFV")], "w": [("x", "LFV")]}
        assert [r["user_id"] for r in kept] == sorted((r["user_id"] for r in kept), key=users.index)


def test_fold_appends_the_day_caps_to_the_most_recent_and_counts_the_day_bound():
    old = records([record(f"old{i}", i) for i in range(4)]).drop_columns(["user_id"])
    new = records([record(f"new{i}", 100 + i) for i in range(7)]).drop_columns(["user_id"])
    kept, groups, kept_new = history_fold.bound_and_fold(old, np.zeros(4, np.int64), new, np.zeros(7, np.int64), 5,
                                                         history_fold.WATCH_KEY)
    assert [r["video_id"] for r in kept.to_pylist()] == [f"new{i}" for i in range(2, 7)] and kept_new == 5
    kept, _, kept_new = history_fold.bound_and_fold(old, np.zeros(4, np.int64), new.slice(0, 2),
                                                    np.zeros(2, np.int64), 5, history_fold.WATCH_KEY)
    assert [r["video_id"] for r in kept.to_pylist()] == ["old1", "old2", "old3", "new0", "new1"] and kept_new == 2


def test_snapshot_round_trip_through_flat_records_and_ipc():
    table = records([record("a", 1), record("b", 2, user_id="w"), record("c", 3)])
    users, groups = history_fold.group_ids(table["user_id"])
    order = history_fold.most_recent(table, groups, 10, history_fold.WATCH_KEY)
    watches = history_fold.from_ipc(history_fold.to_ipc(table.take(order).drop_columns(["user_id"])))
    no_searches = pa.schema(list(schemas.HISTORY_SEARCH_TYPE)).empty_table()
    snap = history_fold.snapshots(users + ["idle"], "2026-01-02", "m1", watches, groups[order], no_searches,
                                  np.zeros(0, np.int64))
    assert snap.schema == schemas.HISTORIES_SCHEMA
    assert [(r["user_id"], [w["video_id"] for w in r["watches"]]) for r in snap.to_pylist()] == [
        ("u", ["a", "c"]), ("w", ["b"]), ("idle", [])]
    flat, owners = history_fold.flatten_snapshots(snap, "watches")
    assert flat.to_pylist() == table.take(order).to_pylist() and owners.tolist() == [0, 0, 1]
    assert [(g, t.num_rows) for g, t in history_fold.split_by_group(flat, owners, 3)] == [(0, 2), (1, 1), (2, 0)]


def test_watch_records_attach_sids_and_return_rows_without_one():
    events = pa.Table.from_pylist([watch(user_id="a", video_id="v1", event_ts=at(D1, 9)),
                                   watch(user_id="b", video_id="nope", event_ts=at(D1, 10))],
                                  schema=schemas.WATCH_EVENTS_SCHEMA)
    sids = pa.table({"video_id": ["v0", "v1"], "sid": pa.array([[0, 0], [4, 5]], pa.list_(pa.int32()))})
    kept, missing = history_fold.watch_records(events, sids)
    assert missing.tolist() == [1] and kept.schema == history_fold.WATCH_RECORD_SCHEMA
    assert kept.to_pylist()[0]["sid"] == [4, 5]
    assert kept.to_pylist()[0]["event_ts_us"] == schemas.to_epoch_us(at(D1, 9))


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


def _snapshot_bytes(root, day):
    directory = update_histories.snapshot_dir(str(root), day)
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory)) if name.endswith(".parquet")}


def test_shard_by_shard_fold_writes_the_bytes_of_the_fold_by_user(tmp_path, monkeypatch):
    from transforms import histories

    users = [f"user{i}" for i in range(12)]
    write_sids(tmp_path, D1, {"v1": (1, 1, 1), "v2": (2, 2, 2)})
    write_validated(tmp_path, D1, [watch(user_id=u, video_id="v1", event_ts=at(D1, 9, i)) for i, u in enumerate(users)],
                    [search(user_id=u, event_ts=at(D1, 8), query=u) for u in users[::2]])
    d1_summary, _ = run(tmp_path, D1, "--backfill_days=1", "--history_shards=3")  # a backfill: folded by shard
    assert histories.is_sharded_snapshot(update_histories.snapshot_dir(str(tmp_path), D1), 3)
    assert not histories.is_sharded_snapshot(update_histories.snapshot_dir(str(tmp_path), D1), 4)
    d1_by_shard = _snapshot_bytes(tmp_path, D1)
    with monkeypatch.context() as patch:
        patch.setattr(update_histories, "folds_by_shard", lambda *args: False)
        patch.setattr(histories, "EVENT_SLICE_ROWS", 5)  # a row group keyed a few rows at a time: the same fold
        d1_summary_by_user, _ = run(tmp_path, D1, "--backfill_days=1", "--history_shards=3")
    assert _snapshot_bytes(tmp_path, D1) == d1_by_shard
    assert d1_summary_by_user["tables"] == d1_summary["tables"] and d1_summary_by_user["stats"] == d1_summary["stats"]
    write_sids(tmp_path, D2, {"v1": (1, 1, 1), "v2": (2, 2, 2)})
    write_validated(tmp_path, D2, [watch(user_id=u, video_id="v2", event_ts=at(D2, 10, m))
                                   for u in users[3:] + ["new_user"] for m in range(4)],
                    [search(user_id="new_user", event_ts=at(D2, 12), query="dogs")])
    summary, snap = run(tmp_path, D2, "--history_shards=3", "--max_history_watches=3")
    by_shard = _snapshot_bytes(tmp_path, D2)
    assert len(by_shard) == 3 and set(snap) == set(users) | {"new_user"}
    assert [w["video_id"] for w in snap["user5"]["watches"]] == ["v2"] * 3
    assert [w["video_id"] for w in snap["user1"]["watches"]] == ["v1"]

    monkeypatch.setattr(histories, "is_sharded_snapshot", lambda directory, num_shards: False)
    monkeypatch.setattr(histories, "EVENT_SLICE_ROWS", 3)  # a user's 4 watches split over slices: bound the same
    summary_by_user, _ = run(tmp_path, D2, "--history_shards=3", "--max_history_watches=3")
    assert _snapshot_bytes(tmp_path, D2) == by_shard
    assert summary_by_user["tables"] == summary["tables"] and summary_by_user["stats"] == summary["stats"]


def test_shard_by_shard_fold_rejects_a_snapshot_sharded_otherwise(tmp_path):
    write_sids(tmp_path, D1, {"v1": (1, 1, 1)})
    write_validated(tmp_path, D1, [watch(user_id=u, video_id="v1", event_ts=at(D1, 9)) for u in ("a", "b", "c")], [])
    run(tmp_path, D1, "--backfill_days=1", "--history_shards=2")
    directory = update_histories.snapshot_dir(str(tmp_path), D1)
    parts = [outputs.shard_path(directory, s, 2) for s in range(2)]
    rows = [pq.read_table(p) for p in parts]
    outputs.write_parquet_file(parts[0], pa.concat_tables(rows))  # every user in part 0
    outputs.write_parquet_file(parts[1], rows[0].schema.empty_table())
    write_sids(tmp_path, D2, {"v1": (1, 1, 1)})
    write_validated(tmp_path, D2, [], [])
    with pytest.raises(Exception, match="holds users of other shards"):
        run(tmp_path, D2, "--history_shards=2")


def test_parquet_file_writer_writes_the_bytes_of_one_write_in_row_groups(tmp_path):
    table = pa.table({"k": [f"u{i:03d}" for i in range(300)], "v": pa.array([[i] * (i % 4) for i in range(300)])})
    outputs.write_parquet_file(str(tmp_path / "whole.parquet"), table, row_group_size=128)
    with outputs.ParquetFileWriter(str(tmp_path / "streamed.parquet"), table.schema, 128) as writer:
        for start, stop in ((0, 5), (5, 200), (200, 200), (200, 300)):  # any cut of the rows
            writer.write(table.slice(start, stop - start))
    assert (tmp_path / "whole.parquet").read_bytes() == (tmp_path / "streamed.parquet").read_bytes()
    assert pq.ParquetFile(str(tmp_path / "whole.parquet")).metadata.num_row_groups == 3
    empty = table.schema.empty_table()
    outputs.write_parquet_file(str(tmp_path / "e1.parquet"), empty, row_group_size=128)
    with outputs.ParquetFileWriter(str(tmp_path / "e2.parquet"), table.schema, 128):
        pass
    assert (tmp_path / "e1.parquet").read_bytes() == (tmp_path / "e2.parquet").read_bytes()


def test_streamed_shard_fold_writes_row_groups_of_users_with_the_rows_of_one_whole_fold(tmp_path, monkeypatch):
    """Row groups of 2 users: the streamed fold (yesterday's part read 2 users at a time, new users sorting between
    them) writes the bytes of the fold by user, and the rows of a fold written as one row group per file."""
    from transforms import histories

    users = [f"user{i:02d}" for i in range(20)]
    write_sids(tmp_path, D1, {"v1": (1, 1, 1), "v2": (2, 2, 2)})
    write_validated(tmp_path, D1, [watch(user_id=u, video_id="v1", event_ts=at(D1, 9, i)) for i, u in enumerate(users)],
                    [search(user_id=u, event_ts=at(D1, 8), query=u) for u in users[::3]])
    run(tmp_path, D1, "--backfill_days=1", "--history_shards=2")
    write_sids(tmp_path, D2, {"v1": (1, 1, 1), "v2": (2, 2, 2)})
    new_users = ["a_first", "user05b", "user10b", "user11b", "zz_last"]  # before, between and after yesterday's
    write_validated(tmp_path, D2, [watch(user_id=u, video_id="v2", event_ts=at(D2, 10, m))
                                   for u in users[5:12] + new_users for m in range(3)],
                    [search(user_id=u, event_ts=at(D2, 12), query="dogs") for u in new_users[::2] + users[:3]])
    d2 = update_histories.snapshot_dir(str(tmp_path), D2)

    def fold_d2(group_users, by_shard=True):
        monkeypatch.setattr(histories, "SNAPSHOT_ROW_GROUP_USERS", group_users)
        monkeypatch.setattr(histories, "is_sharded_snapshot", lambda directory, num_shards: by_shard)
        summary, snap = run(tmp_path, D2, "--history_shards=2", "--max_history_watches=2")
        tables = [pq.read_table(outputs.shard_path(d2, s, 2)) for s in range(2)]
        groups = [pq.ParquetFile(outputs.shard_path(d2, s, 2)).metadata.num_row_groups for s in range(2)]
        return summary, snap, _snapshot_bytes(tmp_path, D2), tables, groups

    summary, snap, streamed, streamed_rows, groups = fold_d2(2)
    assert set(snap) == set(users) | set(new_users) and sum(groups) >= 12
    assert [w["video_id"] for w in snap["user05"]["watches"]] == ["v2", "v2"]
    assert snap["user10b"]["searches"][0]["query"] == "dogs" and snap["user00"]["watches"][0]["video_id"] == "v1"
    summary_by_user, _, by_user, _, _ = fold_d2(2, by_shard=False)
    assert by_user == streamed and summary_by_user["tables"] == summary["tables"]
    _, _, _, whole_rows, whole_groups = fold_d2(10 ** 6)
    assert whole_groups == [1, 1] and all(a.equals(b) for a, b in zip(streamed_rows, whole_rows))

    # A previous part not sorted by user_id (not written by this job) is folded whole, to the same rows.
    d1 = update_histories.snapshot_dir(str(tmp_path), D1)
    for s in range(2):
        part = pq.read_table(outputs.shard_path(d1, s, 2))
        outputs.write_parquet_file(outputs.shard_path(d1, s, 2), part.take(pa.array(range(part.num_rows)[::-1])))
    _, _, unsorted, _, _ = fold_d2(2)
    assert unsorted == streamed
