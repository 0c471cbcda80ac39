"""The sample-data generator: deterministic, schema-exact, and with the planted structure actually measurable.

Each planted property is measured on the generated tables (not read back from the generator's own parameters), so
a change that silently removes the structure fails here.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_sources import sample_data
from data_sources.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset
from pipelines import make_sample_data
from transforms import schemas

# Small enough to generate in well under a second, big enough for stable statistics.
CONFIG = SampleDataConfig(users=600, days=6, seed=7, lfv_videos=600, sfv_videos=1200,
                          new_lfv_videos_per_day=10, new_sfv_videos_per_day=30)


@pytest.fixture(scope="module")
def dataset():
    return generate_sample_dataset(CONFIG)


@pytest.fixture(scope="module")
def written(dataset, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sample"))
    write_sample_dataset(dataset, root)
    return root


def _with_partition(dataset, table_name: str) -> pd.DataFrame:
    """All partitions of a table as one frame, with the partition date each row was filed under."""
    frames = []
    for date, rows in dataset.tables[table_name].items():
        frame = rows.to_pandas()
        frame["partition_date"] = date
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _in_partition_day(frame: pd.DataFrame) -> pd.Series:
    return frame["event_ts"].dt.strftime("%Y-%m-%d") == frame["partition_date"]


@pytest.fixture(scope="module")
def all_watches(dataset):
    return _with_partition(dataset, schemas.WATCH_EVENTS)


@pytest.fixture(scope="module")
def watches(all_watches, dataset):
    """The well-formed watches, joined with their video's true topic."""
    ok = (all_watches["user_id"].notna() & np.isfinite(all_watches["watch_time_s"])
          & (all_watches["watch_time_s"] >= 0) & all_watches["scenario"].isin(schemas.SCENARIOS)
          & _in_partition_day(all_watches) & ~all_watches.duplicated(list(schemas.DEDUP_KEY[schemas.WATCH_EVENTS])))
    truth = dataset.video_truth.to_pandas()[["video_id", "topic", "subtopic"]]
    return all_watches[ok].merge(truth, on="video_id", how="left", validate="many_to_one")


@pytest.fixture(scope="module")
def all_searches(dataset):
    return _with_partition(dataset, schemas.SEARCH_EVENTS)


@pytest.fixture(scope="module")
def searches(all_searches):
    ok = ((all_searches["query"].str.len() > 0) & (all_searches["query"].str.len() <= schemas.MAX_QUERY_CHARS)
          & _in_partition_day(all_searches) & ~all_searches.duplicated(list(schemas.DEDUP_KEY[schemas.SEARCH_EVENTS])))
    return all_searches[ok]


@pytest.fixture(scope="module")
def catalog(dataset):
    """Well-formed videos with their truth and embeddings as a matrix."""
    videos = dataset.table(schemas.VIDEOS)
    ok = pc.equal(pc.list_value_length(videos["content_embedding"]), CONFIG.embedding_dim)
    videos = videos.filter(ok)
    truth = dataset.video_truth.to_pandas().set_index("video_id").loc[videos["video_id"].to_pylist()]
    embeddings = np.asarray(pc.list_flatten(videos["content_embedding"]), np.float32)
    return truth.reset_index(), embeddings.reshape(len(truth), CONFIG.embedding_dim)


# ---------------------------------------------------------------------------------------------------------------
# Determinism and the contract.
# ---------------------------------------------------------------------------------------------------------------
def _same_rows(first: pa.Table, second: pa.Table) -> bool:
    """Table equality that counts NaN as equal to NaN (planted bad rows hold NaN watch times)."""
    def nan_as_sentinel(table: pa.Table) -> pa.Table:
        for i, field in enumerate(table.schema):
            if pa.types.is_floating(field.type):
                column = table.column(i)
                table = table.set_column(i, field, pc.if_else(pc.is_nan(column), -1.0e300, column))
        return table
    return nan_as_sentinel(first).equals(nan_as_sentinel(second))


def _assert_same(first, second):
    for name in schemas.INPUT_TABLES:
        assert first.tables[name].keys() == second.tables[name].keys()
        for date in first.tables[name]:
            assert _same_rows(first.tables[name][date], second.tables[name][date]), (name, date)
    assert first.video_truth.equals(second.video_truth)
    assert first.user_truth.equals(second.user_truth)
    assert first.planted_bad_rows == second.planted_bad_rows


