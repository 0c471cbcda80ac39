"""Nightly refresh: every snapshot user gets a row, bad users are dead-lettered and keep yesterday's row, reruns are
idempotent, serving inputs equal training inputs, the lookup honours expires_at, and broken checkpoints fail fast."""
from __future__ import annotations

import datetime as dt
import glob
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import refresh_users
from tests.helpers import (FNAPI, MULTIPROCESS, assert_translated, dataflow_args, read_parquet_dir,
                           transform_names)
from transforms import examples, representations, schemas

UTC = dt.timezone.utc
LINKED = ("sid_model", "query_tokenizer", "feature_transform", "video_sids", "examples")
PLANTED = ("planted_search_only", "planted_lfv_only", "planted_bad")


def planted_rows(real_row: dict, day: str, bad: bool) -> list:
    """Three users the sample lacks: searches only, one LFV watch only, and (on ``bad`` days) a watch whose SID
    codes lie outside the codebook, which the serving input builder must reject."""
    lfv_watch = dict(next(w for w in real_row["watches"] if w["scenario"] == "LFV"))
    broken = dict(lfv_watch, sid=[10 ** 6] * len(lfv_watch["sid"])) if bad else lfv_watch
    searches = [{"event_ts_us": lfv_watch["event_ts_us"], "query": "funny cats"}]
    base = {"snapshot_date": day, "sid_model_version": real_row["sid_model_version"]}
    return [dict(base, user_id="planted_search_only", watches=[], searches=searches),
            dict(base, user_id="planted_lfv_only", watches=[lfv_watch], searches=[]),
            dict(base, user_id="planted_bad", watches=[broken], searches=[])]


@pytest.fixture(scope="module")
def refresh_root(daily_flow, flow_model, tmp_path_factory):
    """The daily flow's artifacts, with the last two history snapshots copied and three users planted in each;
    ``planted_bad`` is fine on the first of those days and broken on the last."""
    root = tmp_path_factory.mktemp("refresh")
    source = daily_flow["root"] / "out"
    for name in LINKED:
        os.symlink(source / name, root / name)
    days = daily_flow["dates"][-2:]
    for day in days:
        directory = schemas.partition_dir(str(root), schemas.HISTORIES, day)
        shutil.copytree(schemas.partition_dir(str(source), schemas.HISTORIES, day), directory)
        real = read_parquet_dir(directory)
        pq.write_table(pa.Table.from_pylist(planted_rows(real[0], day, bad=day == days[-1]),
                                            schema=schemas.HISTORIES_SCHEMA),
                       os.path.join(directory, "part-planted.parquet"))
    return {"root": str(root), "days": days, "model": flow_model, "validated": source / "validated"}


def refresh(env, day, *extra, root=None):
    # A 36 h lifetime, so the first day's rows are still valid when the second day's run carries them over.
    [summary] = refresh_users.run([f"--date={day}", f"--output_root={root or env['root']}",
                                   f"--model={env['model']}", "--ttl_hours=36", *(extra or FNAPI)])
    return summary


def rows_by_user(root, day):
    return {row["user_id"]: row for row in read_parquet_dir(refresh_users.representations_dir(root, day))}


@pytest.fixture(scope="module")
def refreshed(refresh_root):
    first, last = refresh_root["days"]
    summaries = [refresh(refresh_root, first), refresh(refresh_root, last)]
    return {**refresh_root, "summaries": summaries}


