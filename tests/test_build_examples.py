"""build_examples end to end on generated data: TFRecords read back through the reader, determinism, reruns,
ranges, multi-process workers and the ablation switches."""
import collections
import os

import numpy as np
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


def test_two_runs_give_the_same_multiset_of_serialized_examples(daily_flow):
    day = daily_flow["dates"][1]
    build(daily_flow, day, "again")
    assert serialized_records(examples_dir(daily_flow["root"], day, "again")) == serialized_records(
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
