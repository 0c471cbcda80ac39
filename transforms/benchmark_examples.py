"""Leave-one-out examples for the benchmark mode: the standard sequential-recommendation protocol on the token format.

The daily jobs cut each active user-day at its session starts and take targets from the 24 h look-ahead window: right
for continuous training, but a public benchmark (MovieLens and the like) is scored the standard way, per user:

    a user's watches, oldest first (timeline order):   w_0  w_1  ...  w_{n-3}  w_{n-2}  w_{n-1}
    test                                                                               target w_{n-1}, history < it
    validation                                                             target w_{n-2}, history < it
    train                                              one example per target w_j, 1 <= j <= n-3, history < w_j

Every history is built exactly as a training example's (``columnar.history_positions``: the most recent events before
the target that fit the token budget, searches interleaved, features from the fitted transform), so the benchmark
measures the model the daily jobs train, on the same token layout. The target is a single row
``[condition, sid_0 .. sid_{L-1}]`` at the example's SID depth (``SequenceConfig.full_depth_sids`` for item-level
ranking), and every record carries ``target_video_id`` so the evaluation ranks items, not SID prefixes.

Training targets: a training example at position j carries the next ``SplitConfig.train_targets`` (K) training
watches ``w_j .. w_{j+K-1}`` as its target rows (never the validation or test item): the paper's K look-ahead
targets, so one encoder pass is supervised by K next items, as SASRec is supervised at every position. K = 1 is the
plain next-item objective. Validation and test records always carry the one held-out item.

Training positions: every one by default (``SplitConfig.max_train_positions = 0``), or, with a cap, the last one
(the freshest history) plus the ``cap - 1`` others with the smallest keyed hash ``("train_position", seed, user, j)``:
a documented, seeded sample, so every user contributes and the choice depends on nothing but those values.

Users with fewer than ``MIN_WATCHES`` (3) watches have no train/validation/test split: they are dropped and counted.
Each user's watch sequence (video ids, timeline order) is also returned, so the ID-based baselines (most popular,
SASRec) train and test on exactly the same split.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from tokenminds_model.vocabulary import VocabularyLayout
from transforms import columnar, examples, outputs
from transforms.events import SequenceConfig, keyed_hash64

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
MIN_WATCHES = 3  # one train target (w_1 needs w_0 as history) would need 4; 3 gives validation and test
TOO_FEW_WATCHES = "fewer_than_3_watches"
TARGET_VIDEO_ID = "target_video_id"  # the extra feature every benchmark record carries


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How many training positions of each user become examples (0: every one), how many next watches a training
    example targets (K), and the sampling seed."""
    max_train_positions: int = 0
    seed: int = 0
    train_targets: int = 1

    def __post_init__(self) -> None:
        if self.max_train_positions < 0:
            raise ValueError(f"max_train_positions must be >= 0, got {self.max_train_positions}")
        if self.train_targets < 1:
            raise ValueError(f"train_targets must be >= 1, got {self.train_targets}")


def split_sequence_configs(config: SequenceConfig, split: SplitConfig) -> Dict[str, SequenceConfig]:
    """Per split, the sequence config its records are built with: K target rows for training, one for the rest."""
    return {TRAIN: dataclasses.replace(config, max_targets=split.train_targets),
            VALIDATION: dataclasses.replace(config, max_targets=1), TEST: dataclasses.replace(config, max_targets=1)}


def train_positions(num_watches: int, split: SplitConfig, user_id: str) -> List[int]:
    """The watch indices (timeline order) that are training targets, ascending: 1..n-3, or the seeded sample."""
    candidates = list(range(1, num_watches - 2))
    cap = split.max_train_positions
    if not cap or len(candidates) <= cap:
        return candidates
    last, others = candidates[-1], candidates[:-1]
    chosen = sorted(others, key=lambda j: (keyed_hash64("train_position", split.seed, user_id, j), j))[:cap - 1]
    return sorted(chosen) + [last]


def split_targets(num_watches: int, split: SplitConfig, user_id: str) -> List[Tuple[str, int]]:
    """(split, watch index) of every example of a user with ``num_watches`` watches (none below MIN_WATCHES)."""
    if num_watches < MIN_WATCHES:
        return []
    return ([(TRAIN, j) for j in train_positions(num_watches, split, user_id)]
            + [(VALIDATION, num_watches - 2), (TEST, num_watches - 1)])