def test_same_seed_gives_identical_tables_and_files(dataset, written, tmp_path):
    again = generate_sample_dataset(CONFIG)
    _assert_same(dataset, again)
    write_sample_dataset(again, str(tmp_path))
    for table in schemas.INPUT_TABLES:
        for date in CONFIG.dates:
            relative = os.path.join(schemas.partition_dir("", table, date).lstrip("/"), sample_data.PART_FILE)
            with open(os.path.join(written, relative), "rb") as a, open(os.path.join(tmp_path, relative), "rb") as b:
                assert a.read() == b.read(), relative
            # Each partition's landing marker (written after its data), what the daily DAG's first sensor waits for.
            marker = os.path.join(written, os.path.dirname(relative), "_SUCCESS")
            assert os.path.getsize(marker) == 0
            assert os.path.getmtime(marker) >= os.path.getmtime(os.path.join(written, relative))


def test_different_seed_gives_different_data(dataset):
    other = generate_sample_dataset(dataclasses.replace(CONFIG, seed=CONFIG.seed + 1))
    assert not _same_rows(other.table(schemas.WATCH_EVENTS), dataset.table(schemas.WATCH_EVENTS))
    assert not other.table(schemas.VIDEOS).equals(dataset.table(schemas.VIDEOS))


def test_tables_match_the_schemas_for_every_date(dataset):
    for name in schemas.INPUT_TABLES:
        assert list(dataset.tables[name]) == CONFIG.dates
        for date, rows in dataset.tables[name].items():
            assert rows.schema.equals(schemas.input_schema(name)), (name, date)
    assert dataset.video_truth.schema.equals(sample_data.VIDEO_TRUTH_SCHEMA)
    assert dataset.user_truth.schema.equals(sample_data.USER_TRUTH_SCHEMA)
    assert dataset.user_truth.num_rows == CONFIG.users
    for date in CONFIG.dates:  # every day has activity
        assert dataset.tables[schemas.WATCH_EVENTS][date].num_rows > 0
        assert dataset.tables[schemas.SEARCH_EVENTS][date].num_rows > 0


def test_ids_surfaces_and_devices_are_from_the_contract(all_watches):
    assert set(all_watches["surface"]) <= set(schemas.SURFACES)
    assert set(all_watches["device"]) <= set(schemas.DEVICES)
    ids = pd.concat([all_watches["user_id"].dropna(), all_watches["video_id"]])
    assert ids.str.len().max() <= schemas.MAX_ID_CHARS


def test_events_are_sorted_by_user_and_time_within_each_file(dataset):
    for name in (schemas.WATCH_EVENTS, schemas.SEARCH_EVENTS):
        for date, rows in dataset.tables[name].items():
            frame = rows.to_pandas()
            frame["partition_date"] = date
            frame = frame[frame["user_id"].notna() & _in_partition_day(frame)]  # planted rows may be out of place
            keys = list(zip(frame["user_id"], frame["event_ts"]))
            assert keys == sorted(keys), (name, date)


# ---------------------------------------------------------------------------------------------------------------
# The catalog.
# ---------------------------------------------------------------------------------------------------------------
def test_every_topic_is_in_both_catalogs_and_watched_in_both(dataset, watches):
    truth = dataset.video_truth.to_pandas()
    for scenario in schemas.SCENARIOS:
        assert set(truth.loc[truth["scenario"] == scenario, "topic"]) == set(range(CONFIG.topics))
        assert set(watches.loc[watches["scenario"] == scenario, "topic"]) == set(range(CONFIG.topics))


def test_durations_by_scenario(all_watches):
    lfv = all_watches.loc[all_watches["scenario"] == "LFV", "video_duration_s"]
    sfv = all_watches.loc[all_watches["scenario"] == "SFV", "video_duration_s"]
    assert lfv.between(5 * 60, 60 * 60).all() and sfv.between(10, 60).all()


def test_most_videos_published_on_the_start_date_and_some_every_later_day(dataset):
    counts = dataset.row_counts()[schemas.VIDEOS]
    assert counts[CONFIG.start_date] > 0.8 * sum(counts.values())
    assert all(counts[date] > 0 for date in CONFIG.dates[1:])
    for date, rows in dataset.tables[schemas.VIDEOS].items():  # partitioned by publish date
        assert set(pc.strftime(rows["publish_ts"], "%Y-%m-%d").to_pylist()) == {date}


