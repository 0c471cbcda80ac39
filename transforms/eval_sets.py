"""Evaluation sets: per user, one held-out target watch and the history the model sees before it.

Three protocols (``PROTOCOLS``); each picks a cutoff and a target from a user's timeline, and every history is built
by exactly the training code (``sequences.select_history_events`` -> ``featurize_and_tokenize``), so an eval record
differs from a training example only in how its cutoff and target were chosen:

    session                  users with a watch on D. Target: the user's final watch on D (timeline order).
                             History: every kept event strictly before it (capped exactly as in training).
    cold_start               users with a session start on D that has a history and a positive-reward watch in the
                             24 h window [t, t + window_s) (t + window_s excluded). History: only the user's first
                             ``cold_start_events`` events before t. Target: one watch of the window drawn
                             reward-proportionally by a keyed hash of (seed, user, t, video, ts)
                             (``targets.sample_targets`` with k = 1), never by Python's hash or random state.
    leave_one_out            from the snapshot of D (events before D's end): the last watch is the test target,
    leave_one_out_validation the one before it the validation target; history = everything before the target.
                             Scored at full SID depth, with the disambiguation code (added by the Beam join).

Every case also carries the ground-truth future watches (positive-reward watches of the target's scenario in
[cutoff, cutoff + window_s), the target included) for the token-diversity metric, and a perturbed history for the
embedding-stability metric: the user's timeline with ~``drop_rate`` of its watches removed (whole events, chosen by a
keyed hash), gaps recomputed, and the same history rule applied at the same cutoff.

Records use the training feature spec (``examples.feature_spec``: the target in ``targets`` row 0, ``num_targets`` 1)
plus the ``EXTRA_FEATURES`` below, so ``tokenminds_model.data.numpy_batches`` reads them (tf.io.parse_example ignores
features a spec does not name, so the training spec parses them too).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from tokenminds_model.vocabulary import VocabularyLayout
from transforms import examples, features, outputs, sequences
from transforms import targets as target_lib
from transforms.sequences import SequenceConfig, Timeline, WatchEvent

SESSION, COLD_START, LEAVE_ONE_OUT, LEAVE_ONE_OUT_VALIDATION = (
    "session", "cold_start", "leave_one_out", "leave_one_out_validation")
PROTOCOLS = (SESSION, COLD_START, LEAVE_ONE_OUT, LEAVE_ONE_OUT_VALIDATION)

DEFAULT_COLD_START_EVENTS = 5
DEFAULT_DROP_RATE = 0.2
MAX_FUTURE_WATCHES = 32  # ground-truth future watches kept per case (for diversity); more than any top-N compared
NO_DISAMBIGUATION = -1  # the target video has no row in the day's video_sids (should not happen; counted)

# Drop reasons (the summary's dropped_by_reason).
NOT_ACTIVE = "no_watch_on_day"
EMPTY_HISTORY = "no_event_before_target"
NO_COLD_START = "no_session_start_with_history_and_target"
TOO_FEW_WATCHES = "too_few_watches"
BUILD_ERROR = "eval_build_error"

EvalOutcome = Union["EvalCase", str]  # a case, or the reason there is none


@dataclasses.dataclass(frozen=True)
class EvalCase:
    """One user's held-out target under one protocol.

    ``history_events``: the history rule's cap on the number of events (cold start), None for the training rule.
    """
    protocol: str
    cutoff_ts_us: int
    target: WatchEvent
    history: Timeline
    future: Tuple[WatchEvent, ...]
    history_events: Optional[int] = None


# ---------------------------------------------------------------------------------------------------------------
# Histories and targets (plain functions).
# ---------------------------------------------------------------------------------------------------------------
def case_history(timeline: Timeline, cutoff_ts_us: int, layout: VocabularyLayout, config: SequenceConfig,
                 history_events: Optional[int] = None) -> Timeline:
    """The history a case sees: ``select_history_events`` at the cutoff (the training rule), or with
    ``history_events`` only the user's first that many kept events before the cutoff (the cold-start rule)."""
    if history_events is None:
        return sequences.select_history_events(timeline, cutoff_ts_us, layout, config)
    before = [i for i, e in enumerate(timeline.events)
              if e.event_ts_us < cutoff_ts_us and sequences.keeps_event(e, config)][:history_events]
    earliest = Timeline(tuple(timeline.events[i] for i in before), tuple(timeline.gaps_s[i] for i in before))
    # Still through the training selection, so the caps and the token budget apply exactly as they would.
    return sequences.select_history_events(earliest, cutoff_ts_us, layout, config)


