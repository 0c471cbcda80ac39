"""Deterministic synthetic sample data with planted, measurable structure.

The generator produces the three input tables of the data contract (``transforms/schemas.py``): ``videos``,
``watch_events`` and ``search_events``, one pyarrow table per partition date, plus ground truth the data was drawn
from (each video's topic and sub-topic, each user's interests and activity). Tests and demos compare what the
pipelines learn against that truth.

What is planted, and why:

* **Catalog geometry.** Every video belongs to a topic and a sub-topic. Its content embedding is
  ``normalise(topic centroid + sub-topic offset + noise)``, so the first RQ-VAE level can recover topics and the
  next one sub-topics.
* **Two scenarios.** LFV (long-form, 5-60 min) and SFV (short-form, 10-60 s) catalogs cover every topic.
* **A growing catalog.** Most videos are published on the start date; a few more every later day, so incremental
  SID assignment has work. A video is watchable from the day after it is published (the start-date catalog from
  the start date's midnight), so no watch ever precedes its video's publish time.
* **Users.** 1-3 weighted topic interests that drift slowly (a small daily chance to swap one), about half the
  users active in both scenarios, long-tailed activity (lognormal), and not every user active every day.
* **Sessions.** A user's active day holds a few sessions, each in its own slot of the day (so sessions are hours
  apart); inside a session events follow each other after the previous watch plus a few seconds of browsing.
  Consecutive watches often stay on the same topic.
* **Search.** Some sessions open with a search whose query comes from the topic's vocabulary, followed seconds
  later by watches of that topic on surface ``search``.
* **Titles.** Every video has a title from its topic's vocabulary: its sub-topic's word first, then two words of
  the topic (or generic ones), e.g. "vetu kolami best". Titles are item text for whatever grounds SIDs in text; they
  are written to ``_catalog/items.parquet`` (the dataset importer's catalog schema), not to the input tables.
* **Engagement.** Watch-time ratios (0 to 1.2 of the duration) are higher for videos matching the user's
  interests; likes are a few percent, dislikes well under one percent.
* **Long histories (optional).** With ``history_watches`` > 0 each user also gets a prior history of about that
  many watches on the start date (a dense first day, like a backfill of what they watched before), so the daily
  jobs see users at the 1,200-watch history cap from the first day on. These watches are spread evenly over the day,
  of the user's interests and the start-date catalog, with the same engagement model as the sessions' watches.
* **Bad rows.** About ``bad_row_rate`` of each table's rows are deliberately broken (one defect per row) so the
  validation step has dead letters; how many of each kind is recorded in ``planted_bad_rows``.

Everything is drawn from ``numpy.random.default_rng([seed, stream])`` with one fixed stream per concern, so the same
config gives identical tables, and the work is vectorised over all users and days at once.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms import outputs, schemas

# ---------------------------------------------------------------------------------------------------------------
# Constants of the generated layout.
# ---------------------------------------------------------------------------------------------------------------
SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US
LFV_CODE, SFV_CODE, UNKNOWN_SCENARIO_CODE = 0, 1, 2  # scenario codes in the arrays below
UNKNOWN_SCENARIO = "XYZ"  # the scenario written on planted "unknown_scenario" rows
SCENARIO_NAMES = (*schemas.SCENARIOS, UNKNOWN_SCENARIO)  # indexed by scenario code

TRUTH_DIR = "_truth"
MANIFEST_FILE = "_dataset.json"
PART_FILE = "part-00000.parquet"

LFV_MIN_DURATION_S, LFV_MAX_DURATION_S = 5 * 60.0, 60 * 60.0
SFV_MIN_DURATION_S, SFV_MAX_DURATION_S = 10.0, 60.0
MAX_WATCH_RATIO = 1.2  # rewatching part of a video can push watch time a little past its duration

# Each kind of deliberately bad row, and the table it is planted in. One planted row has exactly one defect.
BAD_ROW_KINDS = {
    "null_user_id": schemas.WATCH_EVENTS,
    "nan_watch_time": schemas.WATCH_EVENTS,
    "negative_watch_time": schemas.WATCH_EVENTS,
    "unknown_scenario": schemas.WATCH_EVENTS,
    "duplicate_watch_event": schemas.WATCH_EVENTS,  # an exact copy of another row, placed right after it
    "watch_ts_outside_partition": schemas.WATCH_EVENTS,  # event_ts on the day before or after its file's date
    "empty_query": schemas.SEARCH_EVENTS,
    "overlong_query": schemas.SEARCH_EVENTS,  # longer than schemas.MAX_QUERY_CHARS
    "duplicate_search_event": schemas.SEARCH_EVENTS,
    "search_ts_outside_partition": schemas.SEARCH_EVENTS,
    "wrong_embedding_length": schemas.VIDEOS,  # half too short, half too long
}

# Where a watch comes from, per scenario, in the order of schemas.SURFACES
# (home, watch_next, shorts_feed, search, subscriptions, other). Watches right after a search use "search".
SURFACE_PROBS = {
    LFV_CODE: (0.45, 0.30, 0.00, 0.03, 0.15, 0.07),
    SFV_CODE: (0.06, 0.00, 0.88, 0.01, 0.02, 0.03),
}
# A user's main device, in the order of schemas.DEVICES (IOS, ANDROID, WEB, TV, OTHER).
PRIMARY_DEVICE_PROBS = (0.35, 0.40, 0.15, 0.07, 0.03)
PRIMARY_DEVICE_SHARE = 0.85  # the rest of a user's events come from a random device

# Words that appear in queries of every topic, so queries are not pure topic words.
GENERIC_QUERY_WORDS = ("best", "new", "review", "tutorial", "live", "top", "easy", "full")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

# Independent random streams, one per concern: changing the number of users does not change the catalog.
_STREAMS = {"catalog": 1, "users": 2, "sessions": 3, "watches": 4, "searches": 5, "vocabulary": 6, "bad_rows": 7,
            "history": 8, "titles": 9}
MAX_HISTORY_WATCHES = 20_000  # prior watches per user on the start date: at most about one every four seconds

VIDEO_TRUTH_SCHEMA = pa.schema([
    pa.field("video_id", pa.string()),
    pa.field("scenario", pa.string()),
    pa.field("topic", pa.int32()),
    pa.field("subtopic", pa.int32()),  # 0..subtopics_per_topic-1, within its topic
    pa.field("duration_s", pa.float64()),
    pa.field("publish_date", pa.string()),
    pa.field("title", pa.string()),
])

USER_TRUTH_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("interests", pa.list_(pa.int32())),  # topic ids on the start date
    pa.field("interest_weights", pa.list_(pa.float64())),  # aligned with interests; sums to 1
    pa.field("final_interests", pa.list_(pa.int32())),  # topic ids on the last day, after drift
    pa.field("activity", pa.float64()),  # lognormal rate multiplier: > 1 heavy, < 1 light
    pa.field("active_day_prob", pa.float64()),
    pa.field("scenarios", pa.list_(pa.string())),  # ["LFV"], ["SFV"] or ["LFV", "SFV"]
    pa.field("primary_device", pa.string()),
])


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampleDataConfig:
    """Everything that decides the sample data. The same config always gives the same tables."""

    users: int = 2000
    days: int = 8
    start_date: str = "2026-01-01"
    seed: int = 0
    embedding_dim: int = schemas.DEFAULT_EMBEDDING_DIM
    topics: int = 12
    subtopics_per_topic: int = 4
    # Catalog: the videos published on the start date, then a few new ones every later day.
    lfv_videos: int = 3000
    sfv_videos: int = 8000
    new_lfv_videos_per_day: int = 30
    new_sfv_videos_per_day: int = 100
    bad_row_rate: float = 0.002
    # Embedding geometry: unit topic centroid + sub-topic offset of this length + per-video noise of this length.
    subtopic_offset_scale: float = 0.6
    embedding_noise_scale: float = 0.3
    # Users.
    both_scenarios_share: float = 0.5  # the rest split evenly between LFV-only and SFV-only
    max_interests: int = 3
    interest_swap_prob: float = 0.05  # per user and day: chance that one interest is replaced by a new topic
    explore_prob: float = 0.15  # chance that a watch's topic is random instead of one of the user's interests
    continue_topic_prob: float = 0.5  # chance that a watch stays on the previous watch's topic in its session
    activity_sigma: float = 1.0  # lognormal spread of per-user activity: the long tail of heavy users
    sessions_per_active_day: float = 0.6  # extra sessions (beyond the first) per unit of activity
    max_sessions_per_day: int = 5
    lfv_watches_per_session: float = 2.0  # extra watches beyond the first, per sqrt(activity)
    sfv_watches_per_session: float = 10.0  # extra watches beyond the first two, per sqrt(activity)
    lfv_search_session_prob: float = 0.25  # chance that a session opens with a search
    sfv_search_session_prob: float = 0.08
    words_per_topic: int = 6
    # Prior history: about this many extra watches per user on the start date (0: none). The paper's histories hold
    # up to 1,200 watches (schemas' history cap), so e.g. 1200 puts every user near the cap from day one.
    history_watches: int = 0

    def __post_init__(self):
        schemas.parse_date(self.start_date)
        if self.users < 1 or self.days < 1:
            raise ValueError(f"need at least one user and one day, got users={self.users} days={self.days}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.embedding_dim < 2:
            raise ValueError(f"embedding_dim must be >= 2, got {self.embedding_dim}")
        if self.topics <= self.max_interests:
            # Interest drift swaps in a topic the user does not hold yet, so there must be one left.
            raise ValueError(f"need more topics ({self.topics}) than max_interests ({self.max_interests})")
        subtopics = self.topics * self.subtopics_per_topic
        if min(self.lfv_videos, self.sfv_videos) < subtopics:
            raise ValueError(f"each start-date catalog needs at least one video per sub-topic ({subtopics}), got "
                             f"lfv_videos={self.lfv_videos} sfv_videos={self.sfv_videos}")
        if min(self.new_lfv_videos_per_day, self.new_sfv_videos_per_day) < 0:
            raise ValueError("new videos per day cannot be negative")
        if not 0.0 <= self.bad_row_rate < 0.05:
            raise ValueError(f"bad_row_rate must be in [0, 0.05), got {self.bad_row_rate}")
        for name in ("lfv_search_session_prob", "sfv_search_session_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.both_scenarios_share <= 1.0:
            raise ValueError(f"both_scenarios_share must be in [0, 1], got {self.both_scenarios_share}")
        if not 0 <= self.history_watches <= MAX_HISTORY_WATCHES:
            raise ValueError(f"history_watches must be in [0, {MAX_HISTORY_WATCHES}], got {self.history_watches}")

    @property
    def dates(self) -> List[str]:
        """The partition dates, ``start_date`` first."""
        start = schemas.parse_date(self.start_date)
        return [(start + dt.timedelta(days=d)).isoformat() for d in range(self.days)]


@dataclasses.dataclass(frozen=True, eq=False)
class SampleDataset:
    """The generated tables, keyed ``tables[table][date]``, and the truth they were drawn from."""

    config: SampleDataConfig
    tables: Dict[str, Dict[str, pa.Table]]  # schemas.INPUT_TABLES -> partition date -> rows of that table's schema
    video_truth: pa.Table  # VIDEO_TRUTH_SCHEMA, one row per video (bad-embedding videos included)
    user_truth: pa.Table  # USER_TRUTH_SCHEMA, one row per user
    planted_bad_rows: Dict[str, int]  # BAD_ROW_KINDS kind -> rows planted
    topic_vocabulary: List[List[str]]  # topic id -> the words its search queries are made of

    @property
    def catalog(self) -> pa.Table:
        """Video id -> title and genres (topic / sub-topic), in the dataset importer's ``schemas.CATALOG_SCHEMA``."""
        truth = self.video_truth
        topic, subtopic = truth.column("topic").to_numpy(), truth.column("subtopic").to_numpy()
        genres = [f"topic {t}|subtopic {t}.{s}" for t, s in zip(topic.tolist(), subtopic.tolist())]
        return pa.Table.from_arrays([truth.column("video_id"), truth.column("video_id"), truth.column("title"),
                                     pa.array(genres, pa.string())], schema=schemas.CATALOG_SCHEMA)

    def table(self, name: str) -> pa.Table:
        """All partitions of one table as a single table, in date order."""
        return pa.concat_tables([self.tables[name][date] for date in self.config.dates])

    def row_counts(self) -> Dict[str, Dict[str, int]]:
        return {name: {date: by_date[date].num_rows for date in self.config.dates}
                for name, by_date in self.tables.items()}

    def manifest(self) -> Dict:
        """What ``_dataset.json`` holds: enough for a test or a demo to know what to expect without re-generating."""
        return {
            "config": dataclasses.asdict(self.config),
            "embedding_dim": self.config.embedding_dim,
            "dates": self.config.dates,
            "row_counts": self.row_counts(),
            "planted_bad_rows": dict(self.planted_bad_rows),
            "bad_row_kind_tables": dict(BAD_ROW_KINDS),
            "topic_vocabulary": {str(t): words for t, words in enumerate(self.topic_vocabulary)},
            "truth_files": {"videos": f"{TRUTH_DIR}/videos.parquet", "users": f"{TRUTH_DIR}/users.parquet"},
            "catalog_file": f"{schemas.CATALOG_DIR}/items.parquet",
        }