@dataclasses.dataclass(frozen=True, eq=False)
class UserSplit:
    """One user's benchmark output: ``examples`` as (split, example dict) and the watch sequence (video ids)."""
    examples: List[Tuple[str, Dict[str, Any]]]
    video_ids: List[str]


def build_split_batch(users: Sequence[Tuple[str, Sequence[columnar.Pack]]], layout: VocabularyLayout,
                      config: SequenceConfig, split: SplitConfig, tokenizer, featurizer) -> List[Any]:
    """Per user of ``users`` (snapshot packs): a ``UserSplit``, or ``TOO_FEW_WATCHES``. Raises on bad data
    (``columnar.Batch``'s checks); ``build_split_users`` retries user by user."""
    batch = columnar.Batch(users, layout, config, tokenizer)
    watch_cost = config.watch_token_count(layout)
    configs = split_sequence_configs(config, split)
    planned = []  # (user index, split, history positions, target watches)
    results: List[Any] = []
    for u, (user_id, _) in enumerate(users):
        lo, hi = batch.user_bounds[u], batch.user_bounds[u + 1]
        positions = lo + np.flatnonzero(batch.kind[lo:hi] == 1)  # the user's watches, timeline order
        watches = batch.index[positions]
        targets = split_targets(len(positions), split, user_id)
        if not targets:
            results.append(TOO_FEW_WATCHES)
            continue
        if not batch.sid_ok[watches].all():
            raise ValueError(f"a watch's SID does not have the layout's {layout.sid_levels} levels")
        results.append(UserSplit([], [batch.video_id_list[i] for i in watches]))
        last_train = len(positions) - 3  # the training targets are w_1 .. w_{n-3}
        for name, j in targets:
            history = columnar.history_positions(batch, lo, int(positions[j]), watch_cost, config)
            ahead = min(j + split.train_targets, last_train + 1) if name == TRAIN else j + 1
            planned.append((u, name, history, [int(w) for w in watches[j:ahead]]))

    watch_block, soft, feature_row = columnar.featurized_watch_tokens(batch, [h for _, _, h, _ in planned], layout,
                                                                     config, featurizer)
    for u, name, history, picked in planned:
        example = columnar.example_from_history(batch, users[u][0], int(batch.w_ts[picked[0]]), history, picked,
                                                watch_block, soft, feature_row, layout, configs[name])
        example[TARGET_VIDEO_ID] = batch.video_id_list[picked[0]]  # the next item (the held-out one)
        results[u].examples.append((name, example))
    return results


def build_split_users(users: Sequence[Tuple[str, Sequence[columnar.Pack]]], *args) -> Iterator[Tuple[str, Any]]:
    """(user_id, UserSplit | TOO_FEW_WATCHES | the exception) per user: the batch at once, or user by user if it
    fails, so one user's bad data dead-letters that user alone."""
    return columnar.per_user_or_error(build_split_batch, users, *args)


# ---------------------------------------------------------------------------------------------------------------
# Beam.
# ---------------------------------------------------------------------------------------------------------------
SEQUENCES = "sequences"
USERS = "users"


def feature_spec(config: SequenceConfig, layout: VocabularyLayout) -> Dict[str, Dict[str, Any]]:
    """The training example spec (``examples.feature_spec``) plus ``target_video_id``."""
    return {**examples.feature_spec(config, layout), TARGET_VIDEO_ID: {"dtype": "string", "shape": [1]}}


def split_feature_specs(config: SequenceConfig, split: SplitConfig, layout: VocabularyLayout
                        ) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per split, its records' feature spec (the training split has K target rows)."""
    return {name: feature_spec(c, layout) for name, c in split_sequence_configs(config, split).items()}


@dataclasses.dataclass(frozen=True)
class SplitBuildContext:
    """Everything a worker needs; small and picklable (artifacts are loaded in setup)."""
    layout: VocabularyLayout
    config: SequenceConfig
    split: SplitConfig
    query_tokenizer_dir: str
    feature_transform_dir: str
    date: str  # the snapshot's day: the row accounting's partition