def future_watches(timeline: Timeline, cutoff_ts_us: int, scenario: str, config: SequenceConfig
                   ) -> Tuple[WatchEvent, ...]:
    """Positive-reward watches of ``scenario`` in [cutoff, cutoff + window_s), timeline order, at most
    MAX_FUTURE_WATCHES: the ground truth the decoded tokens' diversity is compared with."""
    window = target_lib.look_ahead_window(timeline.watches, cutoff_ts_us, config.window_s)
    return tuple(w for w in window if w.scenario == scenario
                 and target_lib.reward(w, config.reward) > 0.0)[:MAX_FUTURE_WATCHES]


def session_case(timeline: Timeline, day_start_us: int, day_end_us: int, layout: VocabularyLayout,
                 config: SequenceConfig) -> EvalOutcome:
    """Target: the final watch on the day (timeline order); history: everything before it."""
    day_watches = [w for w in timeline.watches if day_start_us <= w.event_ts_us < day_end_us]
    if not day_watches:
        return NOT_ACTIVE
    target = day_watches[-1]
    history = case_history(timeline, target.event_ts_us, layout, config)
    if not history.events:
        return EMPTY_HISTORY
    future = future_watches(timeline, target.event_ts_us, target.scenario, config) or (target,)
    return EvalCase(SESSION, target.event_ts_us, target, history, future)


def cold_start_case(timeline: Timeline, day_start_us: int, day_end_us: int, layout: VocabularyLayout,
                    config: SequenceConfig, seed: int, user_id: str,
                    history_events: int = DEFAULT_COLD_START_EVENTS) -> EvalOutcome:
    """The first session start on the day with a history and a positive-reward watch in its window; history: the
    user's first ``history_events`` events; target: one reward-weighted keyed draw from the window."""
    for cutoff in sequences.session_starts(timeline.events, day_start_us, day_end_us, config.session_gap_s):
        history = case_history(timeline, cutoff, layout, config, history_events)
        if not history.events:
            continue
        window = target_lib.look_ahead_window(timeline.watches, cutoff, config.window_s)
        drawn = target_lib.sample_targets(window, 1, seed, user_id, cutoff, config.reward)
        if drawn:
            target = drawn[0]
            return EvalCase(COLD_START, cutoff, target, history,
                            future_watches(timeline, cutoff, target.scenario, config), history_events)
    return NO_COLD_START


def leave_one_out_cases(timeline: Timeline, day_end_us: int, layout: VocabularyLayout, config: SequenceConfig
                        ) -> Dict[str, EvalOutcome]:
    """{leave_one_out: test, leave_one_out_validation: validation} from the events before the day's end."""
    watches = [w for w in timeline.watches if w.event_ts_us < day_end_us]
    outcomes: Dict[str, EvalOutcome] = {}
    for protocol, position in ((LEAVE_ONE_OUT, -1), (LEAVE_ONE_OUT_VALIDATION, -2)):
        if len(watches) < -position:
            outcomes[protocol] = TOO_FEW_WATCHES
            continue
        target = watches[position]
        history = case_history(timeline, target.event_ts_us, layout, config)
        outcomes[protocol] = (EvalCase(protocol, target.event_ts_us, target, history, (target,))
                              if history.events else EMPTY_HISTORY)
    return outcomes


def make_user_eval_cases(user_id: str, timeline: Timeline, day_start_us: int, day_end_us: int,
                         layout: VocabularyLayout, config: SequenceConfig, seed: int,
                         cold_start_events: int = DEFAULT_COLD_START_EVENTS) -> Dict[str, EvalOutcome]:
    """Every protocol's outcome for one user: {protocol: EvalCase or drop reason}. ``timeline`` is
    ``sequences.build_timeline(watches, searches, config)`` over the snapshots of D-1, D and D+1."""
    outcomes: Dict[str, EvalOutcome] = {
        SESSION: session_case(timeline, day_start_us, day_end_us, layout, config),
        COLD_START: cold_start_case(timeline, day_start_us, day_end_us, layout, config, seed, user_id,
                                    cold_start_events),
    }
    outcomes.update(leave_one_out_cases(timeline, day_end_us, layout, config))
    return outcomes


def perturbed_timeline(timeline: Timeline, seed: int, user_id: str, drop_rate: float = DEFAULT_DROP_RATE
                       ) -> Timeline:
    """The timeline without the watches whose keyed draw ``uniform(seed, user, video, ts) <= drop_rate``, gaps
    recomputed: the same user as if those watches had never happened. Searches are kept."""
    kept = [e for e in timeline.events if not isinstance(e, WatchEvent) or sequences.uniform_from_hash(
        sequences.keyed_hash64("stability_drop", seed, user_id, *e.identity)) > drop_rate]
    return Timeline(tuple(kept), tuple(sequences.time_gaps_s(kept)))