def generate_sample_dataset(config: SampleDataConfig) -> SampleDataset:
    """Draw the whole dataset for ``config``: catalog, users, their sessions, watches and searches, bad rows."""
    catalog = _make_catalog(config)
    users = _make_users(config)
    vocabulary = _make_topic_vocabulary(config)
    sessions = _make_sessions(config, users)
    watches = _make_watches(config, users, catalog, sessions)
    if config.history_watches:
        watches = _with_prior_history(watches, _make_history_watches(config, users, catalog))
    searches = _make_searches(config, sessions, vocabulary)

    bad_rng = _rng(config, "bad_rows")
    planted: Dict[str, int] = {}
    watches = _plant_bad_watches(config, watches, bad_rng, planted)
    searches = _plant_bad_searches(config, searches, vocabulary, bad_rng, planted)
    embeddings = _plant_bad_embeddings(config, catalog["embedding"], bad_rng, planted)

    dates = config.dates
    video_order = np.argsort(catalog["publish_day"], kind="stable")  # by partition; ids stay sorted inside a day
    tables = {
        schemas.VIDEOS: _split_by_day(_videos_table(catalog, embeddings).take(pa.array(video_order)),
                                      catalog["publish_day"][video_order], dates),
        schemas.WATCH_EVENTS: _split_by_day(_watch_table(watches, users["user_id"], catalog), watches["day"], dates),
        schemas.SEARCH_EVENTS: _split_by_day(_search_table(searches, users["user_id"]), searches["day"], dates),
    }
    titles = _make_titles(config, catalog, vocabulary)
    return SampleDataset(config=config, tables=tables, video_truth=_video_truth_table(catalog, dates, titles),
                         user_truth=_user_truth_table(users), planted_bad_rows=planted,
                         topic_vocabulary=vocabulary)