def test_every_snapshot_user_gets_a_row_with_the_documented_layout(refreshed):
    first, _ = refreshed["days"]
    snapshot = read_parquet_dir(schemas.partition_dir(refreshed["root"], schemas.HISTORIES, first))
    rows = rows_by_user(refreshed["root"], first)
    assert sorted(rows) == sorted(r["user_id"] for r in snapshot)  # every user, active on the day or not
    shards = sorted(glob.glob(os.path.join(refresh_users.representations_dir(refreshed["root"], first), "*.parquet")))
    assert len(shards) == 2 and all(pq.read_metadata(path).num_rows > 0 for path in shards)  # spread over shards
    users = refreshed["summaries"][0]["tables"][representations.USERS][first]
    assert users["rows_in"] == users["rows_out"] == len(snapshot) and users["rows_dead"] == 0
    generated = dt.datetime.combine(dt.date.fromisoformat(first) + dt.timedelta(days=1), dt.time(), UTC)
    for user_id in PLANTED + (snapshot[0]["user_id"],):
        row = rows[user_id]
        assert len(row["embedding"]) == 16 and np.all(np.isfinite(row["embedding"]))
        assert row["generated_at"] == generated and row["expires_at"] == generated + dt.timedelta(hours=36)
        for scenario in schemas.SCENARIOS:  # search-only and one-scenario users are decoded for both scenarios
            tokens = [t for t in row["user_tokens"] if t["scenario"] == scenario]
            assert [t["rank"] for t in tokens] == list(range(20))
            scores = [t["score"] for t in tokens]
            assert scores == sorted(scores, reverse=True)
            assert all(len(t["sid"]) == 2 and t["token"] == f"sid_0_{t['sid'][0]} sid_1_{t['sid'][1]}"
                       for t in tokens)
    storage = refreshed["summaries"][0]["storage"]
    assert storage["tokens_per_user"] == 40 and storage["embedding_bytes_per_user"] == 16 * 4
    assert storage["token_bytes_per_user"] == 40 * (2 * 2 + 4)


def test_decoded_tokens_are_prefixes_of_catalogue_videos(refreshed):
    first, _ = refreshed["days"]
    catalogue = refresh_users.catalogue_prefixes(refreshed["root"], dt.date.fromisoformat(first), 2,
                                                 schemas.SCENARIOS)
    known = {s: {tuple(p) for p in prefixes} for s, prefixes in catalogue.items()}
    for row in rows_by_user(refreshed["root"], first).values():
        assert all(tuple(t["sid"]) in known[t["scenario"]] for t in row["user_tokens"])


def test_bad_user_is_dead_lettered_keeps_yesterdays_row_and_others_are_unaffected(refreshed):
    first, last = refreshed["days"]
    summary = refreshed["summaries"][1]
    users = summary["tables"][representations.USERS][last]
    assert users["dead_by_reason"] == {representations.SERVING_INPUT_ERROR: 1} and users["balanced"]
    assert summary["stats"] == {f"users.{representations.CARRIED_OVER}": 1}
    [dead] = read_parquet_dir(schemas.partition_dir(f"{refreshed['root']}/{schemas.DEAD_LETTER}",
                                                    schemas.USER_REPRESENTATIONS, last))
    assert '"planted_bad"' in dead["raw_row"] and "out of range" in dead["detail"].lower()
    today, yesterday = rows_by_user(refreshed["root"], last), rows_by_user(refreshed["root"], first)
    carried = today["planted_bad"]
    assert carried["carried_over_from"] == first and carried["embedding"] == yesterday["planted_bad"]["embedding"]
    assert carried["expires_at"] == yesterday["planted_bad"]["expires_at"]  # it keeps its own expiry
    # The other planted users are unchanged by their neighbour's failure (their histories did not change either).
    for user_id in ("planted_search_only", "planted_lfv_only"):
        assert today[user_id]["carried_over_from"] is None
        np.testing.assert_allclose(today[user_id]["embedding"], yesterday[user_id]["embedding"], atol=1e-5)


def test_rerun_replaces_the_day_identically(refreshed):
    _, last = refreshed["days"]
    directory = refresh_users.representations_dir(refreshed["root"], last)
    before = rows_by_user(refreshed["root"], last)
    open(os.path.join(directory, "part-stale-of-old-run.parquet"), "w").close()
    refresh(refreshed, last)
    assert not os.path.exists(os.path.join(directory, "part-stale-of-old-run.parquet"))
    assert rows_by_user(refreshed["root"], last) == before


def test_worker_processes_give_the_same_rows(refreshed, tmp_path):
    first, _ = refreshed["days"]
    for name in LINKED + (schemas.HISTORIES,):
        os.symlink(os.path.join(refreshed["root"], name), tmp_path / name)
    refresh(refreshed, first, *MULTIPROCESS, root=str(tmp_path))
    assert rows_by_user(str(tmp_path), first) == rows_by_user(refreshed["root"], first)


