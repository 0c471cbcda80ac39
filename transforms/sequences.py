"""One user's history as ONE interleaved token sequence, and the examples (history + look-ahead targets) built from it.

Plain Python/NumPy on purpose (no Beam, no TensorFlow): the Beam pipeline calls these functions per user, and the
same functions build serving sequences, so training and serving cannot drift apart. Every token id comes from
``tokenminds_model.vocabulary.VocabularyLayout``; nothing here computes an id by hand.

Inputs are the user-history snapshot's plain dicts (``schemas.HISTORY_WATCH_TYPE``, plus the encoded query pieces
for searches)::

    watch:  {"video_id", "scenario", "event_ts_us", "watch_time_s", "video_duration_s", "surface", "device",
             "liked", "disliked", "sid"}
    search: {"event_ts_us", "query", "pieces"}

They are converted once into the frozen ``WatchEvent`` / ``SearchEvent`` (``as_watch_event``, ``as_search_event``,
``as_event``); every public function accepts either shape.

Order of operations for one user (``make_user_examples`` does all of it; serving calls ``build_history`` with
``cutoff_ts_us = end of day``)::

    build_timeline(watches, searches, config)
        drop what the config excludes (searches when include_searches=False, watches of other scenarios),
        interleave in time order (``event_sort_key``) and compute each event's time gap once, on the whole timeline
    choose_cutoffs(timeline.events, day_start_us, day_end_us, config, seed, user_id)
        session starts inside the day, at most max_cutoffs_per_day, subsampled by a keyed hash
    for each cutoff:
        select_history_events(timeline, cutoff, layout, config)    events strictly before the cutoff, capped
                                                                    (watches, searches, then the token budget)
        featurize(selected.watches, selected.watch_gaps_s())       the caller's tensorflow-transform function
        tokenize_history(selected, layout, config, watch_features | soft_vectors)  padded arrays
        targets.build_targets(timeline.watches, cutoff, layout, config, seed, user_id)

Because a gap is computed on the whole timeline before any cutoff or truncation, an event's features never depend
on the cutoff: the pipeline may featurize each event once and reuse the result for every cutoff.

Token layout of one event (L = ``config.sid_length(layout)``, F = ``len(layout.feature_names)``)::

    watch, hard features:  <LFV|SFV>  sid_0 .. sid_{L-1}  feat_<name>_<bucket> for each name in layout.feature_names
    watch, soft features:  <LFV|SFV>  sid_0 .. sid_{L-1}  <soft>     (its vector sits in soft_features at <soft>)
    search:                <Search>   q_<piece> for the first max_pieces_per_query pieces

Sequences are left-aligned: oldest event first, the event just before the cutoff last, then PAD_ID to
``max_tokens``. They are only ever cut between events (whole oldest events are dropped), so position 0 always holds
an event-start token (``<LFV>``, ``<SFV>`` or ``<Search>``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tokenminds_model import vocabulary
from tokenminds_model.vocabulary import PAD_ID, SEARCH_ID, SOFT_ID, TOKEN_DTYPE, VocabularyLayout
from transforms import targets as target_lib
# The shared event types and configuration live in transforms.events; re-exported here for existing callers.
from transforms.events import (  # noqa: F401
    DEFAULT_MIN_WATCH_RATIO, FEATURE_MODES, FIRST_EVENT_GAP_S, MAX_WATCH_RATIO, RAW_CATEGORICAL_COLUMNS,
    RAW_COLUMN_FOR_FEATURE, RAW_FLAG_COLUMNS, RAW_NUMERIC_COLUMNS, RAW_WATCH_FEATURE_COLUMNS, SECOND_US, TARGET_MODES,
    Event, EventLike, RewardConfig, SearchEvent, SearchLike, SequenceConfig, WatchEvent, WatchLike, _int_at_least,
    as_event, as_search_event, as_watch_event, event_sort_key, keeps_event, keyed_hash64, uniform_from_hash,
    watch_ratio)


def interleave_events(watches: Sequence[WatchLike], searches: Sequence[SearchLike] = ()) -> List[Event]:
    """Watches and searches as one list in timeline order (``event_sort_key``), whatever order they came in."""
    events: List[Event] = [as_watch_event(w) for w in watches]
    events.extend(as_search_event(s) for s in searches)
    events.sort(key=event_sort_key)
    return events


def time_gaps_s(events: Sequence[EventLike]) -> np.ndarray:
    """float64 seconds since the previous event of ``events`` (which must be in time order), for the time_gap feature.

    The first event gets ``FIRST_EVENT_GAP_S`` (-1.0): it has no previous event in this timeline.
    """
    timestamps = np.array([as_event(e).event_ts_us for e in events], dtype=np.int64)
    gaps = np.full(len(timestamps), FIRST_EVENT_GAP_S, dtype=np.float64)
    if len(timestamps) > 1:
        deltas = np.diff(timestamps)
        if (deltas < 0).any():
            raise ValueError("time_gaps_s needs events in time order; interleave them first")
        gaps[1:] = deltas / SECOND_US
    return gaps


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Events in timeline order, each with its time gap (seconds since the previous event of the user's timeline).

    ``build_timeline`` makes a user's whole timeline; ``select_history_events`` returns the part of one that a
    history keeps, with the gaps carried over unchanged (so they do not depend on the cutoff or the truncation).
    """
    events: Tuple[Event, ...]
    gaps_s: Tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        object.__setattr__(self, "gaps_s", tuple(float(g) for g in self.gaps_s))
        if len(self.events) != len(self.gaps_s):
            raise ValueError(f"{len(self.events)} events but {len(self.gaps_s)} gaps")

    def __len__(self) -> int:
        return len(self.events)

    @property
    def watches(self) -> List[WatchEvent]:
        return [e for e in self.events if isinstance(e, WatchEvent)]

    @property
    def searches(self) -> List[SearchEvent]:
        return [e for e in self.events if isinstance(e, SearchEvent)]

    def watch_gaps_s(self) -> np.ndarray:
        """float64 gaps of the watches only, aligned with ``watches`` (what ``featurize`` receives)."""
        return np.array([g for e, g in zip(self.events, self.gaps_s) if isinstance(e, WatchEvent)],
                        dtype=np.float64)


