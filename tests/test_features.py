"""The fitted feature transform: constant columns stay finite and reproducible, and features constant on the
reference watches get no tokens; the reader's seeded order repeats."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from tests.helpers import FNAPI
from transforms import features


def fit(rows, directory):
    with beam.Pipeline(options=PipelineOptions(FNAPI)) as p:
        _ = p | beam.Create(rows) | features.FitFeatureTransform(str(directory))


def test_a_constant_column_scores_zero_and_refits_to_the_same_version(tmp_path):
    # MovieLens without ratings: every watch ratio and watch time is the same value.
    rows = [{"watch_ratio": 0.8, "watch_time_s": 4800.0, "time_gap_s": float(i % 50), "liked": 0, "disliked": 0,
             "surface": "home", "device": "WEB"} for i in range(3000)]
    fit(rows, tmp_path / "a")
    fit(list(reversed(rows)), tmp_path / "b")
    columns = {name: np.asarray([r[name] for r in rows[:10]], dtype=object if name in ("surface", "device")
                                else np.float32 if name.endswith(("ratio", "_s")) else np.int64)
               for name in rows[0]}
    _, soft = features.WatchFeaturizer(str(tmp_path / "a")).featurize_columns(columns)
    assert np.all(np.isfinite(soft)) and np.all(soft[:, :2] == 0)  # constant columns: centred, not blown up
    assert np.any(soft[:, 2] != 0)  # the varying gap is still scaled
    assert features.transform_fn_version(str(tmp_path / "a")) == features.transform_fn_version(str(tmp_path / "b"))


def test_seeded_reader_order_repeats(daily_flow):
    from tokenminds_model.data import numpy_batches

    directory = f"{daily_flow['root']}/out/examples/date={daily_flow['dates'][1]}"
    first = [next(numpy_batches([directory], 8, seed=0))["user_id"].ravel().tolist() for _ in range(3)]
    assert first[0] == first[1] == first[2]


# ---------------------------------------------------------------------------------------------------------------
# Constant features: measured on the reference watches, left out of the layout (issue 13).
# ---------------------------------------------------------------------------------------------------------------
REFERENCE_DAY = "2026-01-02"
IMPLICIT_CONSTANT = ["watch_ratio", "surface", "device", "liked", "disliked"]


def _implicit_feedback_snapshot(root):
    """A history snapshot of REFERENCE_DAY: that day's watches look like imported implicit feedback (ratio 0.8,
    home, WEB, no likes; watch times and gaps vary); the day before, every column varies."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms import outputs, schemas

    day = schemas.to_epoch_us(schemas.day_bounds(schemas.parse_date(REFERENCE_DAY))[0])
    hour = 3600 * 1_000_000
    rows = []
    for u in range(24):
        watches = []
        for i in range(16):
            before = i < 6
            watch_time = 60.0 * (1 + (7 * u + 3 * i) % 90)
            watches.append(dict(
                video_id=f"v{(u * 5 + i) % 40}", scenario="LFV",
                event_ts_us=day + (i - 6) * hour + ((7 * u + 13 * i) % 50) * 60_000_000,
                watch_time_s=watch_time, video_duration_s=watch_time * (2.0 if before and i % 2 else 1.25),
                surface=schemas.SURFACES[i % 3] if before else "home",
                device=schemas.DEVICES[u % 3] if before else "WEB",
                liked=before and i % 2 == 0, disliked=before and i % 3 == 1, sid=[1, 2, 3]))
        rows.append(dict(user_id=f"u{u}", snapshot_date=REFERENCE_DAY, sid_model_version="sid-test",
                         watches=watches, searches=[]))
    directory = schemas.partition_dir(f"{root}/out", schemas.HISTORIES, REFERENCE_DAY)
    os.makedirs(directory, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.HISTORIES_SCHEMA), f"{directory}/part-00000.parquet")
    outputs.write_text_file(f"{directory}/{outputs.SUCCESS_MARKER}", "")
    return f"{root}/out"