def test_serving_input_equals_the_training_example_history(daily_flow):
    """The same user, cutoff and snapshots give the same tokens through serving_history as in the TFRecords."""
    from tokenminds_model.data import numpy_batches
    from tokenminds_model.query_tokenizer import QueryTokenizer
    from tokenminds_model.vocabulary import VocabularyLayout
    from pipelines.build_examples import sequence_config, SequenceOptions
    from apache_beam.options.pipeline_options import PipelineOptions
    from transforms import features

    out = daily_flow["root"] / "out"
    day = daily_flow["dates"][1]
    directory = str(out / "examples" / f"date={day}")
    layout = VocabularyLayout.load_manifest(f"{directory}/vocabulary.json")
    config = sequence_config(PipelineOptions([]).view_as(SequenceOptions))
    tokenizer, featurizer = QueryTokenizer.load(str(out / "query_tokenizer")), features.WatchFeaturizer(
        str(out / "feature_transform"))
    snapshots = {}
    for snapshot_day in daily_flow["dates"][:3]:
        for row in read_parquet_dir(schemas.partition_dir(str(out), schemas.HISTORIES, snapshot_day)):
            snapshots.setdefault(row["user_id"], []).append(row)
    batch = next(numpy_batches([directory], batch_size=16, seed=None))
    checked = 0
    for i in range(16):
        user_id = batch["user_id"][i, 0].decode()
        history = examples.serving_history(snapshots[user_id], int(batch["cutoff_ts_us"][i, 0]), tokenizer,
                                           featurizer, layout, config)
        assert history.length == int(batch["length"][i, 0])
        np.testing.assert_array_equal(history.tokens, batch["tokens"][i])
        checked += 1
    assert checked == 16


def test_lookup_honours_expiry_and_falls_back_to_older_partitions(tmp_path):
    def publish(day, rows):
        directory = schemas.partition_dir(str(tmp_path), schemas.USER_REPRESENTATIONS, day)
        os.makedirs(directory)
        full = [{**{f.name: None for f in schemas.USER_REPRESENTATIONS_SCHEMA}, "user_tokens": [], **r} for r in rows]
        pq.write_table(pa.Table.from_pylist(full, schema=schemas.USER_REPRESENTATIONS_SCHEMA),
                       os.path.join(directory, "part-00000-of-00001.parquet"))
        open(os.path.join(directory, "_SUCCESS"), "w").close()

    t = dt.datetime(2026, 1, 3, tzinfo=UTC)  # the end of 2026-01-02
    publish("2026-01-01", [{"user_id": "old", "snapshot_date": "2026-01-01", "generated_at": t - dt.timedelta(days=1),
                            "expires_at": t}])
    publish("2026-01-02", [{"user_id": "a", "snapshot_date": "2026-01-02", "generated_at": t,
                            "expires_at": t + dt.timedelta(hours=24)}])
    incomplete = schemas.partition_dir(str(tmp_path), schemas.USER_REPRESENTATIONS, "2026-01-03")
    os.makedirs(incomplete)  # no _SUCCESS: never read
    store = representations.RepresentationStore(str(tmp_path))
    at = t + dt.timedelta(hours=5)
    result = store.lookup(["a", "old", "nobody"], at)
    assert result["a"].status == representations.FRESH and result["a"].row["snapshot_date"] == "2026-01-02"
    assert result["old"].status == representations.STALE  # found a day back, expired at t
    assert result["nobody"] == representations.LookupResult(representations.MISSING, None)
    assert store.lookup(["a"], t + dt.timedelta(hours=24))["a"].status == representations.STALE  # boundary: expired
    assert store.lookup(["a"], t + dt.timedelta(hours=24) - dt.timedelta(microseconds=1))["a"].status == \
        representations.FRESH
    # Before "a"'s row was generated it is not served; "old" was generated a day earlier and was valid then.
    before = store.lookup(["a", "old"], t - dt.timedelta(hours=1))
    assert before["a"].status == representations.MISSING and before["old"].status == representations.FRESH
    with pytest.raises(ValueError, match="timezone"):
        store.lookup(["a"], dt.datetime(2026, 1, 3))


