"""Look-ahead targets: which of a user's next-day watches a history at a cutoff should predict.

For a cutoff t the candidates are the user's watches in the look-ahead window ``[t, t + window_s)`` (an event at
exactly t is a candidate and is never in the history, which is strictly before t; one at exactly t + window_s is
outside). Each watch has an engagement ``reward`` (``RewardConfig``); zero-reward watches (skips, dislikes) are
never targets.

``target_mode="lookahead"`` draws up to K distinct videos without replacement, each draw proportional to reward
(Efraimidis–Spirakis, with exponential keys ``-log(u) / reward``: the K smallest keys are a weighted sample without
replacement, in draw order). ``u`` comes from ``blake2b`` of (seed, user_id, cutoff, video_id, event_ts_us), so a
sample depends on nothing but those values: the same on every run, runner and worker. The draw is over the union of
both scenarios, so a user active in both gets targets from both in proportion to their rewards.

``target_mode="next"``: the single earliest positive-reward watch in the window. A zero-reward "next watch" (a skip)
is passed over rather than taken, so that no mode ever trains toward content the user rejected; without any
positive-reward watch in the window there is no target.

Each target row is ``[condition_token(scenario)] + layout.sid_tokens(sid, L)`` with the history's L
(``config.sid_length(layout)``); the K rows are padded with PAD_ID rows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tokenminds_model import vocabulary
from tokenminds_model.vocabulary import PAD_ID, TOKEN_DTYPE, VocabularyLayout
from transforms.events import (SECOND_US, RewardConfig, SequenceConfig, WatchEvent, WatchLike, as_watch_event,
                                  event_sort_key, keyed_hash64, uniform_from_hash, watch_ratio)

__all__ = ["RewardConfig", "reward", "look_ahead_window", "target_uniform", "sample_targets", "next_watch_target",
           "encode_targets", "LookAheadTargets", "build_targets"]


def reward(watch: WatchLike, config: RewardConfig = RewardConfig()) -> float:
    """The engagement reward of one watch (>= 0); see ``RewardConfig`` for the formula."""
    watch = as_watch_event(watch)
    ratio = watch_ratio(watch)
    if ratio < config.min_watch_ratio or (watch.disliked and config.disliked_is_zero):
        return 0.0
    value = (config.ratio_weight * min(ratio, config.ratio_cap) + config.like_weight * watch.liked
             - config.dislike_weight * watch.disliked)
    return max(0.0, value)


def look_ahead_window(watches: Sequence[WatchLike], cutoff_ts_us: int, window_s: float) -> List[WatchEvent]:
    """The watches with ``cutoff_ts_us <= event_ts_us < cutoff_ts_us + window_s``, in timeline order."""
    end_ts_us = cutoff_ts_us + round(window_s * SECOND_US)
    window = [w for w in map(as_watch_event, watches) if cutoff_ts_us <= w.event_ts_us < end_ts_us]
    return sorted(window, key=event_sort_key)


def target_uniform(seed: int, user_id: str, cutoff_ts_us: int, watch: WatchEvent) -> float:
    """The watch's uniform draw in (0, 1] for this (seed, user, cutoff): a keyed blake2b hash, never random state."""
    return uniform_from_hash(keyed_hash64("target", seed, user_id, cutoff_ts_us, *watch.identity))


def _best_watch_per_video(watches: Sequence[WatchEvent], rewards: Sequence[float]
                          ) -> List[Tuple[WatchEvent, float]]:
    """One (watch, reward) per video: its highest-reward watch, the earliest on ties. Timeline order.

    A rewatched video is one candidate, not several: a target set is a set of videos, and duplicate rows would
    spend target slots on the same SID.
    """
    best: Dict[str, Tuple[WatchEvent, float]] = {}
    for watch, value in sorted(zip(watches, rewards), key=lambda pair: event_sort_key(pair[0])):
        if watch.video_id not in best or value > best[watch.video_id][1]:
            best[watch.video_id] = (watch, value)
    return sorted(best.values(), key=lambda pair: event_sort_key(pair[0]))