def write_sample_dataset(dataset: SampleDataset, output_root: str) -> Dict:
    """Write the dataset under ``output_root`` (a local directory) and return the manifest written.

    Layout: ``<root>/<table>/date=D/part-00000.parquet`` for each input table and date, then the partition's
    landing marker ``_SUCCESS`` (what a raw export writes last and the daily DAG's first sensor waits for),
    ``<root>/_truth/videos.parquet`` and ``<root>/_truth/users.parquet``, the titles in
    ``<root>/_catalog/items.parquet``, and ``<root>/_dataset.json``. The table, truth and catalog directories are
    removed first, so a rerun replaces the previous output instead of mixing with it; nothing
    else under the root is touched.
    """
    os.makedirs(output_root, exist_ok=True)
    for owned_dir in (*schemas.INPUT_TABLES, TRUTH_DIR, schemas.CATALOG_DIR):
        shutil.rmtree(os.path.join(output_root, owned_dir), ignore_errors=True)

    for table_name, by_date in dataset.tables.items():
        for date, rows in by_date.items():
            partition = schemas.partition_dir(output_root, table_name, date)
            os.makedirs(partition, exist_ok=True)
            pq.write_table(rows, os.path.join(partition, PART_FILE), compression="zstd")
            write_landing_marker(partition)

    truth_dir = os.path.join(output_root, TRUTH_DIR)
    os.makedirs(truth_dir)
    pq.write_table(dataset.video_truth, os.path.join(truth_dir, "videos.parquet"), compression="zstd")
    pq.write_table(dataset.user_truth, os.path.join(truth_dir, "users.parquet"), compression="zstd")
    os.makedirs(os.path.join(output_root, schemas.CATALOG_DIR))
    pq.write_table(dataset.catalog, os.path.join(output_root, schemas.CATALOG_DIR, "items.parquet"), compression="zstd")

    manifest = dataset.manifest()
    outputs.write_json_atomically(os.path.join(output_root, MANIFEST_FILE), manifest)
    return manifest


def write_landing_marker(partition: str) -> str:
    """The empty ``_SUCCESS`` a landing export writes into a raw partition after its data files: "day D of this
    table has landed" (``pipelines.daily_plan.landing_paths``; readers never take it for data)."""
    path = os.path.join(partition, outputs.SUCCESS_MARKER)
    with open(path, "wb"):
        pass
    return path


# ---------------------------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------------------------
def _rng(config: SampleDataConfig, stream: str) -> np.random.Generator:
    return np.random.default_rng([config.seed, _STREAMS[stream]])


def _start_us(config: SampleDataConfig) -> int:
    """Microseconds since the epoch of the start date's midnight (UTC)."""
    days_since_epoch = (schemas.parse_date(config.start_date) - dt.date(1970, 1, 1)).days
    return days_since_epoch * DAY_US


def _normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _ranks_within_groups(group_sizes: np.ndarray) -> np.ndarray:
    """For consecutive groups of the given sizes, each element's position in its group: [2, 3] -> [0 1 0 1 2]."""
    starts = np.cumsum(group_sizes) - group_sizes
    return np.arange(group_sizes.sum()) - np.repeat(starts, group_sizes)