def test_missing_or_corrupt_checkpoint_fails_before_reading_data(refresh_root, tmp_path):
    day = refresh_root["days"][-1]
    # The artifacts resolve; only the model is wrong, and no snapshot exists under this output root.
    args = [f"--date={day}", f"--output_root={refresh_root['root']}/nowhere", *FNAPI,
            *(f"--{name}={refresh_root['root']}/{name}" for name in ("sid_model", "query_tokenizer",
                                                                    "feature_transform"))]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        refresh_users.run(args + [f"--model={tmp_path}/no_model"])
    damaged = tmp_path / "damaged"
    shutil.copytree(refresh_root["model"], damaged)
    for path in glob.glob(f"{damaged}/params/**/*", recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 1000:
            with open(path, "r+b") as handle:
                handle.truncate(100)
    with pytest.raises(ValueError, match=str(damaged)):
        refresh_users.run(args + [f"--model={damaged}"])
    assert not os.path.exists(f"{refresh_root['root']}/nowhere")  # nothing was read or written


def test_refresh_translates_for_dataflow_with_parquet_and_bigquery_sinks(refreshed, translated_jobs):
    day = refreshed["days"][-1]
    common = [f"--date={day}", f"--output_root={refreshed['root']}", f"--model={refreshed['model']}",
              *dataflow_args()]
    refresh_users.run(common)
    refresh_users.run(common + ["--sink=bigquery", "--bq_project=tokenminds-ci", "--bq_output_dataset=users"])
    # SpreadUsers: the Reshuffle (fusion break) between building the inputs and RunInference.
    assert_translated(translated_jobs, 2, "SpreadUsers", "RunInference", "WriteRows", "WriteSummary")
    assert any("WriteToBigQuery" in name for name in transform_names(translated_jobs[1]))
    assert not any("WriteToBigQuery" in name for name in transform_names(translated_jobs[0]))


def test_bigquery_rows_target_the_days_partition():
    row = {"user_id": "u", "snapshot_date": "2026-01-02", "generated_at": dt.datetime(2026, 1, 3, tzinfo=UTC),
           "expires_at": dt.datetime(2026, 1, 4, tzinfo=UTC)}
    converted = refresh_users.bigquery_row(row)
    assert converted["partition_date"] == "2026-01-02"
    assert converted["generated_at"] == "2026-01-03T00:00:00+00:00"
    schema = schemas.bigquery_representations_schema()
    names = [f["name"] for f in schema["fields"]]
    assert names == [f.name for f in schemas.USER_REPRESENTATIONS_SCHEMA] + ["partition_date"]
    tokens = next(f for f in schema["fields"] if f["name"] == "user_tokens")
    assert tokens["type"] == "RECORD" and tokens["mode"] == "REPEATED"
    assert {"name": "sid", "type": "INT64", "mode": "REPEATED"} in tokens["fields"]


def test_batched_serving_inputs_equal_serving_history_per_user(daily_flow):
    """transforms.serving featurizes a whole table of snapshot rows in one call; every user's input equals
    examples.serving_history of that user's row alone (tokens exactly, soft features bit for bit), for the sample's
    users and for hand-made ones: a history far longer than max_tokens with more searches than max_searches,
    duplicated events, searches only, no events at all, a missing user_id, and a bad SID (an error of its own)."""
    import dataclasses

    from apache_beam.options.pipeline_options import PipelineOptions
    from pipelines.build_examples import SequenceOptions, sequence_config, vocabulary_layout
    from tokenminds_model.query_tokenizer import QueryTokenizer
    from transforms import features, serving

    out = daily_flow["root"] / "out"
    day = daily_flow["dates"][-1]
    layout = vocabulary_layout(str(out / "sid_model"), str(out / "query_tokenizer"), str(out / "feature_transform"))
    tokenizer = QueryTokenizer.load(str(out / "query_tokenizer"))
    featurizer = features.WatchFeaturizer(str(out / "feature_transform"))
    cutoff = schemas.to_epoch_us(schemas.day_bounds(dt.date.fromisoformat(day))[1])
    real = read_parquet_dir(schemas.partition_dir(str(out), schemas.HISTORIES, day))[:60]
    donor = max(real, key=lambda r: len(r["watches"]))
    hour = 3600 * 10 ** 6
    mixed = [next(w for r in real for w in r["watches"] if w["scenario"] == s) for s in ("LFV", "SFV", "SFV")]
    long_watches = [dict(w, event_ts_us=w["event_ts_us"] - k * hour - i, video_id=f"{w['video_id']}_{k}")
                    for k in range(150) for i, w in enumerate(mixed)]
    long_searches = [{"event_ts_us": cutoff - (2 * k + 1) * hour // 7, "query": f"funny cats {k}"} for k in range(70)]
    base = {"snapshot_date": day, "sid_model_version": donor["sid_model_version"]}
    made = [dict(base, user_id="long", watches=sorted(long_watches, key=lambda w: w["event_ts_us"]),
                 searches=long_searches),
            dict(base, user_id="duplicates", watches=donor["watches"][:4] * 2, searches=long_searches[:3] * 2),
            dict(base, user_id="search_only", watches=[], searches=long_searches[:5]),
            dict(base, user_id="nothing", watches=[], searches=[]),
            dict(base, user_id=None, watches=donor["watches"][:2], searches=[]),
            dict(base, user_id="bad_sid", watches=[dict(donor["watches"][0], sid=[10 ** 6] * 3)], searches=[])]
    rows = made[:2] + real + made[2:]
    table = pa.Table.from_pylist(rows, schema=schemas.HISTORIES_SCHEMA)
    hard = sequence_config(PipelineOptions([]).view_as(SequenceOptions))
    for config in (hard, dataclasses.replace(hard, feature_mode="soft"),
                   dataclasses.replace(hard, include_searches=False, max_tokens=96, scenarios=("LFV",))):
        built = dict(serving.build_serving_inputs(table, cutoff, layout, config, tokenizer, featurizer))
        assert sorted(built) == list(range(len(rows)))
        errors = 0
        for index, row in enumerate(rows):
            if row["user_id"] is None:
                assert isinstance(built[index], ValueError)
                continue
            try:
                expected = examples.serving_history([row], cutoff, tokenizer, featurizer, layout, config)
            except ValueError as error:  # the batch gives the same error for that user alone
                assert isinstance(built[index], ValueError) and str(built[index]) == str(error), row["user_id"]
                errors += 1
                continue
            got = built[index]
            assert got["length"] == expected.length, row["user_id"]
            np.testing.assert_array_equal(got["tokens"], expected.tokens, err_msg=row["user_id"])
            if config.feature_mode == "soft":
                np.testing.assert_array_equal(got["soft_features"], expected.soft_features, err_msg=row["user_id"])
            else:
                assert "soft_features" not in got
        # bad_sid's watch is an SFV one: with only LFV kept it never reaches a history, so it is no error there.
        assert errors == (0 if config.scenarios == ("LFV",) else 1)
        lengths = {rows[i]["user_id"]: built[i]["length"] for i in range(len(rows)) if isinstance(built[i], dict)}
        assert lengths["nothing"] == 0
        assert lengths["long"] > config.max_tokens - config.watch_token_count(layout) - 10


def test_downstream_study_runs_on_a_refresh_and_its_next_day(refreshed, tmp_path):
    """The downstream study end to end on the first refreshed day: build_adaptation for that day, then every variant
    on two seeds, labels from the next day's validated watches."""
    import json

    from pipelines import build_adaptation
    from tokenminds_model import downstream

    first, last = refreshed["days"]
    validated = str(refreshed["validated"])
    build_adaptation.run([f"--date={first}", f"--output_root={refreshed['root']}", f"--validated_root={validated}",
                          "--sid_spm_vocab_size=64", *FNAPI])
    output = tmp_path / "downstream"
    assert downstream.main([f"--output_root={refreshed['root']}", f"--refresh_date={first}",
                            f"--validated_root={validated}", f"--output={output}", "--seeds=2", "--max_epochs=2",
                            "--negatives=10"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    engaged = {r["user_id"] for r in read_parquet_dir(f"{validated}/watch_events/date={last}")
               if r["watch_time_s"] >= 0.5 * r["video_duration_s"]}
    assert metrics["data"]["users"] == len(engaged & set(rows_by_user(refreshed["root"], first))) >= 20
    assert metrics["data"]["label_days"] == [last] and metrics["data"]["le_ids_per_user"] > 0
    for variant in downstream.VARIANTS:
        runs = metrics["runs"][variant]
        assert len(runs) == 2 and all(0.0 <= r["auc"] <= 1.0 and r["log_loss"] > 0 for r in runs)
    assert (output / "downstream.png").stat().st_size > 0
    assert "| +emb+LE |" in (output / "report.md").read_text()
    # The flow model trained on examples through the first refreshed day, whose look-ahead reaches the label day:
    # the leakage check refuses that pairing and accepts the last day's refresh.
    with pytest.raises(ValueError, match="look-ahead targets reach the label window"):
        downstream.check_model_saw_no_labels(refreshed["model"], refreshed["root"], dt.date.fromisoformat(first))
    checked = downstream.check_model_saw_no_labels(refreshed["model"], refreshed["root"], dt.date.fromisoformat(last))
    assert checked["training_days"] and max(checked["training_days"]) < last