def sample_targets(window_watches: Sequence[WatchLike], k: int, seed: int, user_id: str, cutoff_ts_us: int,
                   reward_config: RewardConfig = RewardConfig()) -> List[WatchEvent]:
    """Up to ``k`` watches of distinct videos drawn without replacement, each draw proportional to reward.

    Candidates are the positive-reward watches (one per video, ``_best_watch_per_video``). Each gets the key
    ``-log(target_uniform(...)) / reward``; the ``k`` smallest keys win (ties, which need equal 53-bit hashes, by
    timeline order). The result is in draw order: its first watch alone is a single reward-proportional draw,
    and any prefix is a valid smaller sample.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    watches = [as_watch_event(w) for w in window_watches]
    rewards = [reward(w, reward_config) for w in watches]
    candidates = [(w, r) for w, r in _best_watch_per_video(watches, rewards) if r > 0.0]
    keyed = [(-math.log(target_uniform(seed, user_id, cutoff_ts_us, w)) / r, event_sort_key(w), w)
             for w, r in candidates]
    keyed.sort(key=lambda item: item[:2])
    return [w for _, _, w in keyed[:int(k)]]


def next_watch_target(window_watches: Sequence[WatchLike],
                      reward_config: RewardConfig = RewardConfig()) -> Optional[WatchEvent]:
    """The earliest (timeline order) positive-reward watch of the window, or None."""
    for watch in sorted(map(as_watch_event, window_watches), key=event_sort_key):
        if reward(watch, reward_config) > 0.0:
            return watch
    return None


def encode_targets(target_watches: Sequence[WatchLike], layout: VocabularyLayout, sid_len: int,
                   max_targets: int) -> np.ndarray:
    """int64 ``[max_targets, 1 + sid_len]``: a row ``[condition_token(scenario), sid_0 .. sid_{sid_len-1}]`` per
    target, in order, then PAD_ID rows."""
    watches = [as_watch_event(w) for w in target_watches]
    if len(watches) > max_targets:
        raise ValueError(f"{len(watches)} targets do not fit max_targets={max_targets}")
    rows = np.full((max_targets, 1 + sid_len), PAD_ID, dtype=TOKEN_DTYPE)
    for row, watch in enumerate(watches):
        if len(watch.sid) != layout.sid_levels:
            raise ValueError(f"watch of {watch.video_id!r} has a {len(watch.sid)}-level SID; the layout has "
                             f"{layout.sid_levels} levels (SIDs from another SID model?)")
        rows[row, 0] = vocabulary.condition_token(watch.scenario)
        rows[row, 1:] = layout.sid_tokens(list(watch.sid), sid_len)
    return rows


@dataclasses.dataclass(frozen=True, eq=False)
class LookAheadTargets:
    """The targets of one cutoff.

    - ``tokens``: int64 ``[max_targets, 1 + L]``, one row per target (``encode_targets``), PAD_ID rows after
      ``num_targets``. The shape depends only on the config, not on target_mode.
    - ``watches``: the target watches, row order (draw order for "lookahead").
    """
    tokens: np.ndarray
    watches: Tuple[WatchEvent, ...]

    @property
    def num_targets(self) -> int:
        return len(self.watches)

    @property
    def scenarios(self) -> Tuple[str, ...]:
        return tuple(w.scenario for w in self.watches)


def build_targets(watches: Sequence[WatchLike], cutoff_ts_us: int, layout: VocabularyLayout,
                  config: SequenceConfig, seed: int, user_id: str) -> LookAheadTargets:
    """The targets of the history at ``cutoff_ts_us``: ``config.target_mode`` applied to the look-ahead window's
    watches of ``config.scenarios``. ``watches`` may be all of the user's watches; the window picks its own."""
    window = [w for w in look_ahead_window(watches, cutoff_ts_us, config.window_s) if w.scenario in config.scenarios]
    if config.target_mode == "next":
        chosen = next_watch_target(window, config.reward)
        picked = [] if chosen is None else [chosen]
    else:
        picked = sample_targets(window, config.max_targets, seed, user_id, cutoff_ts_us, config.reward)
    return LookAheadTargets(tokens=encode_targets(picked, layout, config.sid_length(layout), config.max_targets),
                            watches=tuple(picked))