def build_timeline(watches: Sequence[WatchLike], searches: Sequence[SearchLike] = (),
                   config: Optional[SequenceConfig] = None) -> Timeline:
    """A user's whole timeline: the events the config keeps (``keeps_event``), interleaved, with their gaps.

    The ablations act here, before gaps are computed: with include_searches=False a watch's gap is measured from
    the previous kept event, as the model would see it.
    """
    events = interleave_events(watches, searches)
    if config is not None:
        events = [e for e in events if keeps_event(e, config)]
    return Timeline(tuple(events), tuple(time_gaps_s(events)))


def raw_watch_features(watches: Sequence[WatchLike], gaps_s: Sequence[float]) -> Dict[str, np.ndarray]:
    """The raw per-watch feature columns (``RAW_WATCH_FEATURE_COLUMNS``), one value per watch, in order.

    - ``watch_ratio``  float32, ``watch_ratio(watch)``
    - ``watch_time_s`` float32
    - ``surface``, ``device``  str (object arrays)
    - ``liked``, ``disliked``  int64 0/1
    - ``time_gap_s``   float32, the watch's gap as given (``Timeline.watch_gaps_s()``; -1.0 for a first event)

    This is the reference featurizer's input half; the tensorflow-transform preprocessing turns these columns into
    the bucket per layout feature (``RAW_COLUMN_FOR_FEATURE``) that ``tokenize_history`` takes.
    """
    watches = [as_watch_event(w) for w in watches]
    gaps_s = np.asarray(gaps_s, dtype=np.float64)
    if gaps_s.shape != (len(watches),):
        raise ValueError(f"need one gap per watch: {len(watches)} watches, gaps of shape {gaps_s.shape}")
    return {
        "watch_ratio": np.array([watch_ratio(w) for w in watches], dtype=np.float32),
        "watch_time_s": np.array([w.watch_time_s for w in watches], dtype=np.float32),
        "surface": np.array([w.surface for w in watches], dtype=object),
        "device": np.array([w.device for w in watches], dtype=object),
        "liked": np.array([int(w.liked) for w in watches], dtype=np.int64),
        "disliked": np.array([int(w.disliked) for w in watches], dtype=np.int64),
        "time_gap_s": gaps_s.astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------------------------
# History: select, tokenize.
# ---------------------------------------------------------------------------------------------------------------
def event_token_count(event: EventLike, layout: VocabularyLayout, config: SequenceConfig) -> int:
    """How many tokens ``event`` takes in a sequence (what the token budget counts)."""
    event = as_event(event)
    if isinstance(event, WatchEvent):
        return config.watch_token_count(layout)
    return config.search_token_count(len(event.pieces))


def select_history_events(timeline: Timeline, cutoff_ts_us: int, layout: VocabularyLayout,
                          config: SequenceConfig) -> Timeline:
    """The events a history at ``cutoff_ts_us`` keeps, oldest first, with their gaps: what gets featurized and
    tokenized.

    In this order:
      1. events with ``event_ts_us < cutoff_ts_us`` (strictly before: an event at the cutoff is in the look-ahead
         window, never in the history) that the config keeps (``keeps_event``);
      2. only the ``max_watches`` most recent watches and the ``max_searches`` most recent searches (each cap drops
         the older events of its own kind only);
      3. the longest run of most recent events that fits ``max_tokens`` (``event_token_count``): whole oldest
         events are dropped, an event is never split, and nothing older than the first event that does not fit is
         kept.
    """
    cutoff_ts_us = _int_at_least(cutoff_ts_us, -2**63, "cutoff_ts_us")
    watch_cost = config.watch_token_count(layout)
    kept: List[int] = []
    watches = searches = tokens = 0
    # Newest first, so each cap keeps the most recent events of its kind.
    for index in range(len(timeline.events) - 1, -1, -1):
        event = timeline.events[index]
        if event.event_ts_us >= cutoff_ts_us or not keeps_event(event, config):
            continue
        if isinstance(event, WatchEvent):
            if watches >= config.max_watches:
                continue
            cost = watch_cost
        else:
            if searches >= config.max_searches:
                continue
            cost = config.search_token_count(len(event.pieces))
        if tokens + cost > config.max_tokens:
            break
        tokens += cost
        kept.append(index)
        if isinstance(event, WatchEvent):
            watches += 1
        else:
            searches += 1
    kept.reverse()
    return Timeline(tuple(timeline.events[i] for i in kept), tuple(timeline.gaps_s[i] for i in kept))


@dataclasses.dataclass(frozen=True, eq=False)
class HistorySequence:
    """One history as fixed-size arrays.

    - ``tokens``: int64 ``[max_tokens]``, left-aligned: the events oldest first in ``tokens[:length]``, then PAD_ID.
    - ``soft_features``: float32 ``[max_tokens, F]`` in soft mode (the watch's vector at its <soft> token, zeros
      everywhere else); None in hard mode.
    - ``length``: tokens before the padding; ``num_watches``, ``num_searches``: events in the sequence.
    """
    tokens: np.ndarray
    soft_features: Optional[np.ndarray]
    length: int
    num_watches: int
    num_searches: int


def _watch_token_block(watches: Sequence[WatchEvent], layout: VocabularyLayout, config: SequenceConfig,
                       watch_features: Optional[Mapping[str, Any]]) -> np.ndarray:
    """int64 ``[n_watches, watch_token_count]``: every watch's tokens, built a column at a time."""
    n = len(watches)
    sid_len = config.sid_length(layout)
    for watch in watches:
        if len(watch.sid) != layout.sid_levels:
            raise ValueError(f"watch of {watch.video_id!r} has a {len(watch.sid)}-level SID; the layout has "
                             f"{layout.sid_levels} levels (SIDs from another SID model?)")
    conditions = np.array([vocabulary.condition_token(w.scenario) for w in watches], dtype=TOKEN_DTYPE)
    sids = np.array([w.sid for w in watches], dtype=TOKEN_DTYPE).reshape(n, layout.sid_levels)
    columns = [conditions[:, None], layout.sid_tokens(sids, sid_len)]
    if config.feature_mode == "hard" and n == 0:
        # A history of searches only: nothing to look up, whatever featurize returned for no watches.
        columns.append(np.zeros((0, len(layout.feature_names)), dtype=TOKEN_DTYPE))
    elif config.feature_mode == "hard":
        if watch_features is None:
            raise ValueError("hard feature mode needs watch_features (one bucket array per layout feature)")
        for name in layout.feature_names:
            if name not in watch_features:
                raise ValueError(f"watch_features has no {name!r}; the layout's features are "
                                 f"{list(layout.feature_names)}")
            buckets = np.asarray(watch_features[name])
            if buckets.shape != (n,):
                raise ValueError(f"watch_features[{name!r}] has shape {buckets.shape}; expected ({n},), one bucket "
                                 f"per history watch")
            if n and not np.issubdtype(buckets.dtype, np.integer):
                raise TypeError(f"watch_features[{name!r}] must hold integer buckets, got dtype {buckets.dtype}")
            columns.append(layout.feature_token(name, buckets.astype(TOKEN_DTYPE))[:, None])
    else:
        columns.append(np.full((n, 1), SOFT_ID, dtype=TOKEN_DTYPE))
    return np.concatenate(columns, axis=1)


def tokenize_history(history: Union[Timeline, Sequence[EventLike]], layout: VocabularyLayout,
                     config: SequenceConfig, watch_features: Optional[Mapping[str, Any]] = None,
                     soft_vectors: Optional[np.ndarray] = None) -> HistorySequence:
    """Tokens (and soft features) for history events in timeline order, usually ``select_history_events``' output.

    ``watch_features`` (hard mode): layout feature name -> integer bucket array ``[n_watches]``, aligned with the
    history's watches in order. ``soft_vectors`` (soft mode): float ``[n_watches, F]``, same alignment. Extra
    feature keys are ignored. If the events do not fit ``max_tokens`` whole oldest events are dropped (a no-op for
    ``select_history_events`` output, which already fits). Events the config excludes are an error, since the
    features would no longer line up.
    """
    events = list(history.events) if isinstance(history, Timeline) else [as_event(e) for e in history]
    for event in events:
        if not keeps_event(event, config):
            raise ValueError(f"{event!r} is excluded by the config (include_searches={config.include_searches}, "
                             f"scenarios={config.scenarios}); select events with select_history_events")
    watches = [e for e in events if isinstance(e, WatchEvent)]
    soft = config.feature_mode == "soft"
    if soft:
        if soft_vectors is None:
            raise ValueError("soft feature mode needs soft_vectors, one float row per history watch")
        soft_vectors = np.asarray(soft_vectors, dtype=np.float32)
        if soft_vectors.ndim != 2 or soft_vectors.shape[0] != len(watches):
            raise ValueError(f"soft_vectors has shape {soft_vectors.shape}; expected ({len(watches)}, F)")
        if not np.isfinite(soft_vectors).all():
            raise ValueError("soft_vectors holds NaN or infinite values")
    watch_block = _watch_token_block(watches, layout, config, watch_features)

    pieces_cap = config.max_pieces_per_query
    event_tokens: List[np.ndarray] = []
    watch_index: List[int] = []  # per event: its row in watch_block / soft_vectors, or -1 for a search
    watches_so_far = 0
    for event in events:
        if isinstance(event, WatchEvent):
            watch_index.append(watches_so_far)
            event_tokens.append(watch_block[watches_so_far])
            watches_so_far += 1
        else:
            watch_index.append(-1)
            pieces = np.asarray(event.pieces[:pieces_cap], dtype=TOKEN_DTYPE)
            event_tokens.append(np.concatenate([[SEARCH_ID], layout.query_piece_token(pieces)]).astype(TOKEN_DTYPE))

    # Keep the longest suffix of whole events within the budget.
    first, total = len(events), 0
    while first > 0 and total + len(event_tokens[first - 1]) <= config.max_tokens:
        first -= 1
        total += len(event_tokens[first])

    tokens = np.full(config.max_tokens, PAD_ID, dtype=TOKEN_DTYPE)
    soft_features = np.zeros((config.max_tokens, soft_vectors.shape[1]), dtype=np.float32) if soft else None
    position = num_watches = 0
    soft_offset = 1 + config.sid_length(layout)  # <cond> sid_0 .. sid_{L-1} <soft>
    for event_index in range(first, len(events)):
        piece = event_tokens[event_index]
        tokens[position:position + len(piece)] = piece
        if watch_index[event_index] >= 0:
            num_watches += 1
            if soft:
                soft_features[position + soft_offset] = soft_vectors[watch_index[event_index]]
        position += len(piece)
    return HistorySequence(tokens=tokens, soft_features=soft_features, length=position, num_watches=num_watches,
                           num_searches=len(events) - first - num_watches)


# What the pipeline passes to featurize the selected history watches: (watches, their gaps in seconds) ->
# {layout feature name: int bucket array [n]} in hard mode, or a float array [n, F] in soft mode. It must accept
# n = 0 (a history of searches only) and, in soft mode, still return shape (0, F).
Featurize = Callable[[List[WatchEvent], np.ndarray], Union[Mapping[str, np.ndarray], np.ndarray]]


def build_history(timeline: Timeline, cutoff_ts_us: int, layout: VocabularyLayout, config: SequenceConfig,
                  featurize: Featurize) -> HistorySequence:
    """select_history_events -> featurize -> tokenize_history: one history, for training or serving.

    Serving builds the history at the end of the day (``cutoff_ts_us = day_end_us``), training at each cutoff.
    """
    return featurize_and_tokenize(select_history_events(timeline, cutoff_ts_us, layout, config), layout, config,
                                  featurize)


def featurize_and_tokenize(selected: Timeline, layout: VocabularyLayout, config: SequenceConfig,
                           featurize: Featurize) -> HistorySequence:
    """featurize the selected history's watches, then tokenize_history, checking featurize returned the right kind."""
    features = featurize(selected.watches, selected.watch_gaps_s())
    if config.feature_mode == "hard":
        if not isinstance(features, Mapping):
            raise TypeError(f"in hard feature mode featurize must return a mapping of bucket arrays, got "
                            f"{type(features).__name__}")
        return tokenize_history(selected, layout, config, watch_features=features)
    if isinstance(features, Mapping):
        raise TypeError("in soft feature mode featurize must return a float array [n_watches, F], got a mapping")
    return tokenize_history(selected, layout, config, soft_vectors=features)


# ---------------------------------------------------------------------------------------------------------------
# Cutoffs.
# ---------------------------------------------------------------------------------------------------------------
def session_starts(events: Sequence[EventLike], day_start_us: int, day_end_us: int,
                   session_gap_s: float) -> List[int]:
    """Distinct timestamps in ``[day_start_us, day_end_us)`` at which a session starts, ascending.

    A session starts at the first event of the day, and at any event that follows the previous event of
    ``events`` (earlier days included) by at least ``session_gap_s``.
    """
    timestamps = sorted(as_event(e).event_ts_us for e in events)
    gap_us = round(session_gap_s * SECOND_US)
    starts: List[int] = []
    previous_ts: Optional[int] = None
    for ts in timestamps:
        if day_start_us <= ts < day_end_us:
            first_of_day = previous_ts is None or previous_ts < day_start_us
            if first_of_day or ts - previous_ts >= gap_us:
                starts.append(ts)  # distinct: an event at the same time as the previous one has a gap of 0
        previous_ts = ts
    return starts


def choose_cutoffs(events: Sequence[EventLike], day_start_us: int, day_end_us: int, config: SequenceConfig,
                   seed: int, user_id: str) -> List[int]:
    """The training cutoffs of one user's day, ascending: session starts (``session_starts``) inside
    ``[day_start_us, day_end_us)``.

    With more than ``max_cutoffs_per_day`` candidates, the ones with the smallest
    ``keyed_hash64("cutoff", seed, user_id, ts)`` are kept, so the choice depends on nothing but those values.
    ``events`` should be the config-filtered timeline (``build_timeline(..., config).events``): excluded events
    (searches in the no-search ablation, other scenarios) must not start sessions. Some cutoffs yield no example;
    see ``make_user_examples``.
    """
    candidates = session_starts(events, day_start_us, day_end_us, config.session_gap_s)
    if len(candidates) > config.max_cutoffs_per_day:
        candidates = sorted(sorted(candidates, key=lambda ts: (keyed_hash64("cutoff", seed, user_id, ts), ts))
                            [:config.max_cutoffs_per_day])
    return candidates


# ---------------------------------------------------------------------------------------------------------------
# Examples for one user and day.
# ---------------------------------------------------------------------------------------------------------------
def make_user_examples(user_id: str, watches: Sequence[WatchLike], searches: Sequence[SearchLike],
                       day_start_us: int, day_end_us: int, layout: VocabularyLayout, config: SequenceConfig,
                       seed: int, featurize: Featurize) -> List[Dict[str, Any]]:
    """The training examples of one user for the day ``[day_start_us, day_end_us)``, in cutoff order.

    ``watches`` / ``searches``: all of the user's events the pipeline has: earlier days (history) and at least
    ``window_s`` past the day's end (targets of late cutoffs; a window that runs past the data gets fewer targets).

    For each cutoff of ``choose_cutoffs``: the history is ``build_history`` at the cutoff and the targets are
    ``targets.build_targets``. A cutoff yields NO example when its history is empty (no kept event before it) or
    when it has no target (no positive-reward watch in its window); ``featurize`` is not called for those.

    Each example is a plain dict:
      user_id            str
      cutoff_ts_us       int
      tokens             int64 [max_tokens], left-aligned, PAD_ID-padded
      soft_features      float32 [max_tokens, F] (soft mode only)
      length, num_watches, num_searches   int
      targets            int64 [max_targets, 1 + L], PAD_ID rows after num_targets
      num_targets        int
      target_scenarios   list of num_targets scenario names, row order
      target_video_ids   list of num_targets video ids, row order
    """
    timeline = build_timeline(watches, searches, config)
    examples: List[Dict[str, Any]] = []
    for cutoff_ts_us in choose_cutoffs(timeline.events, day_start_us, day_end_us, config, seed, user_id):
        selected = select_history_events(timeline, cutoff_ts_us, layout, config)
        if not selected.events:
            continue
        look_ahead = target_lib.build_targets(timeline.watches, cutoff_ts_us, layout, config, seed, user_id)
        if look_ahead.num_targets == 0:
            continue
        history = featurize_and_tokenize(selected, layout, config, featurize)
        example: Dict[str, Any] = {
            "user_id": user_id,
            "cutoff_ts_us": cutoff_ts_us,
            "tokens": history.tokens,
            "length": history.length,
            "num_watches": history.num_watches,
            "num_searches": history.num_searches,
            "targets": look_ahead.tokens,
            "num_targets": look_ahead.num_targets,
            "target_scenarios": list(look_ahead.scenarios),
            "target_video_ids": [w.video_id for w in look_ahead.watches],
        }
        if history.soft_features is not None:
            example["soft_features"] = history.soft_features
        examples.append(example)
    return examples