@pytest.fixture(scope="module")
def implicit_fits(tmp_path_factory):
    """The transform fitted on the implicit-feedback reference day: by default, keeping constant features, and
    over every day the snapshot holds (--reference_days far past the epoch)."""
    from pipelines import fit_feature_transform

    out = _implicit_feedback_snapshot(tmp_path_factory.mktemp("implicit"))
    fits = {}
    for name, extra in [("default", []), ("keep", ["--keep_constant_features"]),
                        ("all_days", ["--reference_days=100000000"])]:
        directory = f"{out}/ft_{name}"
        fits[name] = fit_feature_transform.run([f"--date={REFERENCE_DAY}", f"--output_root={out}",
                                                f"--feature_transform={directory}", *extra, *FNAPI])
        fits[name]["dir"] = directory
    return fits


def test_constant_reference_features_get_no_tokens(implicit_fits):
    from tokenminds_model.vocabulary import VocabularyLayout
    from transforms.sequences import SequenceConfig

    metadata = implicit_fits["default"]
    assert metadata == {**features.read_transform_metadata(metadata["dir"]), "dir": metadata["dir"]}  # verified
    assert sorted(metadata["constant_features"]) == sorted(IMPLICIT_CONSTANT)
    assert metadata["constant_features"]["liked"] == 0 and metadata["constant_features"]["disliked"] == 0
    assert list(metadata["feature_sizes"]) == metadata["informative_features"] == ["watch_time", "time_gap"]
    assert metadata["num_reference_watches"] == 24 * 10
    layout = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=5,
                              feature_sizes=metadata["feature_sizes"])
    config = SequenceConfig()
    assert config.watch_token_count(layout) == 1 + config.sid_length(layout) + 2
    assert metadata["transform_fn_version"] != implicit_fits["keep"]["transform_fn_version"]


def test_keep_constant_features_keeps_the_fixed_layout(implicit_fits):
    metadata = implicit_fits["keep"]
    assert metadata["feature_sizes"] == features.FEATURE_SIZES
    assert sorted(metadata["constant_features"]) == sorted(IMPLICIT_CONSTANT)  # still reported
    # The fixed layout's version is the one a transform fitted before constant features were measured had.
    assert metadata["transform_fn_version"] == features.transform_fn_version(metadata["dir"])


def test_reference_days_widen_the_reference_to_earlier_watches(implicit_fits):
    import datetime as dt

    from pipelines.fit_feature_transform import reference_start

    utc = dt.timezone.utc
    assert reference_start(dt.date(2026, 1, 2), 1) == dt.datetime(2026, 1, 2, tzinfo=utc)
    assert reference_start(dt.date(2026, 1, 2), 2) == dt.datetime(2026, 1, 1, tzinfo=utc)
    assert reference_start(dt.date(2026, 1, 2), 10**30) == dt.datetime(1970, 1, 1, tzinfo=utc)
    metadata = implicit_fits["all_days"]
    assert metadata["reference_start_date"] == "1970-01-01" and metadata["num_reference_watches"] == 24 * 16
    # The day before varies in every column (ratios 0.5 and 0.8, three surfaces and devices, likes): all kept.
    assert metadata["constant_features"] == {}
    assert list(metadata["feature_sizes"]) == list(features.FEATURE_SIZES)


def test_an_example_of_the_reduced_layout_has_one_token_per_informative_feature(implicit_fits):
    from tokenminds_model import vocabulary
    from tokenminds_model.vocabulary import VocabularyLayout
    from transforms import sequences as seq
    from transforms.sequences import SequenceConfig

    metadata = implicit_fits["default"]
    layout = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=5,
                              feature_sizes=metadata["feature_sizes"])
    assert [r.name for r in layout.ranges if r.name.startswith("feat_")] == ["feat_watch_time", "feat_time_gap"]
    hour = 3600 * 1_000_000
    watches = [dict(video_id=f"v{i}", scenario="SFV" if i % 2 else "LFV", event_ts_us=(i + 1) * hour,
                    watch_time_s=60.0 * (i + 1), video_duration_s=75.0 * (i + 1), surface="home", device="WEB",
                    liked=False, disliked=False, sid=[i, 2, 3]) for i in range(3)]
    timeline = seq.build_timeline(watches)
    buckets, _ = features.WatchFeaturizer(metadata["dir"]).featurize_columns(
        seq.raw_watch_features(timeline.watches, timeline.watch_gaps_s()))
    config = SequenceConfig(max_tokens=64)
    history = seq.tokenize_history(timeline, layout, config, watch_features=buckets)
    L = config.sid_length(layout)
    expected = []
    for i, w in enumerate(timeline.watches):
        expected += [vocabulary.condition_token(w.scenario), *[layout.sid_token(level, w.sid[level])
                                                               for level in range(L)],
                     layout.feature_token("watch_time", int(buckets["watch_time"][i])),
                     layout.feature_token("time_gap", int(buckets["time_gap"][i]))]
    assert history.length == 3 * (1 + L + 2) == len(expected)
    assert history.tokens[:history.length].tolist() == expected


