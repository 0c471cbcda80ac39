"""Training examples: per-user sequence building in Beam, the TFRecord example format, and run statistics.

One ``tf.train.Example`` per (user, cutoff), every feature fixed-length so accelerators see static shapes:

    user_id        bytes  [1]
    cutoff_ts_us   int64  [1]                      the cutoff t (UTC epoch microseconds)
    tokens         int64  [max_tokens]             history, oldest first, left-aligned, <pad>-padded
    length         int64  [1]                      non-pad tokens in ``tokens``
    num_watches    int64  [1]                      watches in the history
    num_searches   int64  [1]                      searches in the history
    targets        int64  [max_targets * (1 + L)]  row-major [max_targets, 1 + L]: condition token + L SID tokens
    num_targets    int64  [1]                      real rows in ``targets``; the rest are <pad>
    soft_features  float  [max_tokens * F]         soft mode only: row-major [max_tokens, F], zero except at <soft>

``feature_spec(...)`` describes exactly this (written as feature_spec.json next to the shards) and
``tokenminds_model.data`` reads it back.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from tokenminds_model.vocabulary import VocabularyLayout
from transforms import columnar, features, outputs, schemas, sequences
from transforms import targets as target_lib

EXAMPLE_BUILD_ERROR = "example_build_error"
# The snapshot columns examples are built from (training, eval and benchmark examples alike).
SNAPSHOT_COLUMNS = [f for f in schemas.HISTORIES_SCHEMA if f.name in ("user_id", "watches", "searches")]
SNAPSHOT_COLUMN_NAMES = [f.name for f in SNAPSHOT_COLUMNS]
NO_EXAMPLE = "no_cutoff_with_history_and_targets"
USERS = "users"


def feature_spec(config: sequences.SequenceConfig, layout: VocabularyLayout) -> Dict[str, Dict[str, Any]]:
    """Name -> {"dtype", "shape"} of every feature of the example, as written to feature_spec.json."""
    target_len = 1 + config.sid_length(layout)
    spec = {
        "user_id": {"dtype": "string", "shape": [1]},
        "cutoff_ts_us": {"dtype": "int64", "shape": [1]},
        "tokens": {"dtype": "int64", "shape": [config.max_tokens]},
        "length": {"dtype": "int64", "shape": [1]},
        "num_watches": {"dtype": "int64", "shape": [1]},
        "num_searches": {"dtype": "int64", "shape": [1]},
        "targets": {"dtype": "int64", "shape": [config.max_targets, target_len]},
        "num_targets": {"dtype": "int64", "shape": [1]},
    }
    if config.feature_mode == "soft":
        spec["soft_features"] = {"dtype": "float32", "shape": [config.max_tokens, features.SOFT_FEATURE_DIM]}
    return spec


def serialize_example(example: Dict[str, Any], spec: Dict[str, Dict[str, Any]]) -> bytes:
    """One example dict (``sequences.make_user_examples``) -> serialized tf.train.Example, checked against spec."""
    import tensorflow as tf

    proto = tf.train.Example()
    feature = proto.features.feature
    for name, entry in spec.items():
        value = example[name]
        if entry["dtype"] == "string":
            feature[name].bytes_list.value.append(str(value).encode("utf-8"))
            continue
        array = np.asarray(value)
        if array.size != int(np.prod(entry["shape"])):
            raise ValueError(f"feature {name} has {array.size} values, spec says shape {entry['shape']}")
        flat = array.reshape(-1)
        # Python lists: the protobuf runtime copies them several times faster than NumPy arrays (item by item).
        if entry["dtype"] == "int64":
            feature[name].int64_list.value.extend(flat.astype(np.int64).tolist())
        else:
            feature[name].float_list.value.extend(flat.astype(np.float32).tolist())
    # deterministic=True: the feature map is otherwise serialized in a per-process hash order, so the same example
    # would have different bytes on different workers.
    return proto.SerializeToString(deterministic=True)


def merge_user_events(snapshots: Iterable[Dict[str, Any]]):
    """One user's watches and searches from several snapshots (D-1, D, D+1), each event once."""
    watches, searches = {}, {}
    for snapshot in snapshots:
        for watch in snapshot["watches"]:
            watches[(watch["event_ts_us"], watch["scenario"], watch["video_id"])] = watch
        for search in snapshot["searches"]:
            searches[(search["event_ts_us"], search["query"])] = search
    return [watches[k] for k in sorted(watches)], [searches[k] for k in sorted(searches)]


