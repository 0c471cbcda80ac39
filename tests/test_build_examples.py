"""build_examples end to end on generated data: TFRecords read back through the reader, determinism, reruns,
ranges, multi-process workers and the ablation switches."""
import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from pipelines import build_examples
from tests.helpers import FNAPI, MULTIPROCESS
from tokenminds_model import vocabulary as vocab
from tokenminds_model.data import load_feature_spec, numpy_batches
from transforms.features import SOFT_FEATURE_DIM

EVENT_STARTS = {vocab.LFV_ID, vocab.SFV_ID, vocab.SEARCH_ID}


def examples_dir(root, day, name="examples"):
    return f"{root}/out/{name}/date={day}"


def serialized_records(directory):
    files = sorted(tf.io.gfile.glob(os.path.join(directory, "part-*.tfrecord.gz")))
    return collections.Counter(r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def build(flow, day, name, *extra, runner=FNAPI):
    return build_examples.run([f"--date={day}", f"--output_root={flow['root']}/out",
                               f"--examples_output={flow['root']}/out/{name}", *runner, *extra])


def all_batches(directory):
    return list(numpy_batches([directory], 16, seed=None, drop_remainder=False))


def test_examples_read_back_with_the_documented_layout(daily_flow):
    day = daily_flow["dates"][1]
    directory = examples_dir(daily_flow["root"], day)
    stats = daily_flow["stats"][day]
    layout = vocab.VocabularyLayout.load_manifest(os.path.join(directory, "vocabulary.json"))
    spec = load_feature_spec(directory)
    assert spec["tokens"]["shape"] == [1024] and spec["targets"]["shape"] == [8, 1 + 2]
    batches = all_batches(directory)
    total = sum(len(b["tokens"]) for b in batches)
    assert total == stats["examples"]["examples"] > 50
    assert stats["totals"]["balanced"] and os.path.exists(os.path.join(directory, "_SUCCESS"))
    sid_tokens = range(layout.sid_start, layout.disambiguation_range.start)
    for batch in batches:
        for tokens, length, targets, num_targets in zip(batch["tokens"], batch["length"][:, 0],
                                                         batch["targets"], batch["num_targets"][:, 0]):
            assert 0 < length <= 1024 and tokens[0] in EVENT_STARTS  # truncation never splits an event
            assert np.all(tokens[length:] == vocab.PAD_ID) and np.all(tokens[:length] != vocab.PAD_ID)
            assert 1 <= num_targets <= 8
            for row in targets[:num_targets]:
                assert row[0] in (vocab.LFV_ID, vocab.SFV_ID)
                infos = [layout.describe(int(t)) for t in row[1:]]
                assert [i.kind for i in infos] == ["sid", "sid"] and [i.level for i in infos] == [0, 1]
            assert np.all(targets[num_targets:] == vocab.PAD_ID)
            assert all(int(t) in sid_tokens for t in targets[:num_targets, 1:].ravel())
    mix = stats["examples"]["target_scenario_mix"]
    assert mix.get("LFV", 0) > 0 and mix.get("SFV", 0) > 0


def test_the_shuffle_join_builds_what_the_shard_merge_join_builds(daily_flow, tmp_path):
    """The flow's snapshots share one shard count, so its examples were built shard by shard (a merge join of the
    three sorted parts, nothing shuffled). Re-sharding the day before into one unsorted file makes the job read the
    snapshots whole and join them by user (a shuffle): a second run, the same multiset of serialized examples."""
    import datetime as dt
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms import histories

    day = daily_flow["dates"][1]
    before = (dt.date.fromisoformat(day) - dt.timedelta(days=1)).isoformat()
    out = tmp_path / "out"
    out.mkdir()
    for entry in os.listdir(f"{daily_flow['root']}/out"):
        if entry != "histories":
            os.symlink(f"{daily_flow['root']}/out/{entry}", out / entry)
    (out / "histories").mkdir()
    for entry in os.listdir(f"{daily_flow['root']}/out/histories"):
        source, target = f"{daily_flow['root']}/out/histories/{entry}", out / "histories" / entry
        if entry != f"date={before}":
            os.symlink(source, target)
            continue
        target.mkdir()
        assert histories.snapshot_shard_count(source) > 1
        rows = pq.read_table(sorted(glob.glob(f"{source}/*.parquet")))
        pq.write_table(rows.take(pa.array(np.random.default_rng(0).permutation(rows.num_rows))),
                       target / "part-00000-of-00001.parquet")
        for name in os.listdir(source):
            if not name.endswith(".parquet"):
                os.symlink(f"{source}/{name}", target / name)
    assert histories.snapshot_shard_count(str(out / "histories" / f"date={before}")) == 1
    [stats] = build_examples.run([f"--date={day}", f"--output_root={out}", f"--examples_output={tmp_path}/ex",
                                  *FNAPI])
    assert stats["totals"] == daily_flow["stats"][day]["totals"]
    assert serialized_records(f"{tmp_path}/ex/date={day}") == serialized_records(
        examples_dir(daily_flow["root"], day))


def test_multiprocess_workers_build_the_same_examples(daily_flow):
    day = daily_flow["dates"][1]
    build(daily_flow, day, "multi", runner=MULTIPROCESS)
    assert serialized_records(examples_dir(daily_flow["root"], day, "multi")) == serialized_records(
        examples_dir(daily_flow["root"], day))


def test_rerun_replaces_the_day_without_stale_shards(daily_flow):
    day = daily_flow["dates"][1]
    build(daily_flow, day, "rerun", "--example_shards=5")
    build(daily_flow, day, "rerun", "--example_shards=2")
    directory = examples_dir(daily_flow["root"], day, "rerun")
    shards = sorted(f for f in os.listdir(directory) if f.startswith("part-"))
    assert shards == ["part-00000-of-00002.tfrecord.gz", "part-00001-of-00002.tfrecord.gz"]
    assert serialized_records(directory) == serialized_records(examples_dir(daily_flow["root"], day))


def test_a_range_gives_each_day_its_daily_output(daily_flow):
    days = daily_flow["dates"][:2]
    build_examples.run([f"--start_date={days[0]}", f"--end_date={days[1]}",
                        f"--output_root={daily_flow['root']}/out", f"--examples_output={daily_flow['root']}/out/range",
                        *FNAPI])
    for day in days:
        assert serialized_records(examples_dir(daily_flow["root"], day, "range")) == serialized_records(
            examples_dir(daily_flow["root"], day))


def test_ablation_switches(daily_flow):
    day = daily_flow["dates"][1]
    [one] = build(daily_flow, day, "k1", "--max_targets=1", "--no_searches", "--scenarios=LFV")
    batches = all_batches(examples_dir(daily_flow["root"], day, "k1"))
    tokens = np.concatenate([b["tokens"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert targets.shape[1:] == (1, 3) and one["examples"]["targets_per_example"] == {
        "1": one["examples"]["examples"]}
    assert not np.isin(tokens, [vocab.SEARCH_ID, vocab.SFV_ID]).any()  # no queries, no short-form watches
    assert set(targets[:, 0, 0]) == {vocab.LFV_ID}

    [full] = build(daily_flow, day, "full", "--full_depth_sids", "--target_mode=next", "--feature_mode=soft")
    directory = examples_dir(daily_flow["root"], day, "full")
    spec = load_feature_spec(directory)
    assert spec["targets"]["shape"] == [8, 1 + 3]  # full depth: all 3 levels
    assert spec["soft_features"]["shape"] == [1024, SOFT_FEATURE_DIM]
    batch = all_batches(directory)[0]
    assert set(batch["num_targets"][:, 0]) == {1}  # next-watch mode: one target
    tokens, soft = batch["tokens"][0], batch["soft_features"][0]
    soft_positions = tokens == vocab.SOFT_ID
    assert soft_positions.any() and np.all(soft[~soft_positions] == 0) and np.any(soft[soft_positions] != 0)
    assert full["totals"]["balanced"]


def test_columnar_batches_build_the_reference_examples(daily_flow):
    """columnar.build_users on a batch of users, from snapshots trimmed before the shuffle (columnar.Trim), gives
    byte for byte what the per-user specification (sequences.make_user_examples via
    examples.reference_user_examples) gives on the full snapshots: histories far longer than max_tokens with
    searches, hard and soft features, caps small enough that the oldest kept events' time gaps reach past the trim,
    and a user with bad data dead-lettered without touching the others."""
    import datetime as dt

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.update_histories import snapshot_dir
    from tokenminds_model.query_tokenizer import QueryTokenizer
    from transforms import columnar, examples, features, schemas, sequences

    out = f"{daily_flow['root']}/out"
    day = dt.date.fromisoformat(daily_flow["dates"][1])
    tables = [pq.read_table(snapshot_dir(out, day + dt.timedelta(days=d)), columns=["user_id", "watches", "searches"])
              for d in (-1, 0, 1)]
    start, end = (schemas.to_epoch_us(t) for t in schemas.day_bounds(day))
    active = tables[1].filter(columnar.active_in(tables[1], start, end))
    # The longest histories, and the users with the most searches.
    by_watches = np.argsort(-pc.list_value_length(active.column("watches")).to_numpy())[:3]
    by_searches = np.argsort(-pc.list_value_length(active.column("searches")).to_numpy())[:3]
    user_ids = [active.column("user_id")[int(i)].as_py() for i in sorted(set(by_watches) | set(by_searches))]
    bad_user = user_ids[0]
    rows = [{r["user_id"]: r for r in t.to_pylist() if r["user_id"] in user_ids} for t in tables]
    for snapshot in (r[bad_user] for r in rows if bad_user in r):  # invalid: that user alone becomes a dead letter
        snapshot["watches"][-1]["video_duration_s"] = 0.0
    # A long history with searches: the most-searching user's events repeated weekly back in time (all snapshots).
    week, source = 7 * 86400 * 10 ** 6, active.column("user_id")[int(by_searches[0])].as_py()
    for r in rows:
        if source in r:
            long = {kind: [{**e, "event_ts_us": e["event_ts_us"] - k * week} for k in range(40, 0, -1)
                           for e in r[source][kind]] + r[source][kind] for kind in ("watches", "searches")}
            r["long_user"] = {**r[source], "user_id": "long_user", **long}
    user_ids.append("long_user")
    artifacts = (f"{out}/sid_model", f"{out}/query_tokenizer", f"{out}/feature_transform")
    layout = build_examples.vocabulary_layout(*artifacts)
    tokenizer, featurizer = QueryTokenizer.load(artifacts[1]), features.WatchFeaturizer(artifacts[2])
    for config in (sequences.SequenceConfig(max_tokens=64),
                   sequences.SequenceConfig(max_tokens=48, feature_mode="soft", max_targets=3),
                   sequences.SequenceConfig(max_tokens=200, max_watches=3, target_mode="next"),  # searches reach
                   # far past the watches
                   sequences.SequenceConfig(max_tokens=100, max_searches=2, feature_mode="soft")):
        trim = columnar.Trim.for_day(start, end, layout, config)
        packs = [dict(columnar.pack_snapshots(pa_table_of(list(r.values())), trim)) for r in rows]
        users = [(u, [p[u] for p in packs if u in p]) for u in user_ids]
        full = sum(len(r["long_user"]["watches"]) for r in rows if "long_user" in r)
        assert config.max_tokens < 10 * full and sum(len(p.w_ts) for p in dict(users)["long_user"]) < full / 10
        ctx = examples.ExampleBuildContext(layout, config, 0, artifacts[1], artifacts[2], start, end, str(day))
        spec = examples.feature_spec(config, layout)
        built = dict(columnar.build_users(users, start, end, layout, config, 0, tokenizer, featurizer))
        assert isinstance(built[bad_user], ValueError)
        with pytest.raises(ValueError):
            examples.reference_user_examples(bad_user, [r[bad_user] for r in rows if bad_user in r], tokenizer,
                                             featurizer, ctx)
        checked = 0
        for user_id in user_ids[1:]:
            expected, rewards = examples.reference_user_examples(user_id, [r[user_id] for r in rows if user_id in r],
                                                                 tokenizer, featurizer, ctx)
            got, got_rewards = built[user_id]
            serialized = [examples.serialize_example(e, spec) for e in got]
            assert serialized == [examples.serialize_example(e, spec) for e in expected] and got_rewards == rewards
            assert serialized == [serialize_example_with_tf_features(e, spec) for e in got]
            checked += len(expected)
        assert checked > 0 and built["long_user"][0]

    # A watch's features do not depend on the call it is featurized in (every call is padded to whole packets).
    raw = sequences.raw_watch_features(*(lambda t: (t.watches, t.watch_gaps_s()))(sequences.build_timeline(
        rows[1]["long_user"]["watches"])))
    together = featurizer.featurize_columns(raw)
    for i in (0, 1, 37, len(raw["watch_ratio"]) - 1):
        alone = featurizer.featurize_columns({k: v[i:i + 1] for k, v in raw.items()})
        assert np.array_equal(alone[1], together[1][i:i + 1]) and all(
            alone[0][name][0] == together[0][name][i] for name in together[0])


def pa_table_of(rows):
    import pyarrow as pa

    from transforms import schemas

    return pa.Table.from_pylist(rows, schema=pa.schema([schemas.HISTORIES_SCHEMA.field(n)
                                                        for n in ("user_id", "watches", "searches")]))


def serialize_example_with_tf_features(example: dict, spec: dict) -> bytes:
    """``examples.serialize_example`` as it was first written (one tf.train.Feature per feature): the bytes the fast
    proto filling must reproduce."""
    feature = {}
    for name, entry in spec.items():
        value = example[name]
        if entry["dtype"] == "string":
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(value).encode("utf-8")]))
            continue
        flat = np.asarray(value).reshape(-1)
        if entry["dtype"] == "int64":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=flat.astype(np.int64)))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=flat.astype(np.float32)))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)