# ---------------------------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------------------------
def extra_feature_spec(config: SequenceConfig, layout: VocabularyLayout) -> Dict[str, Dict[str, Any]]:
    """The features an eval record has beyond a training example's."""
    levels = layout.sid_levels
    spec = {
        "target_video_id": {"dtype": "string", "shape": [1]},
        "target_ts_us": {"dtype": "int64", "shape": [1]},
        "target_sid": {"dtype": "int64", "shape": [levels]},  # full depth, whatever the history's L
        "target_disambiguation": {"dtype": "int64", "shape": [1]},  # NO_DISAMBIGUATION when unknown
        "future_sids": {"dtype": "int64", "shape": [MAX_FUTURE_WATCHES, levels]},  # -1 rows after num_future
        "num_future": {"dtype": "int64", "shape": [1]},
        "perturbed_tokens": {"dtype": "int64", "shape": [config.max_tokens]},
        "perturbed_length": {"dtype": "int64", "shape": [1]},
    }
    if config.feature_mode == "soft":
        spec["perturbed_soft_features"] = {"dtype": "float32",
                                           "shape": [config.max_tokens, features.SOFT_FEATURE_DIM]}
    return spec


def eval_feature_spec(config: SequenceConfig, layout: VocabularyLayout) -> Dict[str, Dict[str, Any]]:
    return {**examples.feature_spec(config, layout), **extra_feature_spec(config, layout)}


def eval_record(user_id: str, case: EvalCase, perturbed_history: Timeline, layout: VocabularyLayout,
                config: SequenceConfig, featurize: sequences.Featurize,
                perturbed_featurize: sequences.Featurize) -> Dict[str, Any]:
    """One case as a record dict of ``eval_feature_spec`` (``target_disambiguation`` still unknown)."""
    history = sequences.featurize_and_tokenize(case.history, layout, config, featurize)
    perturbed = sequences.featurize_and_tokenize(perturbed_history, layout, config, perturbed_featurize)
    future = np.full((MAX_FUTURE_WATCHES, layout.sid_levels), -1, np.int64)
    for row, watch in enumerate(case.future):
        future[row] = watch.sid
    record = {
        "user_id": user_id,
        "cutoff_ts_us": case.cutoff_ts_us,
        "tokens": history.tokens,
        "length": history.length,
        "num_watches": history.num_watches,
        "num_searches": history.num_searches,
        "targets": target_lib.encode_targets([case.target], layout, config.sid_length(layout), config.max_targets),
        "num_targets": 1,
        "target_video_id": case.target.video_id,
        "target_ts_us": case.target.event_ts_us,
        "target_sid": np.asarray(case.target.sid, np.int64),
        "target_disambiguation": NO_DISAMBIGUATION,
        "future_sids": future,
        "num_future": len(case.future),
        "perturbed_tokens": perturbed.tokens,
        "perturbed_length": perturbed.length,
    }
    if history.soft_features is not None:
        record["soft_features"] = history.soft_features
        record["perturbed_soft_features"] = perturbed.soft_features
    return record


# ---------------------------------------------------------------------------------------------------------------
# Beam.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalSetContext:
    """Everything a worker needs; small and picklable (artifacts are loaded in setup)."""
    build: examples.ExampleBuildContext
    cold_start_events: int = DEFAULT_COLD_START_EVENTS
    drop_rate: float = DEFAULT_DROP_RATE


def eval_table(protocol: str) -> str:
    return f"eval_{protocol}"