# ---------------------------------------------------------------------------------------------------------------
# Run statistics.
# ---------------------------------------------------------------------------------------------------------------
LENGTH_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 768, 1024, 1 << 30)
REWARD_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, float("inf"))


def example_stats_record(example: Dict[str, Any], target_rewards: List[float]) -> Dict[str, Any]:
    return {"length": int(example["length"]), "num_targets": int(example["num_targets"]),
            "num_watches": int(example["num_watches"]), "num_searches": int(example["num_searches"]),
            "target_scenarios": list(example["target_scenarios"]), "target_rewards": list(target_rewards)}


# Rewards are summed exactly, as integers in units of 2**-1100 (every finite float is a whole number of those), so
# the mean does not depend on the order in which examples reach the combiner (batching, bundles, workers).
_EXACT_SUM_SCALE = 2 ** 1100


class ExampleStats(beam.CombineFn):
    """Examples, targets per example, sequence-length histogram, scenario mix of targets, reward histogram."""

    def create_accumulator(self):
        return {"examples": 0, "targets": 0, "targets_per_example": {}, "length_histogram": [0] * (
            len(LENGTH_BUCKETS) - 1), "target_scenarios": {}, "reward_histogram": [0] * (len(REWARD_BUCKETS) - 1),
                "reward_sum": 0, "history_watches": 0, "history_searches": 0}

    def add_input(self, acc, record):
        acc["examples"] += 1
        acc["targets"] += record["num_targets"]
        key = str(record["num_targets"])
        acc["targets_per_example"][key] = acc["targets_per_example"].get(key, 0) + 1
        # bisect_right on the sorted bucket edges: np.searchsorted(side="right"), without a NumPy call per record.
        acc["length_histogram"][bisect.bisect_right(LENGTH_BUCKETS, record["length"]) - 1] += 1
        for scenario in record["target_scenarios"]:
            acc["target_scenarios"][scenario] = acc["target_scenarios"].get(scenario, 0) + 1
        for r in record["target_rewards"]:
            acc["reward_histogram"][bisect.bisect_right(REWARD_BUCKETS, r) - 1] += 1
            numerator, denominator = float(r).as_integer_ratio()
            acc["reward_sum"] += numerator * (_EXACT_SUM_SCALE // denominator)
        acc["history_watches"] += record["num_watches"]
        acc["history_searches"] += record["num_searches"]
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            for key, value in acc.items():
                if isinstance(value, dict):
                    for k, n in value.items():
                        merged[key][k] = merged[key].get(k, 0) + n
                elif isinstance(value, list):
                    merged[key] = [a + b for a, b in zip(merged[key], value)]
                else:
                    merged[key] += value
        return merged

    def extract_output(self, acc):
        n = max(acc["examples"], 1)
        return {
            "examples": acc["examples"],
            "targets": acc["targets"],
            "mean_targets_per_example": acc["targets"] / n,
            "targets_per_example": dict(sorted(acc["targets_per_example"].items(), key=lambda kv: int(kv[0]))),
            "sequence_length_histogram": {f"[{lo},{hi})": c for lo, hi, c in zip(
                LENGTH_BUCKETS[:-1], LENGTH_BUCKETS[1:], acc["length_histogram"])},
            "target_scenario_mix": dict(sorted(acc["target_scenarios"].items())),
            "target_reward_histogram": {f"[{lo},{hi})": c for lo, hi, c in zip(
                REWARD_BUCKETS[:-1], REWARD_BUCKETS[1:], acc["reward_histogram"])},
            "mean_target_reward": acc["reward_sum"] / _EXACT_SUM_SCALE / max(acc["targets"], 1),
            "mean_history_watches": acc["history_watches"] / n,
            "mean_history_searches": acc["history_searches"] / n,
        }


# ---------------------------------------------------------------------------------------------------------------
# Beam.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExampleBuildContext:
    """Everything a worker needs to build examples; small and picklable (artifacts are loaded in setup)."""
    layout: VocabularyLayout
    config: sequences.SequenceConfig
    seed: int
    query_tokenizer_dir: str
    feature_transform_dir: str
    day_start_us: int
    day_end_us: int
    date: str


def search_with_pieces(search: Dict[str, Any], tokenizer, max_pieces: int) -> Dict[str, Any]:
    return {"event_ts_us": search["event_ts_us"], "query": search["query"],
            "pieces": tokenizer.encode(search["query"], max_pieces)}


@dataclasses.dataclass(frozen=True)
class UserEvents:
    """One user's events ready for ``sequences``: queries cut into pieces, watches featurized by the transform_fn."""
    watches: List[Dict[str, Any]]
    searches: List[Dict[str, Any]]
    timeline: sequences.Timeline
    featurize: sequences.Featurize


def prepare_user_events(snapshots: Iterable[Dict[str, Any]], tokenizer, featurizer,
                        config: sequences.SequenceConfig) -> UserEvents:
    """Snapshot rows of one user -> the events both training examples and serving inputs are built from.

    The one path shared by ``reference_user_examples`` (the training specification) and ``serving_history`` (batch
    refresh), so that the same history gives the same tokens in both.
    """
    watches, searches = merge_user_events(snapshots)
    searches = [search_with_pieces(s, tokenizer, config.max_pieces_per_query) for s in searches]
    timeline = sequences.build_timeline(watches, searches, config)
    raw = sequences.raw_watch_features(timeline.watches, timeline.watch_gaps_s())
    buckets, soft = featurizer.featurize_columns(raw)
    featurize = features.lookup_featurize(timeline.watches, buckets, soft, config.feature_mode == "soft")
    return UserEvents(watches, searches, timeline, featurize)


def serving_history(snapshots: Iterable[Dict[str, Any]], cutoff_ts_us: int, tokenizer, featurizer,
                    layout: VocabularyLayout, config: sequences.SequenceConfig) -> sequences.HistorySequence:
    """The model input of a user as of ``cutoff_ts_us`` (every event before it): exactly the history a training
    example with that cutoff has (same selection, truncation, featurization and tokens)."""
    events = prepare_user_events(snapshots, tokenizer, featurizer, config)
    return sequences.build_history(events.timeline, cutoff_ts_us, layout, config, events.featurize)


def reference_user_examples(user_id: str, snapshots: Iterable[Dict[str, Any]], tokenizer, featurizer,
                            ctx: ExampleBuildContext) -> Tuple[List[Dict[str, Any]], List[List[float]]]:
    """One user's examples and each example's target rewards (the best reward of the target's video in the
    window), the plain-Python specification that ``columnar.build_batch`` reproduces for many users at once."""
    events = prepare_user_events(snapshots, tokenizer, featurizer, ctx.config)
    examples = sequences.make_user_examples(user_id, events.watches, events.searches, ctx.day_start_us,
                                            ctx.day_end_us, ctx.layout, ctx.config, ctx.seed, events.featurize)
    rewards = []
    for example in examples:
        best = {}
        for watch in target_lib.look_ahead_window(events.timeline.watches, example["cutoff_ts_us"],
                                                  ctx.config.window_s):
            best[watch.video_id] = max(best.get(watch.video_id, 0.0), target_lib.reward(watch, ctx.config.reward))
        rewards.append([best[v] for v in example["target_video_ids"]])
    return examples, rewards


def pack_snapshot_rows(table, active_in_day=None, trim=None):
    """(user_id, columnar.Pack) per row of a snapshot table; with ``(start_us, end_us)`` only users active then;
    with a ``columnar.Trim`` only the events that can reach an example of that day."""
    if active_in_day is not None:
        table = table.filter(columnar.active_in(table, *active_in_day))
    return columnar.pack_snapshots(table, trim)


def load_token_artifacts(query_tokenizer_dir: str, feature_transform_dir: str):
    """(query tokenizer, watch featurizer) on a worker; its driver verified both artifacts already."""
    from tokenminds_model.query_tokenizer import QueryTokenizer

    return (QueryTokenizer.load(query_tokenizer_dir, verify=False),
            features.WatchFeaturizer(feature_transform_dir))


def build_error_dead_letter(user_id: str, error: Exception, date: str) -> Dict[str, Any]:
    """The dead-letter row of a user whose examples could not be built."""
    from transforms.validation import row_to_json

    return {"table": "histories", "reason": EXAMPLE_BUILD_ERROR, "detail": f"{type(error).__name__}: {error}",
            "raw_row": row_to_json({"user_id": user_id}), "partition_date": date}


class BuildExampleBatches(beam.DoFn):
    """[(user_id, [packs of D-1, D, D+1])] -> serialized examples; tagged outputs for stats records, counts and dead
    letters. One batch of users is built at once (``columnar.build_users``)."""
    STATS, COUNTS, DEAD = "stats", "counts", "dead"

    def __init__(self, context: ExampleBuildContext):
        super().__init__()
        self._context = context
        self._spec = feature_spec(context.config, context.layout)
        self._examples = Metrics.counter("build_examples", "examples")
        self._errors = Metrics.counter("build_examples", EXAMPLE_BUILD_ERROR)

    def setup(self):
        self._tokenizer, self._featurizer = load_token_artifacts(self._context.query_tokenizer_dir,
                                                                 self._context.feature_transform_dir)

    def process(self, users):
        yield from self._build(users)

    def _build(self, users):
        ctx = self._context
        key = (USERS, ctx.date)
        for user_id, built in columnar.build_users(users, ctx.day_start_us, ctx.day_end_us, ctx.layout, ctx.config,
                                                   ctx.seed, self._tokenizer, self._featurizer):
            if isinstance(built, Exception):  # bad data of one user must not fail the day
                self._errors.inc()
                yield beam.pvalue.TaggedOutput(self.COUNTS, (key + (outputs.DEAD, EXAMPLE_BUILD_ERROR), 1))
                yield beam.pvalue.TaggedOutput(self.DEAD, build_error_dead_letter(user_id, built, ctx.date))
                continue
            examples, rewards = built
            if not examples:
                yield beam.pvalue.TaggedOutput(self.COUNTS, (key + (outputs.DROPPED, NO_EXAMPLE), 1))
                continue
            yield beam.pvalue.TaggedOutput(self.COUNTS, (key + (outputs.OUT, ""), 1))
            yield beam.pvalue.TaggedOutput(self.COUNTS, (("examples", ctx.date, outputs.STAT, "written"),
                                                         len(examples)))
            for example, target_rewards in zip(examples, rewards):
                self._examples.inc()
                yield serialize_example(example, self._spec)
                yield beam.pvalue.TaggedOutput(self.STATS, example_stats_record(example, target_rewards))


class _SnapshotPart:
    """One snapshot part's rows in user_id order, handed out up to a user id: a merge join's cursor. A missing
    part (no snapshot that day) has no rows."""

    def __init__(self, path: Optional[str], shard: int, num_shards: int, batch_users: int):
        from transforms import histories

        self._handle, self._batches = None, iter(())
        self._pending = pa.schema(list(SNAPSHOT_COLUMNS)).empty_table()
        if path is None:
            return
        source, self._handle, ids, in_order = histories.open_checked_part(path, shard, num_shards)
        order = None if in_order else pc.sort_indices(ids).to_numpy()
        self._batches = histories.rows_in_user_order(source, in_order, order, batch_users, SNAPSHOT_COLUMN_NAMES)

    def batches(self) -> Iterator[pa.Table]:
        """The rows in batches (for the part that drives the join)."""
        return self._batches

    def rows_through(self, last_user: str) -> pa.Table:
        """The next rows whose user_id is <= ``last_user``, consumed."""
        while not self._pending.num_rows or self._pending["user_id"][-1].as_py() <= last_user:
            following = next(self._batches, None)
            if following is None:
                break
            self._pending = pa.concat_tables([self._pending, following]) if self._pending.num_rows else following
        through = int(pc.sum(pc.less_equal(self._pending["user_id"], last_user)).as_py() or 0)
        rows, self._pending = self._pending.slice(0, through), self._pending.slice(through)
        return rows

    def close(self):
        if self._handle is not None:
            self._handle.close()


class _BuildShardExamples(BuildExampleBatches):
    """A shard number -> the examples of the shard's users active on D, built from part s of the snapshots of D-1,
    D and D+1 (each sorted by user_id, so a merge join, with no shuffle): the day's part is read a batch of users
    at a time, and the other two parts are read along up to its last user. Memory is a few row groups, whatever
    the history length or the shard's size. Also counts the users in (the day's active rows)."""

    def __init__(self, context: ExampleBuildContext, snapshot_dirs: Sequence[Optional[str]], num_shards: int,
                 batch_users: int):
        super().__init__(context)
        self._dirs, self._num_shards, self._batch_users = tuple(snapshot_dirs), num_shards, batch_users

    def process(self, shard: int):
        ctx = self._context
        trim = columnar.Trim.for_day(ctx.day_start_us, ctx.day_end_us, ctx.layout, ctx.config)
        parts = [_SnapshotPart(None if d is None else outputs.shard_path(d, shard, self._num_shards), shard,
                               self._num_shards, self._batch_users) for d in self._dirs]
        before, day, after = parts
        try:
            for rows in day.batches():
                if not rows.num_rows:
                    continue
                last_user = rows["user_id"][-1].as_py()
                active = rows.filter(columnar.active_in(rows, ctx.day_start_us, ctx.day_end_us))
                neighbours = [part.rows_through(last_user) for part in (before, after)]
                if not active.num_rows:
                    continue
                yield beam.pvalue.TaggedOutput(self.COUNTS, ((USERS, ctx.date, outputs.IN, ""), active.num_rows))
                ids = active["user_id"]
                packed = [dict(pack_snapshot_rows(t.filter(pc.is_in(t["user_id"], value_set=ids)), None, trim))
                          for t in neighbours]
                users = [(user_id, [p for p in (packed[0].get(user_id), pack, packed[1].get(user_id)) if p])
                         for user_id, pack in pack_snapshot_rows(active, None, trim)]
                yield from self._build(users)
        finally:
            for part in parts:
                part.close()


class BuildExamples(beam.PTransform):
    """Snapshot tables (Arrow, ``ReadFromParquetBatched``) of D-1, D and D+1 -> {"examples": serialized,
    "stats": dict, "counts": pairs, "dead": rows}.

    Only users with an event on day D are built (their cutoffs lie in D); the neighbouring snapshots supply the
    history before D and the look-ahead window into D+1. Rows cross the shuffle as compact column packs trimmed to
    the events that can reach the day's examples (so cost does not grow with history length), and users are built
    in batches.
    """

    def __init__(self, context: ExampleBuildContext, max_batch_size: int = 256):
        super().__init__()
        self._context, self._max_batch_size = context, max_batch_size

    def expand(self, snapshots_by_day):
        before, day, after = snapshots_by_day
        ctx = self._context
        # Each snapshot is trimmed to what can reach an example of the day before the shuffle (columnar._trim).
        trim = columnar.Trim.for_day(ctx.day_start_us, ctx.day_end_us, ctx.layout, ctx.config)
        keyed = {"before": before | "PackBefore" >> beam.FlatMap(pack_snapshot_rows, None, trim),
                 "day": day | "PackActiveDay" >> beam.FlatMap(pack_snapshot_rows, (ctx.day_start_us, ctx.day_end_us),
                                                              trim),
                 "after": after | "PackAfter" >> beam.FlatMap(pack_snapshot_rows, None, trim)}
        joined = (keyed | "JoinSnapshots" >> beam.CoGroupByKey()
                  | "ActiveOnly" >> beam.Filter(lambda kv: len(list(kv[1]["day"])) > 0)
                  | "AllSnapshots" >> beam.MapTuple(
                      lambda user, g: (user, list(g["before"]) + list(g["day"]) + list(g["after"]))))
        built = (joined | "BatchUsers" >> beam.BatchElements(max_batch_size=self._max_batch_size)
                 | "BuildExampleBatches" >> beam.ParDo(BuildExampleBatches(ctx)).with_outputs(
                     BuildExampleBatches.STATS, BuildExampleBatches.COUNTS, BuildExampleBatches.DEAD,
                     main="examples"))
        users_in = keyed["day"] | "CountUsersIn" >> outputs.CountRows(USERS, ctx.date, outputs.IN)
        counts = (users_in, built[BuildExampleBatches.COUNTS]) | "AllCounts" >> beam.Flatten()
        return _example_outputs(built, counts)


def _example_outputs(built, counts) -> Dict[str, Any]:
    stats = built[BuildExampleBatches.STATS] | "ExampleStats" >> beam.CombineGlobally(ExampleStats())
    return {"examples": built.examples, "stats": stats, "counts": counts, "dead": built[BuildExampleBatches.DEAD]}


class BuildExamplesByShard(beam.PTransform):
    """The pipeline's begin -> what ``BuildExamples`` returns, for snapshots of D-1, D and D+1 written with the same
    ``num_shards`` (``histories.snapshot_shard_count``; a missing day is None): part s of each holds the same
    users, sorted, so each shard's examples are built by a merge join of its three parts (``_BuildShardExamples``)
    and no snapshot row crosses a shuffle. The examples are those ``BuildExamples`` builds, byte for byte."""

    def __init__(self, context: ExampleBuildContext, snapshot_dirs: Sequence[Optional[str]], num_shards: int,
                 batch_users: int = 128):
        super().__init__()
        self._fn = _BuildShardExamples(context, snapshot_dirs, num_shards, batch_users)
        self._num_shards = num_shards

    def expand(self, pbegin):
        fn = self._fn
        built = (pbegin
                 | "Shards" >> beam.Create(list(range(self._num_shards)))
                 | "SpreadShards" >> beam.Reshuffle()  # one shard per worker on Dataflow, not all on the first
                 | "BuildShardExamples" >> beam.ParDo(fn).with_outputs(fn.STATS, fn.COUNTS, fn.DEAD, main="examples"))
        return _example_outputs(built, built[fn.COUNTS])