class BuildSplitBatches(beam.DoFn):
    """[(user_id, [pack])] -> serialized examples tagged by split, plus each user's watch sequence, row counts,
    per-example stats records and dead letters."""
    COUNTS, DEAD, STATS = "counts", "dead", "stats"

    def __init__(self, context: SplitBuildContext):
        super().__init__()
        self._context = context
        self._specs = split_feature_specs(context.config, context.split, context.layout)
        self._errors = Metrics.counter("build_benchmark_examples", examples.EXAMPLE_BUILD_ERROR)

    def setup(self):
        self._tokenizer, self._featurizer = examples.load_token_artifacts(self._context.query_tokenizer_dir,
                                                                          self._context.feature_transform_dir)

    def process(self, users):
        ctx = self._context
        key = (USERS, ctx.date)
        for user_id, built in build_split_users(users, ctx.layout, ctx.config, ctx.split, self._tokenizer,
                                                self._featurizer):
            if isinstance(built, Exception):  # bad data of one user must not fail the run
                self._errors.inc()
                yield beam.pvalue.TaggedOutput(self.COUNTS, (key + (outputs.DEAD, examples.EXAMPLE_BUILD_ERROR), 1))
                yield beam.pvalue.TaggedOutput(self.DEAD, examples.build_error_dead_letter(user_id, built, ctx.date))
                continue
            if built == TOO_FEW_WATCHES:
                yield beam.pvalue.TaggedOutput(self.COUNTS, (key + (outputs.DROPPED, TOO_FEW_WATCHES), 1))
                continue
            yield beam.pvalue.TaggedOutput(self.COUNTS, (key + (outputs.OUT, ""), 1))
            yield beam.pvalue.TaggedOutput(SEQUENCES, {"user_id": user_id, "video_ids": built.video_ids})
            for name, example in built.examples:
                yield beam.pvalue.TaggedOutput(self.COUNTS, (("examples", ctx.date, outputs.STAT, name), 1))
                yield beam.pvalue.TaggedOutput(name, examples.serialize_example(example, self._specs[name]))
                yield beam.pvalue.TaggedOutput(self.STATS, (name, examples.example_stats_record(example, [])))


class BuildBenchmarkExamples(beam.PTransform):
    """Snapshot tables (Arrow, ``ReadFromParquetBatched``) of one day -> {"train" | "validation" | "test":
    serialized examples, "sequences": {user_id, video_ids} rows, "stats": {split: stats}, "counts", "dead"}."""

    def __init__(self, context: SplitBuildContext, max_batch_size: int = 64):
        super().__init__()
        self._context, self._max_batch_size = context, max_batch_size

    def expand(self, snapshot_tables):
        ctx = self._context
        packed = (snapshot_tables | "Pack" >> beam.FlatMap(examples.pack_snapshot_rows)
                  | "OneSnapshot" >> beam.MapTuple(lambda user_id, pack: (user_id, [pack])))
        built = (packed
                 # Users of one snapshot row group arrive together; spread them before the expensive step.
                 | "Spread" >> beam.Reshuffle()
                 | "BatchUsers" >> beam.BatchElements(max_batch_size=self._max_batch_size)
                 | "BuildSplits" >> beam.ParDo(BuildSplitBatches(ctx)).with_outputs(
                     *SPLITS, SEQUENCES, BuildSplitBatches.COUNTS, BuildSplitBatches.DEAD, BuildSplitBatches.STATS))
        users_in = packed | "CountUsersIn" >> outputs.CountRows(USERS, ctx.date, outputs.IN)
        counts = (users_in, built[BuildSplitBatches.COUNTS]) | "AllCounts" >> beam.Flatten()
        stats = (built[BuildSplitBatches.STATS]
                 | "StatsPerSplit" >> beam.CombinePerKey(examples.ExampleStats())
                 | "StatsDict" >> beam.combiners.ToDict())
        return {**{name: built[name] for name in SPLITS}, SEQUENCES: built[SEQUENCES], "stats": stats,
                "counts": counts, "dead": built[BuildSplitBatches.DEAD]}