def test_embeddings_cluster_by_topic(catalog):
    truth, embeddings = catalog
    topic = truth["topic"].to_numpy()
    norms = np.linalg.norm(embeddings, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    centroids = np.stack([embeddings[topic == t].mean(axis=0) for t in range(CONFIG.topics)])
    recovered = np.argmax(embeddings @ centroids.T, axis=1) == topic
    assert recovered.mean() > 0.95

    rng = np.random.default_rng(0)
    sample = rng.choice(len(topic), size=1500, replace=False)
    similarity = embeddings[sample] @ embeddings[sample].T
    same_topic = topic[sample][:, None] == topic[sample][None, :]
    not_self = ~np.eye(len(sample), dtype=bool)
    within, between = similarity[same_topic & not_self].mean(), similarity[~same_topic].mean()
    assert within > between + 0.3, (within, between)


def test_embeddings_have_subtopic_structure_inside_topics(catalog):
    truth, embeddings = catalog
    topic, subtopic = truth["topic"].to_numpy(), truth["subtopic"].to_numpy()
    rng = np.random.default_rng(1)
    sample = rng.choice(len(topic), size=1500, replace=False)
    similarity = embeddings[sample] @ embeddings[sample].T
    same_topic = topic[sample][:, None] == topic[sample][None, :]
    same_subtopic = same_topic & (subtopic[sample][:, None] == subtopic[sample][None, :])
    not_self = ~np.eye(len(sample), dtype=bool)
    within_subtopic = similarity[same_subtopic & not_self].mean()
    other_subtopic = similarity[same_topic & ~same_subtopic].mean()
    assert within_subtopic > other_subtopic + 0.1, (within_subtopic, other_subtopic)
    # Nearest sub-topic centroid among the video's own topic recovers the sub-topic.
    key = topic * CONFIG.subtopics_per_topic + subtopic
    centroids = np.stack([embeddings[key == k].mean(axis=0) for k in range(key.max() + 1)])
    scores = (embeddings @ centroids.T).reshape(len(key), CONFIG.topics, CONFIG.subtopics_per_topic)
    assert (np.argmax(scores[np.arange(len(key)), topic], axis=1) == subtopic).mean() > 0.9


# ---------------------------------------------------------------------------------------------------------------
# Users and behaviour.
# ---------------------------------------------------------------------------------------------------------------
def test_users_watch_mostly_their_top_topics(dataset, watches):
    per_user = watches.groupby(["user_id", "topic"]).size().unstack(fill_value=0)
    per_user = per_user[per_user.sum(axis=1) >= 10]
    top3 = np.sort(per_user.to_numpy(), axis=1)[:, -3:].sum(axis=1) / per_user.sum(axis=1).to_numpy()
    chance = 3 / CONFIG.topics
    assert top3.mean() > 0.75 > chance + 0.4, top3.mean()

    # And those top topics are the planted interests.
    users = dataset.user_truth.to_pandas()
    interests = {user: set(first) | set(last)
                 for user, first, last in zip(users["user_id"], users["interests"], users["final_interests"])}
    in_interest = [topic in interests[user] for user, topic in zip(watches["user_id"], watches["topic"])]
    assert np.mean(in_interest) > 0.75


def test_about_half_the_users_are_active_in_both_scenarios(watches):
    scenarios_per_user = watches.groupby("user_id")["scenario"].nunique()
    share = (scenarios_per_user == 2).mean()
    assert 0.35 <= share <= 0.65, share


def test_activity_is_long_tailed_and_follows_truth(dataset, watches, all_watches):
    events = watches.groupby("user_id").size().sort_values(ascending=False)
    top_decile = events.iloc[: len(events) // 10].sum() / events.sum()
    assert top_decile > 0.3, top_decile
    activity = dataset.user_truth.to_pandas().set_index("user_id")["activity"]
    events = events.reindex(activity.index, fill_value=0)
    heavy, light = activity >= activity.quantile(0.75), activity <= activity.quantile(0.25)
    assert events[heavy].mean() > 3 * events[light].mean()


def test_not_every_user_is_active_every_day(watches):
    active_days = watches.groupby("user_id")["partition_date"].nunique()
    share_of_user_days = active_days.sum() / (CONFIG.users * CONFIG.days)
    assert 0.2 < share_of_user_days < 0.9, share_of_user_days
    assert (active_days < CONFIG.days).mean() > 0.5


def test_interests_drift_slowly(dataset):
    users = dataset.user_truth.to_pandas()
    changed = np.mean([set(a) != set(b) for a, b in zip(users["interests"], users["final_interests"])])
    assert 0.05 < changed < 0.6, changed
    counts = users["interests"].apply(len)
    assert set(counts) == {1, 2, 3}


def test_sessions_are_bursts_separated_by_hours(watches):
    ordered = watches.sort_values(["user_id", "event_ts"])
    same_user_day = ((ordered["user_id"] == ordered["user_id"].shift())
                     & (ordered["partition_date"] == ordered["partition_date"].shift()))
    gaps_s = ordered["event_ts"].diff().dt.total_seconds()[same_user_day]
    assert (gaps_s > 0).all()
    assert (gaps_s < 15 * 60).mean() > 0.8  # inside a session: seconds to minutes
    assert (gaps_s > 60 * 60).mean() > 0.01  # between sessions: hours
    sfv_gaps = gaps_s[ordered.loc[same_user_day, "scenario"] == "SFV"]
    assert sfv_gaps.median() < 120


def test_searches_are_followed_by_watches_of_the_searched_topic(dataset, watches, searches):
    vocabulary = {word: topic for topic, words in enumerate(dataset.topic_vocabulary) for word in words}
    after = pd.merge_asof(searches.sort_values("event_ts"),
                          watches.sort_values("event_ts")[["user_id", "event_ts", "surface", "topic"]],
                          on="event_ts", by="user_id", direction="forward", tolerance=pd.Timedelta(minutes=5),
                          allow_exact_matches=False)
    followed = after["surface"] == "search"
    assert followed.mean() > 0.9, followed.mean()
    query_topics = after["query"].apply(lambda q: {vocabulary[w] for w in q.split() if w in vocabulary})
    assert (query_topics.apply(len) == 1).all()  # a query's topic words all come from one topic
    matches = [topic in topics for topic, topics in zip(after.loc[followed, "topic"], query_topics[followed])]
    assert np.mean(matches) > 0.95


def test_watches_only_reference_published_videos(dataset, watches):
    published = dataset.table(schemas.VIDEOS).to_pandas()[["video_id", "publish_ts"]]
    joined = watches.merge(published, on="video_id", how="left")
    assert joined["publish_ts"].notna().all()
    assert (joined["publish_ts"] <= joined["event_ts"]).all()
    # New videos do get watched, so incremental SID assignment matters.
    assert (joined["publish_ts"] > pd.Timestamp(CONFIG.start_date, tz="UTC")).sum() > 0


def test_engagement_is_realistic(watches):
    ratio = watches["watch_time_s"] / watches["video_duration_s"]
    assert ratio.between(0, sample_data.MAX_WATCH_RATIO).all()
    assert 0.01 < watches["liked"].mean() < 0.1
    assert 0 < watches["disliked"].mean() < 0.01
    assert not (watches["liked"] & watches["disliked"]).any()
    sfv = watches[watches["scenario"] == "SFV"]
    assert (sfv["surface"] == "shorts_feed").mean() > 0.7


def test_interest_matching_watches_are_watched_longer(dataset, watches):
    users = dataset.user_truth.to_pandas()
    held = {user: set(first) & set(last)  # interests held on the first and the last day
            for user, first, last in zip(users["user_id"], users["interests"], users["final_interests"])}
    matches = np.array([topic in held[user] for user, topic in zip(watches["user_id"], watches["topic"])])
    ratio = (watches["watch_time_s"] / watches["video_duration_s"]).to_numpy()
    assert ratio[matches].mean() > ratio[~matches].mean() + 0.2


# ---------------------------------------------------------------------------------------------------------------
# Planted bad rows, the files and the CLI.
# ---------------------------------------------------------------------------------------------------------------
def _read_partitioned(root: str, table: str) -> pd.DataFrame:
    frames = []
    for date in CONFIG.dates:
        frame = pq.read_table(os.path.join(schemas.partition_dir(root, table, date), sample_data.PART_FILE))
        frame = frame.to_pandas()
        frame["partition_date"] = date
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_bad_rows_in_the_files_match_the_planted_counts(written):
    with open(os.path.join(written, sample_data.MANIFEST_FILE)) as f:
        planted = json.load(f)["planted_bad_rows"]
    assert set(planted) == set(sample_data.BAD_ROW_KINDS)
    assert all(count > 0 for count in planted.values())

    watch = _read_partitioned(written, schemas.WATCH_EVENTS)
    search = _read_partitioned(written, schemas.SEARCH_EVENTS)
    videos = pq.read_table(os.path.join(written, schemas.VIDEOS))
    found = {
        "null_user_id": watch["user_id"].isna().sum(),
        "nan_watch_time": watch["watch_time_s"].isna().sum(),
        "negative_watch_time": (watch["watch_time_s"] < 0).sum(),
        "unknown_scenario": (~watch["scenario"].isin(schemas.SCENARIOS)).sum(),
        "duplicate_watch_event": watch.duplicated(list(schemas.DEDUP_KEY[schemas.WATCH_EVENTS])).sum(),
        "watch_ts_outside_partition": (~_in_partition_day(watch)).sum(),
        "empty_query": (search["query"] == "").sum(),
        "overlong_query": (search["query"].str.len() > schemas.MAX_QUERY_CHARS).sum(),
        "duplicate_search_event": search.duplicated(list(schemas.DEDUP_KEY[schemas.SEARCH_EVENTS])).sum(),
        "search_ts_outside_partition": (~_in_partition_day(search)).sum(),
        "wrong_embedding_length": pc.sum(pc.not_equal(pc.list_value_length(videos["content_embedding"]),
                                                      CONFIG.embedding_dim)).as_py(),
    }
    assert {kind: int(count) for kind, count in found.items()} == planted
    watch_bad = sum(c for k, c in planted.items() if sample_data.BAD_ROW_KINDS[k] == schemas.WATCH_EVENTS)
    assert watch_bad == pytest.approx(CONFIG.bad_row_rate * len(watch), rel=0.2)


def test_no_bad_rows_when_the_rate_is_zero():
    clean = generate_sample_dataset(dataclasses.replace(CONFIG, users=100, bad_row_rate=0.0))
    assert sum(clean.planted_bad_rows.values()) == 0
    watch = clean.table(schemas.WATCH_EVENTS)
    assert watch["user_id"].null_count == 0
    assert pc.all(pc.greater_equal(watch["watch_time_s"], 0)).as_py()


def test_titles_come_from_the_topic_vocabulary_and_name_the_subtopic(dataset):
    truth = dataset.video_truth.to_pylist()
    generic = set(sample_data.GENERIC_QUERY_WORDS)
    for video in truth:
        words = dataset.topic_vocabulary[video["topic"]]
        first, *rest = video["title"].split(" ")
        assert first == words[video["subtopic"] % CONFIG.words_per_topic]
        assert len(rest) == 2 and all(w in words or w in generic for w in rest), video
    # Text separates topics: no word of one topic's vocabulary appears in another topic's titles.
    owner = {w: t for t, words in enumerate(dataset.topic_vocabulary) for w in words}
    assert all(owner.get(w, v["topic"]) == v["topic"] for v in truth for w in v["title"].split(" "))
    # Titles are varied within a sub-topic, and drawn from their own random stream (seed-stable, like the rest).
    assert len({v["title"] for v in truth}) > 0.5 * len(truth)
    assert dataset.catalog.column("title").to_pylist() == [v["title"] for v in truth]


def test_parquet_round_trip_preserves_schema_and_rows(dataset, written):
    for name in schemas.INPUT_TABLES:
        for date in CONFIG.dates:
            path = os.path.join(schemas.partition_dir(written, name, date), sample_data.PART_FILE)
            assert pq.read_metadata(path).row_group(0).column(0).compression == "ZSTD"
            back = pq.read_table(path)
            assert back.schema.equals(schemas.input_schema(name)), (name, date)
            assert _same_rows(back, dataset.tables[name][date]), (name, date)
    truth = os.path.join(written, sample_data.TRUTH_DIR)
    assert pq.read_table(os.path.join(truth, "videos.parquet")).equals(dataset.video_truth)
    assert pq.read_table(os.path.join(truth, "users.parquet")).equals(dataset.user_truth)
    catalog = pq.read_table(os.path.join(written, schemas.CATALOG_DIR, "items.parquet"))
    assert catalog.schema.equals(schemas.CATALOG_SCHEMA) and catalog.equals(dataset.catalog)
    with open(os.path.join(written, sample_data.MANIFEST_FILE)) as f:
        manifest = json.load(f)
    assert manifest["row_counts"] == dataset.row_counts()
    assert manifest["embedding_dim"] == CONFIG.embedding_dim
    assert manifest["config"] == dataclasses.asdict(CONFIG)


def test_rewriting_replaces_the_previous_output(tmp_path):
    root = str(tmp_path)
    write_sample_dataset(generate_sample_dataset(dataclasses.replace(CONFIG, users=60, days=3)), root)
    stray = os.path.join(schemas.partition_dir(root, schemas.WATCH_EVENTS, CONFIG.dates[0]), "stray.parquet")
    open(stray, "w").close()
    unrelated = os.path.join(root, "notes.txt")
    open(unrelated, "w").close()

    write_sample_dataset(generate_sample_dataset(dataclasses.replace(CONFIG, users=60, days=2)), root)
    for table in schemas.INPUT_TABLES:
        assert sorted(os.listdir(os.path.join(root, table))) == [f"date={d}" for d in CONFIG.dates[:2]]
    assert not os.path.exists(stray)
    assert os.path.exists(unrelated)  # only the directories the generator owns are replaced
    with open(os.path.join(root, sample_data.MANIFEST_FILE)) as f:
        assert json.load(f)["config"]["days"] == 2


def test_cli_writes_the_dataset_and_prints_a_summary(tmp_path, capsys):
    root = str(tmp_path / "out")
    manifest = make_sample_data.main([f"--output_root={root}", "--users=80", "--days=2", "--seed=3",
                                      "--start_date=2026-02-01", "--bad_row_rate=0.001"])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "watch_events=" in line and " s" in line
    assert manifest["dates"] == ["2026-02-01", "2026-02-02"]
    assert manifest["config"]["bad_row_rate"] == 0.001
    assert os.path.exists(os.path.join(schemas.partition_dir(root, schemas.VIDEOS, "2026-02-02"),
                                       sample_data.PART_FILE))


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError):
        SampleDataConfig(start_date="2026/01/01")
    with pytest.raises(ValueError):
        SampleDataConfig(topics=3)  # not more topics than max_interests: drift could not find a new one
    with pytest.raises(ValueError):
        SampleDataConfig(lfv_videos=10)  # fewer videos than sub-topics
    with pytest.raises(ValueError, match="lfv_search_session_prob"):
        SampleDataConfig(lfv_search_session_prob=1.5)


def test_search_heavy_sample_opens_more_sessions_with_a_search():
    plain = generate_sample_dataset(dataclasses.replace(CONFIG, users=100))
    heavy = generate_sample_dataset(dataclasses.replace(CONFIG, users=100, lfv_search_session_prob=0.8,
                                                        sfv_search_session_prob=0.5))
    assert heavy.table(schemas.SEARCH_EVENTS).num_rows > 2.5 * plain.table(schemas.SEARCH_EVENTS).num_rows


def test_history_watches_gives_every_user_a_valid_prior_history_near_the_cap():
    from transforms.validation import validate_row

    config = dataclasses.replace(CONFIG, users=20, days=2, bad_row_rate=0.0, history_watches=1200)
    history = generate_sample_dataset(config)
    first_day = history.tables[schemas.WATCH_EVENTS][config.dates[0]]
    per_user = first_day.group_by("user_id").aggregate([("event_ts", "count")])["event_ts_count"].to_numpy()
    assert len(per_user) == config.users and per_user.min() >= 0.9 * 1200  # near the cap, from day one
    assert first_day.group_by(["user_id", "event_ts"]).aggregate([]).num_rows == first_day.num_rows
    date = schemas.parse_date(config.dates[0])
    assert all(validate_row(schemas.WATCH_EVENTS, row, date)[1] is None for row in first_day.to_pylist())
    # Deterministic for a seed; the later days are the dataset without the option, since its stream is its own.
    assert generate_sample_dataset(config).tables[schemas.WATCH_EVENTS][config.dates[0]].equals(first_day)
    plain = generate_sample_dataset(dataclasses.replace(config, history_watches=0))
    for table in (schemas.VIDEOS, schemas.SEARCH_EVENTS):
        assert history.table(table).equals(plain.table(table))
    assert history.tables[schemas.WATCH_EVENTS][config.dates[1]].equals(
        plain.tables[schemas.WATCH_EVENTS][config.dates[1]])
    with pytest.raises(ValueError):
        dataclasses.replace(config, history_watches=-1)