def _categorical(rng: np.random.Generator, cumulative_probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``cumulative_probs`` (rows are cumulative distributions): the index drawn."""
    draws = rng.random(len(cumulative_probs))
    index = (draws[:, None] >= cumulative_probs).sum(axis=1)
    return np.minimum(index, cumulative_probs.shape[1] - 1)  # guards the float round-off of a last entry < 1


# ---------------------------------------------------------------------------------------------------------------
# The catalog.
# ---------------------------------------------------------------------------------------------------------------
def _make_catalog(config: SampleDataConfig) -> Dict[str, np.ndarray]:
    """All videos as parallel arrays: LFV videos first, then SFV, each in publish order (video ids follow)."""
    rng = _rng(config, "catalog")
    topics, subtopics, dim = config.topics, config.subtopics_per_topic, config.embedding_dim
    topic_centroids = _normalise(rng.standard_normal((topics, dim)))
    subtopic_offsets = _normalise(rng.standard_normal((topics, subtopics, dim))) * config.subtopic_offset_scale

    parts = []
    for scenario, initial, per_day in ((LFV_CODE, config.lfv_videos, config.new_lfv_videos_per_day),
                                       (SFV_CODE, config.sfv_videos, config.new_sfv_videos_per_day)):
        count = initial + per_day * (config.days - 1)
        publish_day = np.concatenate([np.zeros(initial, np.int32),
                                      np.repeat(np.arange(1, config.days, dtype=np.int32), per_day)])
        # The start-date catalog holds every (topic, sub-topic) pair, so every topic exists in both scenarios
        # from day one; later videos pick theirs at random.
        initial_pairs = rng.permutation(np.arange(initial) % (topics * subtopics))
        later_pairs = rng.integers(0, topics * subtopics, count - initial)
        pairs = np.concatenate([initial_pairs, later_pairs])
        topic, subtopic = pairs // subtopics, pairs % subtopics
        if scenario == LFV_CODE:  # lognormal around 15 minutes, whole seconds
            duration = np.clip(np.round(np.exp(rng.normal(np.log(900.0), 0.6, count))),
                               LFV_MIN_DURATION_S, LFV_MAX_DURATION_S)
        else:  # skewed towards the short end of 10-60 s
            duration = np.round(SFV_MIN_DURATION_S + (SFV_MAX_DURATION_S - SFV_MIN_DURATION_S)
                                * rng.beta(1.5, 2.5, count))
        # The start-date catalog is a backfill stamped with the start date's midnight; later videos are published
        # at a random moment of their day.
        publish_offset_us = np.where(publish_day == 0, 0, rng.integers(0, DAY_US, count))
        noise = rng.standard_normal((count, dim)) / np.sqrt(dim) * config.embedding_noise_scale
        embedding = _normalise(topic_centroids[topic] + subtopic_offsets[topic, subtopic] + noise)
        parts.append({
            "video_id": np.array([f"{schemas.SCENARIOS[scenario].lower()}_{i:06d}" for i in range(count)]),
            "scenario": np.full(count, scenario, np.int8),
            "topic": topic.astype(np.int32),
            "subtopic": subtopic.astype(np.int32),
            "duration_s": duration.astype(np.float64),
            "popularity": rng.lognormal(0.0, 1.2, count),  # a few videos of each topic get most of its watches
            "publish_day": publish_day,
            "publish_ts_us": _start_us(config) + publish_day.astype(np.int64) * DAY_US + publish_offset_us,
            "embedding": embedding.astype(np.float32),
        })
    catalog = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    # A video is watchable from the day after its publish day; the start-date catalog from the start date itself.
    catalog["watchable_from_day"] = np.where(catalog["publish_day"] == 0, 0, catalog["publish_day"] + 1)
    return catalog


class _VideoPicker:
    """Draws videos of a given (scenario, topic) by popularity, among those watchable on a given day.

    Videos are laid out grouped by (scenario, topic) and, inside a group, in publish order, so the watchable
    videos of a group on a day are a prefix of it. One cumulative popularity array over the whole layout then
    serves every draw with a single vectorised searchsorted.
    """

    def __init__(self, catalog: Dict[str, np.ndarray], topics: int, days: int):
        self.order = np.lexsort((np.arange(len(catalog["topic"])), catalog["topic"], catalog["scenario"]))
        self.cumulative = np.concatenate([[0.0], np.cumsum(catalog["popularity"][self.order])])
        group = catalog["scenario"][self.order].astype(np.int64) * topics + catalog["topic"][self.order]
        self.group_start = np.searchsorted(group, np.arange(2 * topics))
        watchable_from = catalog["watchable_from_day"][self.order]
        # watchable[g, d]: how many videos at the head of group g can be watched on day d.
        self.watchable = np.zeros((2 * topics, days), np.int64)
        for g in range(2 * topics):
            members = watchable_from[group == g]
            self.watchable[g] = np.searchsorted(members, np.arange(days), side="right")
        self.topics = topics

    def pick(self, rng: np.random.Generator, scenario: np.ndarray, topic: np.ndarray, day: np.ndarray) -> np.ndarray:
        group = scenario.astype(np.int64) * self.topics + topic
        first = self.group_start[group]
        count = self.watchable[group, day]
        low, high = self.cumulative[first], self.cumulative[first + count]
        position = np.searchsorted(self.cumulative, low + rng.random(len(group)) * (high - low), side="right") - 1
        return self.order[np.clip(position, first, first + count - 1)]


# ---------------------------------------------------------------------------------------------------------------
# Users and their interests.
# ---------------------------------------------------------------------------------------------------------------
def _make_users(config: SampleDataConfig) -> Dict[str, np.ndarray]:
    rng = _rng(config, "users")
    n, most = config.users, config.max_interests

    interest_count = rng.integers(1, most + 1, n)
    # Distinct topics per user: the first columns of a random permutation of all topics.
    first_interests = np.argsort(rng.random((n, config.topics)), axis=1)[:, :most].astype(np.int32)
    holds = np.arange(most)[None, :] < interest_count[:, None]
    first_interests[~holds] = -1  # unused slots
    weights = np.where(holds, rng.dirichlet(np.full(most, 2.0), n), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)

    # Slow drift: each day after the first, a user may swap one interest for a topic they do not hold yet.
    interests_by_day = np.empty((n, config.days, most), np.int32)
    current = first_interests.copy()
    for day in range(config.days):
        if day > 0:
            swaps = np.nonzero(rng.random(n) < config.interest_swap_prob)[0]
            slot = (rng.random(len(swaps)) * interest_count[swaps]).astype(np.int64)
            new_topic = rng.integers(0, config.topics, len(swaps))
            clash = (current[swaps] == new_topic[:, None]).any(axis=1)
            while clash.any():  # redraw the few that picked a topic already held
                new_topic[clash] = rng.integers(0, config.topics, clash.sum())
                clash = (current[swaps] == new_topic[:, None]).any(axis=1)
            current[swaps, slot] = new_topic
        interests_by_day[:, day] = current

    # Scenarios: about half the users in both, the rest split between LFV only and SFV only.
    both = rng.random(n) < config.both_scenarios_share
    lfv_only = ~both & (rng.random(n) < 0.5)
    in_lfv, in_sfv = both | lfv_only, both | ~lfv_only
    lfv_share = np.where(both, rng.uniform(0.25, 0.75, n), np.where(in_lfv, 1.0, 0.0))  # of their sessions

    activity = rng.lognormal(0.0, config.activity_sigma, n)
    return {
        "user_id": np.array([f"user_{i:07d}" for i in range(n)]),  # zero-padded: id order = index order
        "interest_count": interest_count,
        "interest_weights": weights,
        "interests_by_day": interests_by_day,
        "in_lfv": in_lfv,
        "in_sfv": in_sfv,
        "lfv_share": lfv_share,
        "activity": activity,
        # Heavy users show up on more days too, between 20% and 90% of the days.
        "active_day_prob": 0.2 + 0.7 * activity / (activity + 1.0),
        "primary_device": _categorical(rng, np.tile(np.cumsum(PRIMARY_DEVICE_PROBS), (n, 1))),
    }


def _draw_topics(rng: np.random.Generator, config: SampleDataConfig, users: Dict[str, np.ndarray],
                 user: np.ndarray, day: np.ndarray) -> np.ndarray:
    """A topic for each (user, day): one of the user's interests that day by weight, or now and then any topic."""
    slot = _categorical(rng, np.cumsum(users["interest_weights"][user], axis=1))
    slot = np.minimum(slot, users["interest_count"][user] - 1)
    topic = users["interests_by_day"][user, day, slot].astype(np.int64)
    explore = rng.random(len(user)) < config.explore_prob
    topic[explore] = rng.integers(0, config.topics, explore.sum())
    return topic


# ---------------------------------------------------------------------------------------------------------------
# Sessions, watches and searches.
# ---------------------------------------------------------------------------------------------------------------
def _make_sessions(config: SampleDataConfig, users: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Which users are active on which days, and their sessions: when, which scenario, whether they open with a
    search, and how many watches they hold (before the day's end cuts them short)."""
    rng = _rng(config, "sessions")
    n_users, activity = config.users, users["activity"]

    active = rng.random((n_users, config.days)) < users["active_day_prob"][:, None]
    never = np.nonzero(~active.any(axis=1))[0]  # every user shows up at least once, so each has a history
    active[never, rng.integers(0, config.days, len(never))] = True
    user_of_day, day_of_day = np.nonzero(active)  # ordered by user, then day

    extra_sessions = rng.poisson(config.sessions_per_active_day * activity[user_of_day])
    sessions_that_day = 1 + np.minimum(extra_sessions, config.max_sessions_per_day - 1)
    user = np.repeat(user_of_day, sessions_that_day)
    day = np.repeat(day_of_day, sessions_that_day)
    slots = np.repeat(sessions_that_day, sessions_that_day)
    slot = _ranks_within_groups(sessions_that_day)

    # Each session owns an equal slot of the day and starts in the slot's first 40%: sessions are hours apart,
    # and at least a second after midnight so no event shares the start-date catalog's publish instant.
    slot_length_us = DAY_US // slots
    slot_start_us = slot * slot_length_us
    start_us = slot_start_us + SECOND_US + (rng.random(len(user)) * 0.4 * slot_length_us).astype(np.int64)

    scenario = np.where(rng.random(len(user)) < users["lfv_share"][user], LFV_CODE, SFV_CODE).astype(np.int8)
    # A user of both scenarios should show it: where chance put all of their sessions in one scenario, their last
    # session moves to the other (a user with a single session stays as drawn).
    lfv_sessions = np.bincount(user, weights=scenario == LFV_CODE, minlength=n_users)
    all_sessions = np.bincount(user, minlength=n_users)
    one_sided = (users["in_lfv"] & users["in_sfv"] & (all_sessions >= 2)
                 & ((lfv_sessions == 0) | (lfv_sessions == all_sessions)))
    last_session = np.searchsorted(user, np.nonzero(one_sided)[0], side="right") - 1  # sessions are by user
    scenario[last_session] = 1 - scenario[last_session]
    search_prob = np.where(scenario == LFV_CODE, config.lfv_search_session_prob, config.sfv_search_session_prob)
    opens_with_search = rng.random(len(user)) < search_prob

    busy = np.sqrt(activity[user])  # heavy users also watch more per session
    watches = np.where(scenario == LFV_CODE,
                       1 + np.minimum(rng.poisson(config.lfv_watches_per_session * busy), 15),
                       2 + np.minimum(rng.poisson(config.sfv_watches_per_session * busy), 80))
    search_topic = _draw_topics(rng, config, users, user, day)
    watches_from_search = np.minimum(rng.integers(1, 4, len(user)), watches)
    return {
        "user": user, "day": day, "start_us": start_us, "end_us": slot_start_us + slot_length_us,
        "scenario": scenario, "watches": watches, "opens_with_search": opens_with_search,
        "search_topic": search_topic, "watches_from_search": np.where(opens_with_search, watches_from_search, 0),
    }


def _make_watches(config: SampleDataConfig, users: Dict[str, np.ndarray], catalog: Dict[str, np.ndarray],
                  sessions: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Every watch event as parallel arrays, sorted by (day, user, time)."""
    rng = _rng(config, "watches")
    session = np.repeat(np.arange(len(sessions["user"])), sessions["watches"])
    position = _ranks_within_groups(sessions["watches"])
    user, day, scenario = sessions["user"][session], sessions["day"][session], sessions["scenario"][session]
    n = len(session)

    # Topics: a watch either starts a fresh topic or stays on the last fresh one of its session; the first watches
    # after a search are of the searched topic.
    topic = _draw_topics(rng, config, users, user, day)
    fresh = (position == 0) | (rng.random(n) >= config.continue_topic_prob)
    from_search = position < sessions["watches_from_search"][session]
    topic[from_search] = sessions["search_topic"][session[from_search]]
    fresh |= from_search
    last_fresh = np.maximum.accumulate(np.where(fresh, np.arange(n), 0))  # position 0 is fresh: stays in session
    topic = topic[last_fresh]

    video = _VideoPicker(catalog, config.topics, config.days).pick(rng, scenario, topic, day)
    duration = catalog["duration_s"][video]
    matches_interest = (users["interests_by_day"][user, day] == topic[:, None]).any(axis=1)
    is_lfv = scenario == LFV_CODE
    ratio = _watch_ratio(rng, is_lfv, matches_interest)
    watch_time = np.round(ratio * duration, 3)

    # Time: the first watch at the session start (a few seconds after the search, if any); each later one after
    # the previous watch plus a few seconds of browsing. Integer microseconds keep the sums exact.
    browse_s = rng.exponential(np.where(is_lfv, 20.0, 4.0)) + 1.0
    after_search_s = np.where(sessions["opens_with_search"][session], rng.uniform(3.0, 40.0, n), 0.0)
    gap_us = np.empty(n, np.int64)
    first = position == 0
    gap_us[first] = sessions["start_us"][session[first]] + (after_search_s[first] * SECOND_US).astype(np.int64)
    previous = np.nonzero(~first)[0] - 1
    gap_us[~first] = ((watch_time[previous] + browse_s[~first]) * SECOND_US).astype(np.int64)
    running = np.cumsum(gap_us)
    before_session = running[first] - gap_us[first]
    time_in_day_us = running - np.repeat(before_session, sessions["watches"])

    surface, device, liked, disliked = _surface_device_likes(rng, users, user, scenario, ratio, matches_interest,
                                                             from_search)

    # A session ends at its slot's end: watches that would run past it are never made.
    keep = time_in_day_us < sessions["end_us"][session]
    watches = {
        "day": day, "user": user.astype(np.int64), "video": video, "scenario": scenario,
        "ts_us": _start_us(config) + day.astype(np.int64) * DAY_US + time_in_day_us,
        "watch_time_s": watch_time, "duration_s": duration, "surface": surface, "device": device,
        "liked": liked, "disliked": disliked,
    }
    order = np.lexsort((watches["ts_us"][keep], watches["user"][keep], watches["day"][keep]))
    return {name: values[keep][order] for name, values in watches.items()}


def _watch_ratio(rng: np.random.Generator, is_lfv: np.ndarray, matches_interest: np.ndarray) -> np.ndarray:
    """Watch-time ratio: most of the video when it matches the user's interests, a small part otherwise."""
    beta_a = np.where(matches_interest, np.where(is_lfv, 4.0, 5.0), np.where(is_lfv, 1.2, 1.5))
    beta_b = np.where(matches_interest, 2.0, np.where(is_lfv, 4.0, 3.0))
    ratio_scale = np.where(is_lfv & ~matches_interest, 1.0, np.where(is_lfv, 1.1, MAX_WATCH_RATIO))
    return ratio_scale * rng.beta(beta_a, beta_b)


def _surface_device_likes(rng: np.random.Generator, users: Dict[str, np.ndarray], user: np.ndarray,
                          scenario: np.ndarray, ratio: np.ndarray, matches_interest: np.ndarray,
                          from_search: np.ndarray):
    """Where each watch came from (``search`` where it follows a search), its device, and likes and dislikes."""
    n = len(user)
    surface = _categorical(rng, np.cumsum(np.array([SURFACE_PROBS[LFV_CODE], SURFACE_PROBS[SFV_CODE]]), axis=1)
                           [scenario.astype(np.int64)])
    surface[from_search] = schemas.SURFACES.index("search")
    device = np.where(rng.random(n) < PRIMARY_DEVICE_SHARE, users["primary_device"][user],
                      rng.integers(0, len(schemas.DEVICES), n))

    # Engagement: likes follow watch ratio and interest; dislikes the opposite, and are rare.
    like_prob = 0.08 * ratio / MAX_WATCH_RATIO * np.where(matches_interest, 1.0, 0.3)
    dislike_prob = 0.02 * (1.0 - ratio / MAX_WATCH_RATIO) * np.where(matches_interest, 0.2, 1.0)
    liked = rng.random(n) < like_prob
    disliked = ~liked & (rng.random(n) < dislike_prob)
    return surface, device, liked, disliked


def _make_history_watches(config: SampleDataConfig, users: Dict[str, np.ndarray],
                          catalog: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Each user's prior history: 90-100% of ``history_watches`` watches on the start date, evenly spread over the
    day (each in its own slot, so a user's watches never share a timestamp), of the user's interests and scenarios
    and the start-date catalog. Same columns as ``_make_watches``; drawn from their own stream, so the rest of the
    dataset is what it is without them."""
    rng = _rng(config, "history")
    target = config.history_watches
    per_user = rng.integers(int(np.ceil(0.9 * target)), target + 1, config.users)
    user = np.repeat(np.arange(config.users), per_user)
    day = np.zeros(len(user), np.int64)
    slot = _ranks_within_groups(per_user)
    # Slots fill the start date after its first second (the start-date catalog's publish instant is midnight).
    slot_us = (DAY_US - 2 * SECOND_US) // per_user[user]
    time_in_day_us = SECOND_US + slot * slot_us + (rng.random(len(user)) * 0.5 * slot_us).astype(np.int64)

    scenario = np.where(rng.random(len(user)) < users["lfv_share"][user], LFV_CODE, SFV_CODE).astype(np.int8)
    topic = _draw_topics(rng, config, users, user, day)
    video = _VideoPicker(catalog, config.topics, config.days).pick(rng, scenario, topic, day)
    duration = catalog["duration_s"][video]
    matches_interest = (users["interests_by_day"][user, day] == topic[:, None]).any(axis=1)
    ratio = _watch_ratio(rng, scenario == LFV_CODE, matches_interest)
    surface, device, liked, disliked = _surface_device_likes(rng, users, user, scenario, ratio, matches_interest,
                                                             np.zeros(len(user), bool))
    return {
        "day": day.astype(np.int32), "user": user.astype(np.int64), "video": video, "scenario": scenario,
        "ts_us": _start_us(config) + time_in_day_us, "watch_time_s": np.round(ratio * duration, 3),
        "duration_s": duration, "surface": surface, "device": device, "liked": liked, "disliked": disliked,
    }


def _with_prior_history(watches: Dict[str, np.ndarray], history: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Both sets of watches in one, sorted by (day, user, time) like ``_make_watches``' output."""
    merged = {name: np.concatenate([values, history[name].astype(values.dtype)]) for name, values in watches.items()}
    order = np.lexsort((merged["ts_us"], merged["user"], merged["day"]))
    return {name: values[order] for name, values in merged.items()}


def _make_topic_vocabulary(config: SampleDataConfig) -> List[List[str]]:
    """Per topic, a few made-up but pronounceable words, distinct across topics (e.g. "kolami", "vetu")."""
    rng = _rng(config, "vocabulary")
    seen = set(GENERIC_QUERY_WORDS)
    vocabulary = []
    for _ in range(config.topics):
        words = []
        while len(words) < config.words_per_topic:
            syllables = rng.integers(2, 4)
            word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                           for _ in range(syllables))
            if word not in seen:
                seen.add(word)
                words.append(word)
        vocabulary.append(words)
    return vocabulary


def _make_titles(config: SampleDataConfig, catalog: Dict[str, np.ndarray], vocabulary: List[List[str]]) -> List[str]:
    """Per video: its sub-topic's word of the topic vocabulary, then two words drawn from the topic's words (or, one
    time in four, a generic word), so text separates topics and sub-topics about as well as the embedding does."""
    rng = _rng(config, "titles")
    words = np.array(vocabulary, dtype=object)  # [topics, words_per_topic]
    generic = np.array(GENERIC_QUERY_WORDS, dtype=object)
    topic, subtopic = catalog["topic"].astype(np.int64), catalog["subtopic"].astype(np.int64)
    n = len(topic)
    first = words[topic, subtopic % config.words_per_topic]
    drawn = words[topic[:, None], rng.integers(0, config.words_per_topic, (n, 2))]
    drawn = np.where(rng.random((n, 2)) < 0.25, generic[rng.integers(0, len(generic), (n, 2))], drawn)
    return [" ".join(parts) for parts in zip(first, drawn[:, 0], drawn[:, 1])]


def _make_searches(config: SampleDataConfig, sessions: Dict[str, np.ndarray],
                   vocabulary: List[List[str]]) -> Dict[str, np.ndarray]:
    """One search at the start of each session that opens with one, its query made of its topic's words."""
    rng = _rng(config, "searches")
    opened = np.nonzero(sessions["opens_with_search"])[0]
    n = len(opened)
    topic = sessions["search_topic"][opened]
    word_count = rng.integers(1, 4, n)
    word_index = rng.integers(0, config.words_per_topic, (n, 3))
    generic = np.where(rng.random(n) < 0.3, rng.integers(0, len(GENERIC_QUERY_WORDS), n), -1)
    queries = []
    for i in range(n):
        words = [vocabulary[topic[i]][w] for w in word_index[i, :word_count[i]]]
        if generic[i] >= 0:
            words.append(GENERIC_QUERY_WORDS[generic[i]])
        queries.append(" ".join(words))

    day = sessions["day"][opened]
    searches = {
        "day": day, "user": sessions["user"][opened].astype(np.int64),
        "ts_us": _start_us(config) + day.astype(np.int64) * DAY_US + sessions["start_us"][opened],
        "query": np.array(queries, dtype=object),
    }
    order = np.lexsort((searches["ts_us"], searches["user"], searches["day"]))
    return {name: values[order] for name, values in searches.items()}


# ---------------------------------------------------------------------------------------------------------------
# Deliberately bad rows.
# ---------------------------------------------------------------------------------------------------------------
def _bad_row_counts(config: SampleDataConfig, table: str, rows: int) -> Dict[str, int]:
    """About bad_row_rate of a table's rows, split evenly over its kinds. When the rate is positive and the table
    is not tiny, at least one of each kind, so even a small dataset exercises every dead-letter reason."""
    kinds = [kind for kind, kind_table in BAD_ROW_KINDS.items() if kind_table == table]
    if config.bad_row_rate <= 0:
        return {kind: 0 for kind in kinds}
    total = int(round(config.bad_row_rate * rows))
    at_least = 1 if rows >= 20 * len(kinds) else 0
    return {kind: max(at_least, total // len(kinds) + (i < total % len(kinds))) for i, kind in enumerate(kinds)}


def _pick_rows(rng: np.random.Generator, rows: int, counts: Dict[str, int]) -> Dict[str, np.ndarray]:
    """Distinct row indices for each kind, so no row carries two defects (and each is counted once)."""
    needed = sum(counts.values())
    if needed > rows:
        raise ValueError(f"cannot plant {needed} bad rows in {rows} rows; lower bad_row_rate or add users")
    chosen = rng.choice(rows, size=needed, replace=False)
    bounds = np.cumsum([0, *counts.values()])
    return {kind: np.sort(chosen[bounds[i]:bounds[i + 1]]) for i, kind in enumerate(counts)}


def _outside_partition(rng: np.random.Generator, config: SampleDataConfig, day: np.ndarray) -> np.ndarray:
    """Timestamps that lie up to six hours before or after the given partition days (never on them)."""
    day_start = _start_us(config) + day.astype(np.int64) * DAY_US
    offset = rng.integers(SECOND_US, 6 * 3600 * SECOND_US, len(day))
    return np.where(rng.random(len(day)) < 0.5, day_start - offset, day_start + DAY_US + offset)


def _with_duplicates(columns: Dict[str, np.ndarray], sources: np.ndarray) -> Dict[str, np.ndarray]:
    """The columns with an exact copy of each source row placed right after it."""
    take = np.sort(np.concatenate([np.arange(len(columns["day"])), sources]), kind="stable")
    return {name: values[take] for name, values in columns.items()}


def _plant_bad_watches(config: SampleDataConfig, watches: Dict[str, np.ndarray], rng: np.random.Generator,
                       planted: Dict[str, int]) -> Dict[str, np.ndarray]:
    counts = _bad_row_counts(config, schemas.WATCH_EVENTS, len(watches["day"]))
    rows = _pick_rows(rng, len(watches["day"]), counts)
    watches = {name: values.copy() for name, values in watches.items()}
    watches["user"][rows["null_user_id"]] = -1  # written as a null user_id
    watches["watch_time_s"][rows["nan_watch_time"]] = np.nan
    negative = rows["negative_watch_time"]
    watches["watch_time_s"][negative] = -np.maximum(watches["watch_time_s"][negative], 1.0)
    watches["scenario"][rows["unknown_scenario"]] = UNKNOWN_SCENARIO_CODE
    outside = rows["watch_ts_outside_partition"]
    watches["ts_us"][outside] = _outside_partition(rng, config, watches["day"][outside])
    planted.update(counts)
    return _with_duplicates(watches, rows["duplicate_watch_event"])


def _plant_bad_searches(config: SampleDataConfig, searches: Dict[str, np.ndarray], vocabulary: List[List[str]],
                        rng: np.random.Generator, planted: Dict[str, int]) -> Dict[str, np.ndarray]:
    counts = _bad_row_counts(config, schemas.SEARCH_EVENTS, len(searches["day"]))
    rows = _pick_rows(rng, len(searches["day"]), counts)
    searches = {name: values.copy() for name, values in searches.items()}
    searches["query"][rows["empty_query"]] = ""
    for row in rows["overlong_query"]:  # a topic's words repeated until the query is too long
        words = " ".join(vocabulary[int(row) % config.topics])
        searches["query"][row] = " ".join([words] * (schemas.MAX_QUERY_CHARS // (len(words) + 1) + 2))
    outside = rows["search_ts_outside_partition"]
    searches["ts_us"][outside] = _outside_partition(rng, config, searches["day"][outside])
    planted.update(counts)
    return _with_duplicates(searches, rows["duplicate_search_event"])


def _plant_bad_embeddings(config: SampleDataConfig, embeddings: np.ndarray, rng: np.random.Generator,
                          planted: Dict[str, int]) -> pa.ListArray:
    """The embeddings as written: each video's true embedding, except the planted bad ones, which are cut to half
    the width or padded with eight extra numbers."""
    video_count, dim = embeddings.shape
    counts = _bad_row_counts(config, schemas.VIDEOS, video_count)
    rows = _pick_rows(rng, video_count, counts)["wrong_embedding_length"]
    lengths = np.full(video_count, dim, np.int64)
    lengths[rows[0::2]] = dim // 2
    lengths[rows[1::2]] = dim + 8
    padded = np.concatenate([embeddings, rng.standard_normal((video_count, 8)).astype(np.float32)], axis=1)
    written = np.arange(dim + 8)[None, :] < lengths[:, None]  # row-major: each row's first `length` numbers
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    planted.update(counts)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(padded[written], pa.float32()))


# ---------------------------------------------------------------------------------------------------------------
# Arrays to pyarrow tables.
# ---------------------------------------------------------------------------------------------------------------
def _strings(names: np.ndarray, index: np.ndarray) -> pa.Array:
    """``names[index]`` as a pyarrow string array; a negative index gives a null."""
    return pa.array(names, pa.string()).take(pa.array(index, pa.int64(), mask=index < 0))


def _timestamps(ts_us: np.ndarray) -> pa.Array:
    return pa.array(ts_us.astype(np.int64), schemas.TIMESTAMP)


def _split_by_day(table: pa.Table, day: np.ndarray, dates: List[str]) -> Dict[str, pa.Table]:
    """Rows sorted by day, one (zero-copy) slice per partition date; a day without rows gets an empty table."""
    bounds = np.searchsorted(day, np.arange(len(dates) + 1))
    return {date: table.slice(bounds[d], bounds[d + 1] - bounds[d]) for d, date in enumerate(dates)}


def _videos_table(catalog, embeddings: pa.ListArray) -> pa.Table:
    return pa.Table.from_arrays([
        pa.array(catalog["video_id"], pa.string()),
        _strings(np.array(SCENARIO_NAMES), catalog["scenario"].astype(np.int64)),
        embeddings,
        _timestamps(catalog["publish_ts_us"]),
    ], schema=schemas.VIDEOS_SCHEMA)


def _watch_table(watches, user_ids, catalog) -> pa.Table:
    return pa.Table.from_arrays([
        _strings(user_ids, watches["user"]),
        _strings(catalog["video_id"], watches["video"]),
        _timestamps(watches["ts_us"]),
        _strings(np.array(SCENARIO_NAMES), watches["scenario"].astype(np.int64)),
        pa.array(watches["watch_time_s"], pa.float64()),
        pa.array(watches["duration_s"], pa.float64()),
        _strings(np.array(schemas.SURFACES), watches["surface"].astype(np.int64)),
        _strings(np.array(schemas.DEVICES), watches["device"].astype(np.int64)),
        pa.array(watches["liked"], pa.bool_()),
        pa.array(watches["disliked"], pa.bool_()),
    ], schema=schemas.WATCH_EVENTS_SCHEMA)


def _search_table(searches, user_ids) -> pa.Table:
    return pa.Table.from_arrays([
        _strings(user_ids, searches["user"]),
        _timestamps(searches["ts_us"]),
        pa.array(searches["query"], pa.string()),
    ], schema=schemas.SEARCH_EVENTS_SCHEMA)


def _video_truth_table(catalog, dates, titles: List[str]) -> pa.Table:
    return pa.Table.from_arrays([
        pa.array(catalog["video_id"], pa.string()),
        _strings(np.array(SCENARIO_NAMES), catalog["scenario"].astype(np.int64)),
        pa.array(catalog["topic"], pa.int32()),
        pa.array(catalog["subtopic"], pa.int32()),
        pa.array(catalog["duration_s"], pa.float64()),
        _strings(np.array(dates), catalog["publish_day"].astype(np.int64)),
        pa.array(titles, pa.string()),
    ], schema=VIDEO_TRUTH_SCHEMA)


def _user_truth_table(users) -> pa.Table:
    count = users["interest_count"]
    offsets = pa.array(np.concatenate([[0], np.cumsum(count)]).astype(np.int32))
    holds = np.arange(users["interest_weights"].shape[1])[None, :] < count[:, None]

    def interest_lists(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values[holds], arrow_type))

    scenario_lists = [[name for name, used in ((schemas.SCENARIOS[0], lfv), (schemas.SCENARIOS[1], sfv)) if used]
                      for lfv, sfv in zip(users["in_lfv"], users["in_sfv"])]
    return pa.Table.from_arrays([
        pa.array(users["user_id"], pa.string()),
        interest_lists(users["interests_by_day"][:, 0], pa.int32()),
        interest_lists(users["interest_weights"], pa.float64()),
        interest_lists(users["interests_by_day"][:, -1], pa.int32()),
        pa.array(users["activity"], pa.float64()),
        pa.array(users["active_day_prob"], pa.float64()),
        pa.array(scenario_lists, pa.list_(pa.string())),
        _strings(np.array(schemas.DEVICES), users["primary_device"].astype(np.int64)),
    ], schema=USER_TRUTH_SCHEMA)