class BuildUserEvalCases(beam.DoFn):
    """(user_id, [snapshots]) -> (target video id, (protocol, record)); tagged counts per protocol."""
    COUNTS = "counts"

    def __init__(self, context: EvalSetContext):
        super().__init__()
        self._context = context
        self._errors = Metrics.counter("build_eval_sets", BUILD_ERROR)

    def setup(self):
        from tokenminds_model.query_tokenizer import QueryTokenizer

        self._tokenizer = QueryTokenizer.load(self._context.build.query_tokenizer_dir, verify=False)  # driver verified
        self._featurizer = features.WatchFeaturizer(self._context.build.feature_transform_dir)

    def _featurize(self, timeline: Timeline):
        raw = sequences.raw_watch_features(timeline.watches, timeline.watch_gaps_s())
        buckets, soft = self._featurizer.featurize_columns(raw)
        return features.lookup_featurize(timeline.watches, buckets, soft,
                                         self._context.build.config.feature_mode == "soft")

    def process(self, keyed_snapshots):
        user_id, snapshots = keyed_snapshots
        ctx, build = self._context, self._context.build
        try:
            watches, searches = examples.merge_user_events(snapshots)
            searches = [examples.search_with_pieces(s, self._tokenizer, build.config.max_pieces_per_query)
                        for s in searches]
            timeline = sequences.build_timeline(watches, searches, build.config)
            outcomes = make_user_eval_cases(user_id, timeline, build.day_start_us, build.day_end_us, build.layout,
                                            build.config, build.seed, ctx.cold_start_events)
            records = []
            if any(isinstance(o, EvalCase) for o in outcomes.values()):
                featurize = self._featurize(timeline)
                perturbed = perturbed_timeline(timeline, build.seed, user_id, ctx.drop_rate)
                perturbed_featurize = self._featurize(perturbed)
                for protocol, case in outcomes.items():
                    if isinstance(case, EvalCase):
                        perturbed_history = case_history(perturbed, case.cutoff_ts_us, build.layout, build.config,
                                                         case.history_events)
                        records.append((protocol, eval_record(user_id, case, perturbed_history, build.layout,
                                                              build.config, featurize, perturbed_featurize)))
        except (ValueError, KeyError, TypeError):  # bad data of one user must not fail the day
            self._errors.inc()
            for protocol in PROTOCOLS:
                yield beam.pvalue.TaggedOutput(self.COUNTS, ((eval_table(protocol), build.date, outputs.DROPPED,
                                                              BUILD_ERROR), 1))
            return
        for protocol, outcome in outcomes.items():
            if not isinstance(outcome, EvalCase):
                yield beam.pvalue.TaggedOutput(self.COUNTS, ((eval_table(protocol), build.date, outputs.DROPPED,
                                                              outcome), 1))
        for protocol, record in records:
            yield record["target_video_id"], (protocol, record)


def with_disambiguation(joined, spec: Mapping[str, Mapping[str, Any]]):
    """(video id, {"cases": [(protocol, record)], "sids": [disambiguation]}) -> (protocol, serialized record)."""
    _, grouped = joined
    codes = list(grouped["sids"])
    for protocol, record in grouped["cases"]:
        record = dict(record, target_disambiguation=int(codes[0]) if codes else NO_DISAMBIGUATION)
        yield protocol, examples.serialize_example(record, spec)


class BuildEvalSets(beam.PTransform):
    """(snapshots of D-1, D, D+1, video_sids of D) -> {"records": {protocol: serialized}, "counts": pairs}.

    Every user of D's snapshot counts as in for every protocol, and as written or dropped (with a reason) there.
    """

    def __init__(self, context: EvalSetContext):
        super().__init__()
        self._context = context

    def expand(self, inputs):
        before, day, after, video_sids = inputs
        build = self._context.build
        keyed = {name: pcoll | f"Key{name}" >> beam.Map(lambda s: (s["user_id"], s))
                 for name, pcoll in (("before", before), ("day", day), ("after", after))}
        joined = (keyed | "JoinSnapshots" >> beam.CoGroupByKey()
                  | "InDaySnapshot" >> beam.Filter(lambda kv: len(list(kv[1]["day"])) > 0)
                  | "AllSnapshots" >> beam.MapTuple(
                      lambda user, g: (user, list(g["before"]) + list(g["day"]) + list(g["after"]))))
        built = joined | "BuildUserEvalCases" >> beam.ParDo(BuildUserEvalCases(self._context)).with_outputs(
            BuildUserEvalCases.COUNTS, main="cases")
        disambiguation = video_sids | "KeySids" >> beam.Map(lambda row: (row["video_id"], row["disambiguation"]))
        spec = eval_feature_spec(build.config, build.layout)
        serialized = ({"cases": built.cases, "sids": disambiguation} | "JoinTargetSids" >> beam.CoGroupByKey()
                      | "WithDisambiguation" >> beam.FlatMap(with_disambiguation, spec))
        records = {protocol: serialized | f"Only_{protocol}" >> beam.Filter(lambda kv, p=protocol: kv[0] == p)
                   | f"Bytes_{protocol}" >> beam.Values() for protocol in PROTOCOLS}
        counts = [built[BuildUserEvalCases.COUNTS]]
        for protocol in PROTOCOLS:
            counts.append(day | f"UsersIn_{protocol}" >> outputs.CountRows(eval_table(protocol), build.date,
                                                                             outputs.IN))
            counts.append(records[protocol] | f"Written_{protocol}" >> outputs.CountRows(
                eval_table(protocol), build.date, outputs.OUT))
        return {"records": records, "counts": tuple(counts) | "AllCounts" >> beam.Flatten()}
