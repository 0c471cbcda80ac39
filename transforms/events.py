"""The event types and configuration shared by ``transforms.sequences`` (histories) and ``transforms.targets``.

Both build on these, and ``sequences.make_user_examples`` uses ``targets``: keeping the shared part here makes the
imports one-way (events <- targets <- sequences). ``sequences`` re-exports every name, so older imports keep working.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import numpy as np

from tokenminds_model.vocabulary import VocabularyLayout
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


# ---------------------------------------------------------------------------------------------------------------
# Raw watch features (the columns the tensorflow-transform preprocessing buckets).
# ---------------------------------------------------------------------------------------------------------------
def watch_ratio(watch: WatchLike) -> float:
    """``watch_time_s / video_duration_s`` clipped to [0, MAX_WATCH_RATIO] (the duration is always positive)."""
    watch = as_watch_event(watch)
    return min(max(watch.watch_time_s / watch.video_duration_s, 0.0), MAX_WATCH_RATIO)


# ---------------------------------------------------------------------------------------------------------------
# Keyed hashing (never Python's salted hash() or global random state).
# ---------------------------------------------------------------------------------------------------------------
def _hash_field(field: Union[str, int]) -> bytes:
    kind = type(field)
    if kind is str:  # the common cases first, without the isinstance chain
        data = field.encode("utf-8")
        return b"s" + len(data).to_bytes(8, "big") + data
    if kind is int:
        data = str(field).encode("ascii")
        return b"i" + len(data).to_bytes(8, "big") + data
    if isinstance(field, str):
        tag, data = b"s", field.encode("utf-8")
    elif isinstance(field, (int, np.integer)) and not isinstance(field, (bool, np.bool_)):
        tag, data = b"i", str(int(field)).encode("ascii")
    else:
        raise TypeError(f"keyed_hash64 fields must be str or int, got {type(field).__name__} {field!r}")
    return tag + len(data).to_bytes(8, "big") + data


def keyed_hash64(*fields: Union[str, int]) -> int:
    """A 64-bit integer that depends only on ``fields`` (str or int), the same on every machine and process.

    Each field is type-tagged and length-prefixed, so ("ab", "c") and ("a", "bc"), or 1 and "1", hash differently.
    """
    digest = hashlib.blake2b(digest_size=8)
    for field in fields:
        digest.update(_hash_field(field))
    return int.from_bytes(digest.digest(), "big")


def keyed_hasher(*prefix: Union[str, int]) -> Callable[..., int]:
    """``hash64(*rest) == keyed_hash64(*prefix, *rest)``, with the prefix hashed once (many keys, one prefix)."""
    base = hashlib.blake2b(digest_size=8)
    for field in prefix:
        base.update(_hash_field(field))

    def hash64(*fields: Union[str, int]) -> int:
        digest = base.copy()
        digest.update(b"".join([_hash_field(field) for field in fields]))
        return int.from_bytes(digest.digest(), "big")

    return hash64


def uniform_from_hash(hash64: int) -> float:
    """A float in (0, 1] from a 64-bit hash: its top 53 bits, exactly representable, never 0 (so log() is finite)."""
    return ((hash64 >> 11) + 1) / float(1 << 53)
