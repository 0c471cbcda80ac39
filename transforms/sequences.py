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
import hashlib
import math
import operator
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tokenminds_model import vocabulary
from tokenminds_model.vocabulary import PAD_ID, SEARCH_ID, SOFT_ID, TOKEN_DTYPE, VocabularyLayout
from transforms import schemas

SECOND_US = 1_000_000

# The time gap of an event with no earlier event in its timeline. Negative, so it can never be mistaken for a real
# gap (those are >= 0; 0 means "at the same microsecond"). The tft preprocessing should give it its own bucket.
FIRST_EVENT_GAP_S = -1.0

# Watch-ratio values are clipped to this range: replays can exceed 1, a logging glitch must not exceed 2.
MAX_WATCH_RATIO = 2.0

FEATURE_MODES = ("hard", "soft")
TARGET_MODES = ("lookahead", "next")

# Raw (un-bucketed) per-watch feature columns, as ``raw_watch_features`` returns them and the tensorflow-transform
# preprocessing consumes them. The transform's outputs are named by the layout's feature names; this map says which
# raw column each layout feature is bucketed from.
RAW_WATCH_FEATURE_COLUMNS = ("watch_ratio", "watch_time_s", "surface", "device", "liked", "disliked", "time_gap_s")
RAW_COLUMN_FOR_FEATURE: Dict[str, str] = {
    "watch_ratio": "watch_ratio",
    "watch_time": "watch_time_s",
    "surface": "surface",
    "device": "device",
    "liked": "liked",
    "disliked": "disliked",
    "time_gap": "time_gap_s",
}
# Numeric raw columns are float32 (what tensorflow-transform analyzers expect), flags int64 0/1, categories str.
RAW_NUMERIC_COLUMNS = ("watch_ratio", "watch_time_s", "time_gap_s")
RAW_FLAG_COLUMNS = ("liked", "disliked")
RAW_CATEGORICAL_COLUMNS = ("surface", "device")