def test_all_constant_features_leave_a_watch_its_condition_and_sid_tokens(implicit_fits, tmp_path):
    import shutil

    from tokenminds_model.vocabulary import VocabularyLayout
    from transforms.sequences import SequenceConfig

    copy = tmp_path / "ft"
    shutil.copytree(implicit_fits["default"]["dir"], copy)
    metadata = features.write_transform_metadata(str(copy), REFERENCE_DAY, 3,
                                                 reference_buckets={name: [0] for name in features.FEATURE_SIZES})
    assert metadata["feature_sizes"] == {} and metadata["informative_features"] == []
    layout = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=5,
                              feature_sizes=metadata["feature_sizes"])
    config = SequenceConfig()
    assert layout.feature_names == () and config.watch_token_count(layout) == 1 + config.sid_length(layout)


def test_examples_built_with_a_reduced_transform_carry_one_token_per_kept_feature(daily_flow, tmp_path):
    """build_examples (the columnar path) with a transform whose metadata keeps only time_gap: every watch is
    <cond> + L SID tokens + one time_gap token."""
    import os
    import shutil

    from pipelines import build_examples
    from tokenminds_model import manifest as manifest_lib
    from tokenminds_model import vocabulary as vocab
    from tokenminds_model.data import numpy_batches

    root, day = daily_flow["root"], daily_flow["dates"][1]
    final = str(tmp_path / "ft")
    staged = manifest_lib.staged_artifact_dir(final, features.ARTIFACT_KIND)
    shutil.copytree(f"{root}/out/feature_transform", staged, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(manifest_lib.MANIFEST_FILENAME, features.METADATA_FILE))
    buckets = {name: [0] if name != "time_gap" else [0, 3] for name in features.FEATURE_SIZES}
    metadata = features.write_transform_metadata(staged, str(daily_flow["dates"][0]), 1, reference_buckets=buckets)
    manifest_lib.publish_artifact(staged, final, features.ARTIFACT_KIND,
                                  extra={"version": metadata["transform_fn_version"]})
    build_examples.run([f"--date={day}", f"--output_root={root}/out", f"--feature_transform={final}",
                        f"--examples_output={root}/out/examples_time_gap_only", *FNAPI])
    directory = f"{root}/out/examples_time_gap_only/date={day}"
    layout = vocab.VocabularyLayout.load_manifest(os.path.join(directory, "vocabulary.json"))
    assert layout.feature_names == ("time_gap",)
    L, watches = 2, 0
    for batch in numpy_batches([directory], 16, seed=None, drop_remainder=False):
        for tokens, length in zip(batch["tokens"], batch["length"][:, 0]):
            tokens = tokens[:length].tolist()
            kinds = [layout.describe(t).kind for t in tokens]
            starts = [p for p, t in enumerate(tokens) if t in (vocab.LFV_ID, vocab.SFV_ID)]
            assert [p for p, k in enumerate(kinds) if k == vocab.KIND_FEATURE] == [p + 1 + L for p in starts]
            assert all(layout.describe(tokens[p + 1 + L]).feature == "time_gap" for p in starts)
            assert all(kinds[p + 1:p + 1 + L] == [vocab.KIND_SID] * L for p in starts)
            watches += len(starts)
    assert watches > 100