# Default engagement-reward parameters (see RewardConfig).
DEFAULT_MIN_WATCH_RATIO = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------------------------
def _int_at_least(value: Any, minimum: int, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _finite_number(value: Any, what: str, minimum: float = 0.0, strictly: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strictly and value == minimum):
        raise ValueError(f"{what} must be a finite number {'>' if strictly else '>='} {minimum}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How engaged a watch was; only watches with a positive reward can be targets.

    ``reward = ratio_weight * min(watch_ratio, ratio_cap) + like_weight * liked - dislike_weight * disliked``,
    clipped at 0, and exactly 0 when ``watch_ratio < min_watch_ratio`` (a skip says nothing about interest) or, with
    ``disliked_is_zero`` (the default), when the watch was disliked. ``watch_ratio`` is ``watch_ratio(watch)``.

    Defined here, next to ``SequenceConfig`` which holds one; ``transforms.targets`` re-exports it.
    """
    ratio_weight: float = 1.0
    ratio_cap: float = 1.0  # a replayed video (ratio > 1) is not worth more than one full watch
    like_weight: float = 0.5
    dislike_weight: float = 1.0  # only matters with disliked_is_zero=False
    min_watch_ratio: float = DEFAULT_MIN_WATCH_RATIO
    disliked_is_zero: bool = True

    def __post_init__(self) -> None:
        for name in ("ratio_weight", "like_weight", "dislike_weight", "min_watch_ratio"):
            object.__setattr__(self, name, _finite_number(getattr(self, name), name))
        object.__setattr__(self, "ratio_cap", _finite_number(self.ratio_cap, "ratio_cap", strictly=True))
        if not isinstance(self.disliked_is_zero, bool):
            raise TypeError(f"disliked_is_zero must be a bool, got {self.disliked_is_zero!r}")


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
    """Everything that decides how a user's events become an example. Frozen and hashable (Beam ships it).

    History:
      prefix_len          SID levels per watch (L); must be < the layout's sid_levels unless full_depth_sids
      full_depth_sids     ablation: L = layout.sid_levels (every RQ level)
      max_tokens          sequence length; whole oldest events are dropped to fit
      max_watches         at most this many (most recent) watches in a history
      max_searches        at most this many (most recent) searches in a history; older ones are dropped
      max_pieces_per_query  query pieces kept per search (the first ones)
      feature_mode        "hard": one bucket token per feature; "soft": one <soft> token + a float vector
      include_searches    ablation: False drops every search (no <Search> token anywhere, no search cutoffs)
      scenarios           ablation: watches of other scenarios are dropped from history, targets and cutoffs
    Targets:
      max_targets         K, rows of the target array
      target_mode         "lookahead": up to K reward-weighted samples from the look-ahead window;
                          "next": the first positive-reward watch in the window
      window_s            look-ahead window length: targets lie in [cutoff, cutoff + window_s)
      reward              RewardConfig
    Cutoffs:
      max_cutoffs_per_day at most this many examples per user and day
      session_gap_s       an event after a gap of at least this long starts a session (a cutoff candidate)
    """
    prefix_len: int = 2
    full_depth_sids: bool = False
    max_tokens: int = 1024
    max_watches: int = 1200
    max_searches: int = 50
    max_pieces_per_query: int = 8
    feature_mode: str = "hard"
    include_searches: bool = True
    scenarios: Tuple[str, ...] = schemas.SCENARIOS
    max_targets: int = 8
    target_mode: str = "lookahead"
    window_s: float = 86400
    reward: RewardConfig = RewardConfig()
    max_cutoffs_per_day: int = 4
    session_gap_s: float = 1800

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix_len", _int_at_least(self.prefix_len, 1, "prefix_len"))
        object.__setattr__(self, "max_tokens", _int_at_least(self.max_tokens, 1, "max_tokens"))
        object.__setattr__(self, "max_watches", _int_at_least(self.max_watches, 0, "max_watches"))
        object.__setattr__(self, "max_searches", _int_at_least(self.max_searches, 0, "max_searches"))
        object.__setattr__(self, "max_pieces_per_query",
                           _int_at_least(self.max_pieces_per_query, 0, "max_pieces_per_query"))
        object.__setattr__(self, "max_targets", _int_at_least(self.max_targets, 1, "max_targets"))
        object.__setattr__(self, "max_cutoffs_per_day",
                           _int_at_least(self.max_cutoffs_per_day, 1, "max_cutoffs_per_day"))
        object.__setattr__(self, "window_s", _finite_number(self.window_s, "window_s", strictly=True))
        object.__setattr__(self, "session_gap_s", _finite_number(self.session_gap_s, "session_gap_s"))
        for name in ("full_depth_sids", "include_searches"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.feature_mode not in FEATURE_MODES:
            raise ValueError(f"feature_mode must be one of {FEATURE_MODES}, got {self.feature_mode!r}")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {self.target_mode!r}")
        if isinstance(self.scenarios, str):
            raise TypeError(f"scenarios must be a sequence of scenario names, got the string {self.scenarios!r}")
        scenarios = tuple(self.scenarios)
        if not scenarios or len(set(scenarios)) != len(scenarios) or not set(scenarios) <= set(schemas.SCENARIOS):
            raise ValueError(f"scenarios must be distinct values from {schemas.SCENARIOS}, got {scenarios!r}")
        object.__setattr__(self, "scenarios", scenarios)
        if not isinstance(self.reward, RewardConfig):
            raise TypeError(f"reward must be a RewardConfig, got {type(self.reward).__name__}")

    @property
    def window_us(self) -> int:
        return round(self.window_s * SECOND_US)

    @property
    def session_gap_us(self) -> int:
        return round(self.session_gap_s * SECOND_US)

    def sid_length(self, layout: VocabularyLayout) -> int:
        """L, the SID tokens per watch (history and targets): prefix_len, or every level with full_depth_sids."""
        if self.full_depth_sids:
            return layout.sid_levels
        if self.prefix_len >= layout.sid_levels:
            raise ValueError(f"prefix_len {self.prefix_len} must be < the layout's sid_levels {layout.sid_levels}; "
                             f"set full_depth_sids=True to use every level")
        return self.prefix_len

    def watch_token_count(self, layout: VocabularyLayout) -> int:
        """Tokens per watch: condition + L SID tokens + F feature tokens (hard) or one <soft> token (soft)."""
        features = len(layout.feature_names) if self.feature_mode == "hard" else 1
        return 1 + self.sid_length(layout) + features

    def search_token_count(self, num_pieces: int) -> int:
        """Tokens for a search with ``num_pieces`` pieces: <Search> + the first max_pieces_per_query pieces."""
        return 1 + min(num_pieces, self.max_pieces_per_query)


# ---------------------------------------------------------------------------------------------------------------
# Events.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One watch, as stored in a user-history snapshot. ``sid`` holds the full-depth SID codes, level 0 first."""
    video_id: str
    scenario: str
    event_ts_us: int
    watch_time_s: float
    video_duration_s: float
    surface: str
    device: str
    liked: bool
    disliked: bool
    sid: Tuple[int, ...]

    @property
    def identity(self) -> Tuple[str, int]:
        """What names this event for keyed hashing: (video_id, event_ts_us)."""
        return self.video_id, self.event_ts_us


@dataclasses.dataclass(frozen=True)
class SearchEvent:
    """One search: the raw query (for tie-breaks and debugging) and its SentencePiece piece ids."""
    event_ts_us: int
    query: str
    pieces: Tuple[int, ...]


Event = Union[WatchEvent, SearchEvent]
WatchLike = Union[WatchEvent, Mapping[str, Any]]
SearchLike = Union[SearchEvent, Mapping[str, Any]]
EventLike = Union[Event, Mapping[str, Any]]

_WATCH_DEFAULTS = schemas.OPTIONAL_DEFAULTS[schemas.WATCH_EVENTS]  # surface, device, liked, disliked


def _required(record: Mapping[str, Any], name: str, what: str) -> Any:
    value = record.get(name)
    if value is None:
        raise ValueError(f"{what} record has no {name!r}: {dict(record)!r}")
    return value


def _int_codes(values: Any, what: str) -> Tuple[int, ...]:
    try:
        return tuple(_int_at_least(v, 0, what) for v in values)
    except TypeError as error:
        raise TypeError(f"{what} must be a list of integers: {error}") from None


def as_watch_event(record: WatchLike) -> WatchEvent:
    """A snapshot watch dict (or a WatchEvent, returned as is) as a validated WatchEvent.

    Missing or None ``surface``/``device``/``liked``/``disliked`` take the contract's defaults; the other fields
    are required. Times and durations must be finite, the duration positive (as validation guarantees upstream).
    """
    if isinstance(record, WatchEvent):
        return record
    if not isinstance(record, Mapping):
        raise TypeError(f"a watch must be a WatchEvent or a mapping, got {type(record).__name__}")
    scenario = _required(record, "scenario", "watch")
    if scenario not in schemas.SCENARIOS:
        raise ValueError(f"watch scenario {scenario!r} is not one of {schemas.SCENARIOS}")
    sid = _int_codes(_required(record, "sid", "watch"), "sid")
    if not sid:
        raise ValueError(f"watch of {record.get('video_id')!r} has an empty sid")

    def optional(name: str) -> Any:
        value = record.get(name)
        return _WATCH_DEFAULTS[name] if value is None else value

    return WatchEvent(
        video_id=str(_required(record, "video_id", "watch")),
        scenario=scenario,
        event_ts_us=_int_at_least(_required(record, "event_ts_us", "watch"), -2**63, "event_ts_us"),
        watch_time_s=_finite_number(_required(record, "watch_time_s", "watch"), "watch_time_s"),
        video_duration_s=_finite_number(_required(record, "video_duration_s", "watch"), "video_duration_s",
                                        strictly=True),
        surface=str(optional("surface")),
        device=str(optional("device")),
        liked=bool(optional("liked")),
        disliked=bool(optional("disliked")),
        sid=sid,
    )


def as_search_event(record: SearchLike) -> SearchEvent:
    """A search dict {"event_ts_us", "query", "pieces"} (or a SearchEvent, returned as is) as a SearchEvent."""
    if isinstance(record, SearchEvent):
        return record
    if not isinstance(record, Mapping):
        raise TypeError(f"a search must be a SearchEvent or a mapping, got {type(record).__name__}")
    query = record.get("query")
    return SearchEvent(
        event_ts_us=_int_at_least(_required(record, "event_ts_us", "search"), -2**63, "event_ts_us"),
        query="" if query is None else str(query),
        pieces=_int_codes(_required(record, "pieces", "search"), "pieces"),
    )


def as_event(record: EventLike) -> Event:
    """A watch or search in either shape; a dict with a ``video_id`` is a watch, any other dict a search."""
    if isinstance(record, (WatchEvent, SearchEvent)):
        return record
    if isinstance(record, Mapping) and "video_id" in record:
        return as_watch_event(record)
    return as_search_event(record)


def event_sort_key(event: Event) -> Tuple:
    """The total order of a user's timeline. Independent of input order, and the same on every machine.

    By ``event_ts_us``; at equal timestamps searches come before watches (a search leads to the watches it
    returns), then watches by scenario in ``schemas.SCENARIOS`` order (LFV, SFV) and by ``video_id``, searches by
    ``query``. The remaining fields only order exact-timestamp duplicates that differ elsewhere, so that even those
    never depend on input order.
    """
    if isinstance(event, SearchEvent):
        return event.event_ts_us, 0, 0, event.query, event.pieces
    return (event.event_ts_us, 1, schemas.SCENARIOS.index(event.scenario), event.video_id, event.watch_time_s,
            event.video_duration_s, event.surface, event.device, event.liked, event.disliked, event.sid)


def keeps_event(event: Event, config: SequenceConfig) -> bool:
    """False for what the config's ablations exclude: searches (include_searches=False), other scenarios."""
    if isinstance(event, SearchEvent):
        return config.include_searches
    return event.scenario in config.scenarios


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


# ---------------------------------------------------------------------------------------------------------------
# Raw watch features (the columns the tensorflow-transform preprocessing buckets).
# ---------------------------------------------------------------------------------------------------------------
def watch_ratio(watch: WatchLike) -> float:
    """``watch_time_s / video_duration_s`` clipped to [0, MAX_WATCH_RATIO] (the duration is always positive)."""
    watch = as_watch_event(watch)
    return min(max(watch.watch_time_s / watch.video_duration_s, 0.0), MAX_WATCH_RATIO)


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
# Keyed hashing (never Python's salted hash() or global random state).
# ---------------------------------------------------------------------------------------------------------------
def keyed_hash64(*fields: Union[str, int]) -> int:
    """A 64-bit integer that depends only on ``fields`` (str or int), the same on every machine and process.

    Each field is type-tagged and length-prefixed, so ("ab", "c") and ("a", "bc"), or 1 and "1", hash differently.
    """
    digest = hashlib.blake2b(digest_size=8)
    for field in fields:
        if isinstance(field, str):
            tag, data = b"s", field.encode("utf-8")
        elif isinstance(field, (int, np.integer)) and not isinstance(field, (bool, np.bool_)):
            tag, data = b"i", str(int(field)).encode("ascii")
        else:
            raise TypeError(f"keyed_hash64 fields must be str or int, got {type(field).__name__} {field!r}")
        digest.update(tag + len(data).to_bytes(8, "big") + data)
    return int.from_bytes(digest.digest(), "big")


def uniform_from_hash(hash64: int) -> float:
    """A float in (0, 1] from a 64-bit hash: its top 53 bits, exactly representable, never 0 (so log() is finite)."""
    return ((hash64 >> 11) + 1) / float(1 << 53)


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
    from transforms import targets as target_lib  # targets builds on this module, so it is imported here

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
