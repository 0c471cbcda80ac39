"""transforms.targets: rewards, the look-ahead window, the keyed weighted sampler and the encoded target rows."""
import collections
import math

import numpy as np
import pytest

from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SFV_ID, VocabularyLayout
from transforms import sequences as seq
from transforms import targets as tg
from transforms.sequences import RewardConfig, SequenceConfig

S = 1_000_000
HOUR = 3600 * S
DAY = 24 * HOUR
D0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
LAYOUT = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=20)


def watch(video_id, ts, scenario="LFV", sid=(1, 2, 3), watch_time_s=30.0, video_duration_s=60.0, liked=False,
          disliked=False):
    return dict(video_id=video_id, scenario=scenario, event_ts_us=ts, watch_time_s=watch_time_s,
                video_duration_s=video_duration_s, surface="home", device="IOS", liked=liked, disliked=disliked,
                sid=list(sid))


def ratio_watch(video_id, ratio, ts=D0, **kwargs):
    return watch(video_id, ts, watch_time_s=100.0 * ratio, video_duration_s=100.0, **kwargs)


def ids(watches):
    return [w.video_id for w in watches]


# ---------------------------------------------------------------------------------------------------------------
# Reward.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("record, config, expected", [
    (ratio_watch("v", 0.5), RewardConfig(), 0.5),
    (ratio_watch("v", 0.5, liked=True), RewardConfig(), 1.0),
    (ratio_watch("v", 1.7), RewardConfig(), 1.0),  # capped at ratio_cap
    (ratio_watch("v", 1.7), RewardConfig(ratio_cap=1.5), 1.5),
    (ratio_watch("v", 3.0), RewardConfig(ratio_cap=5.0), 2.0),  # watch_ratio itself is clipped to 2
    (ratio_watch("v", 0.1), RewardConfig(), 0.1),  # exactly min_watch_ratio: kept
    (ratio_watch("v", 0.09), RewardConfig(), 0.0),  # below: a skip
    (ratio_watch("v", 0.09, liked=True), RewardConfig(), 0.0),  # a like does not rescue a skip
    (ratio_watch("v", 0.9, disliked=True), RewardConfig(), 0.0),
    (ratio_watch("v", 0.9, disliked=True, liked=True), RewardConfig(), 0.0),
    (ratio_watch("v", 0.9, disliked=True), RewardConfig(disliked_is_zero=False, dislike_weight=0.5), 0.4),
    (ratio_watch("v", 0.3, disliked=True), RewardConfig(disliked_is_zero=False), 0.0),  # clipped at 0
    (ratio_watch("v", 0.5, liked=True), RewardConfig(ratio_weight=2.0, like_weight=0.25), 1.25),
    (ratio_watch("v", 0.0), RewardConfig(min_watch_ratio=0.0), 0.0),
])
def test_reward(record, config, expected):
    assert tg.reward(record, config) == pytest.approx(expected)


def test_reward_config_validation():
    assert RewardConfig() == RewardConfig(1.0, 1.0, 0.5, 1.0, 0.1, True)
    with pytest.raises(ValueError, match="like_weight"):
        RewardConfig(like_weight=-1)
    with pytest.raises(ValueError, match="ratio_cap"):
        RewardConfig(ratio_cap=0)
    with pytest.raises(TypeError, match="disliked_is_zero"):
        RewardConfig(disliked_is_zero="yes")
    assert tg.RewardConfig is seq.RewardConfig


# ---------------------------------------------------------------------------------------------------------------
# Look-ahead window.
# ---------------------------------------------------------------------------------------------------------------
def test_window_boundaries():
    cutoff = D0 + 8 * HOUR
    watches = [watch("before", cutoff - 1), watch("at_cutoff", cutoff), watch("last_inside", cutoff + DAY - 1),
               watch("at_end", cutoff + DAY), watch("after", cutoff + DAY + 1)]
    assert ids(tg.look_ahead_window(watches, cutoff, 86400)) == ["at_cutoff", "last_inside"]
    assert ids(tg.look_ahead_window(watches, cutoff, 3600)) == ["at_cutoff"]
    # The event at the cutoff is in the window and not in the history; the one just before is the reverse.
    config = SequenceConfig(feature_mode="soft")
    history = seq.select_history_events(seq.build_timeline(watches, [], config), cutoff, LAYOUT, config)
    assert ids(history.watches) == ["before"]
    built = tg.build_targets(watches, cutoff, LAYOUT, SequenceConfig(), 0, "u")
    assert sorted(ids(built.watches)) == ["at_cutoff", "last_inside"]


def test_window_is_in_timeline_order_whatever_the_input_order():
    watches = [watch("b", D0 + 5, "SFV"), watch("c", D0 + 1), watch("a", D0 + 5)]
    assert ids(tg.look_ahead_window(watches, D0, 86400)) == ["c", "a", "b"]
    assert ids(tg.look_ahead_window(watches[::-1], D0, 86400)) == ["c", "a", "b"]


# ---------------------------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------------------------
# Rewards 0.2, 0.4, 0.6, 1.5 (fully watched + like), 0.8; plus two zero-reward watches that must never be drawn.
WEIGHTED = [ratio_watch("r02", 0.2), ratio_watch("r04", 0.4, ts=D0 + 1), ratio_watch("r06", 0.6, ts=D0 + 2),
            ratio_watch("r15", 1.0, ts=D0 + 3, liked=True), ratio_watch("r08", 0.8, ts=D0 + 4, scenario="SFV")]
ZERO = [ratio_watch("skip", 0.05, ts=D0 + 5), ratio_watch("disliked", 1.0, ts=D0 + 6, disliked=True)]
CANDIDATES = [seq.as_watch_event(w) for w in WEIGHTED + ZERO]  # converted once: the statistical tests loop a lot
REWARDS = {"r02": 0.2, "r04": 0.4, "r06": 0.6, "r15": 1.5, "r08": 0.8}
N_DRAWS = 20_000


def test_rewards_of_the_sampling_fixture():
    assert {w["video_id"]: tg.reward(w) for w in WEIGHTED} == pytest.approx(REWARDS)
    assert [tg.reward(w) for w in ZERO] == [0.0, 0.0]


def test_k1_frequencies_match_reward_shares():
    counts = collections.Counter()
    for i in range(N_DRAWS):
        [picked] = tg.sample_targets(CANDIDATES, 1, seed=11, user_id="u", cutoff_ts_us=D0 + i)
        counts[picked.video_id] += 1
    assert set(counts) == set(REWARDS)  # never a zero-reward watch
    total = sum(REWARDS.values())
    for video_id, weight in REWARDS.items():
        p = weight / total
        tolerance = 4 * math.sqrt(p * (1 - p) / N_DRAWS)
        assert abs(counts[video_id] / N_DRAWS - p) < tolerance, (video_id, counts[video_id] / N_DRAWS, p)


def test_k2_inclusion_without_replacement():
    counts = collections.Counter()
    for i in range(N_DRAWS):
        picked = ids(tg.sample_targets(CANDIDATES, 2, seed=5, user_id="u", cutoff_ts_us=D0 + i))
        assert len(picked) == 2 and len(set(picked)) == 2
        counts.update(picked)
    assert set(counts) == set(REWARDS)
    total = sum(REWARDS.values())
    for video_id, weight in REWARDS.items():
        # Successive sampling: drawn first, or drawn second after some other j.
        p = weight / total + sum(w_j / total * weight / (total - w_j)
                                 for other, w_j in REWARDS.items() if other != video_id)
        tolerance = 4 * math.sqrt(p * (1 - p) / N_DRAWS)
        assert abs(counts[video_id] / N_DRAWS - p) < tolerance, (video_id, counts[video_id] / N_DRAWS, p)


def test_sample_is_keyed_exponential_race():
    # The winner is the smallest -log(u) / reward with u from the keyed hash of (seed, user, cutoff, event).
    events = [seq.as_watch_event(w) for w in WEIGHTED]
    for cutoff in range(D0, D0 + 20):
        keys = {w.video_id: -math.log(tg.target_uniform(3, "u", cutoff, w)) / REWARDS[w.video_id] for w in events}
        expected = sorted(keys, key=keys.get)
        assert ids(tg.sample_targets(WEIGHTED, 5, 3, "u", cutoff)) == expected
        assert ids(tg.sample_targets(WEIGHTED, 2, 3, "u", cutoff)) == expected[:2]  # a prefix of the draw order


def test_zero_reward_watches_are_never_sampled():
    for i in range(300):
        picked = ids(tg.sample_targets(WEIGHTED + ZERO, 8, seed=i, user_id="u", cutoff_ts_us=D0))
        assert sorted(picked) == sorted(REWARDS)  # K above the candidates: every positive one, nothing else
    assert tg.sample_targets(ZERO, 8, 0, "u", D0) == []
    assert tg.sample_targets([], 8, 0, "u", D0) == []


def test_sampling_is_deterministic_and_seeded():
    first = [ids(tg.sample_targets(WEIGHTED, 2, 7, "u", D0 + i)) for i in range(200)]
    again = [ids(tg.sample_targets(WEIGHTED[::-1], 2, 7, "u", D0 + i)) for i in range(200)]
    assert first == again  # same inputs (in any order) -> same samples
    other_seed = [ids(tg.sample_targets(WEIGHTED, 2, 8, "u", D0 + i)) for i in range(200)]
    other_user = [ids(tg.sample_targets(WEIGHTED, 2, 7, "v", D0 + i)) for i in range(200)]
    assert sum(a != b for a, b in zip(first, other_seed)) > 50
    assert sum(a != b for a, b in zip(first, other_user)) > 50


def test_sampling_does_not_use_global_random_state():
    np.random.seed(0)
    import random
    random.seed(0)
    before = ids(tg.sample_targets(WEIGHTED, 3, 1, "u", D0))
    np.random.seed(123)
    random.seed(123)
    assert ids(tg.sample_targets(WEIGHTED, 3, 1, "u", D0)) == before


def test_a_rewatched_video_is_one_candidate():
    rewatches = [ratio_watch("same", 0.2, ts=D0), ratio_watch("same", 0.9, ts=D0 + HOUR),
                 ratio_watch("same", 0.9, ts=D0 + 2 * HOUR), ratio_watch("other", 0.5, ts=D0 + 3 * HOUR)]
    for i in range(50):
        picked = tg.sample_targets(rewatches, 8, i, "u", D0)
        assert sorted(ids(picked)) == ["other", "same"]
        # The video is represented by its best watch, the earliest of equal ones.
        assert {w.video_id: w.event_ts_us for w in picked}["same"] == D0 + HOUR


def test_sample_targets_rejects_bad_k():
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            tg.sample_targets(WEIGHTED, k, 0, "u", D0)


def test_both_scenarios_are_drawn():
    scenarios = collections.Counter()
    for i in range(500):
        [picked] = tg.sample_targets(WEIGHTED, 1, 0, "u", D0 + i)
        scenarios[picked.scenario] += 1
    share = 0.8 / sum(REWARDS.values())  # r08 is the only SFV watch
    assert abs(scenarios["SFV"] / 500 - share) < 4 * math.sqrt(share * (1 - share) / 500)


# ---------------------------------------------------------------------------------------------------------------
# Next-watch mode.
# ---------------------------------------------------------------------------------------------------------------
def test_next_watch_target():
    window = [ratio_watch("skip", 0.01, ts=D0), ratio_watch("sfv", 0.5, ts=D0 + 5, scenario="SFV"),
              ratio_watch("lfv", 0.5, ts=D0 + 5), ratio_watch("later", 1.0, ts=D0 + 9)]
    # The first positive-reward watch; at equal times LFV before SFV, as in the timeline.
    assert tg.next_watch_target(window).video_id == "lfv"
    assert tg.next_watch_target(window[::-1]).video_id == "lfv"
    assert tg.next_watch_target(ZERO) is None
    assert tg.next_watch_target([]) is None


def test_build_targets_next_mode():
    cutoff = D0 + 8 * HOUR
    watches = [ratio_watch("history", 1.0, ts=cutoff - 1), ratio_watch("skip", 0.0, ts=cutoff, sid=(0, 0, 0)),
               ratio_watch("next", 0.7, ts=cutoff + 60 * S, sid=(5, 6, 7), scenario="SFV"),
               ratio_watch("after", 1.0, ts=cutoff + 120 * S)]
    config = SequenceConfig(target_mode="next")
    built = tg.build_targets(watches, cutoff, LAYOUT, config, 0, "u")
    assert built.num_targets == 1 and ids(built.watches) == ["next"] and built.scenarios == ("SFV",)
    assert built.tokens.shape == (8, 3)
    assert built.tokens[0].tolist() == [SFV_ID, LAYOUT.sid_token(0, 5), LAYOUT.sid_token(1, 6)]
    assert (built.tokens[1:] == PAD_ID).all()
    # Seed-independent.
    assert ids(tg.build_targets(watches, cutoff, LAYOUT, config, 99, "u").watches) == ["next"]
    compact = tg.build_targets(watches, cutoff, LAYOUT, SequenceConfig(target_mode="next", max_targets=1), 0, "u")
    assert compact.tokens.shape == (1, 3)
    # Nothing positive in the window: no target.
    empty = tg.build_targets(watches[:2], cutoff, LAYOUT, config, 0, "u")
    assert empty.num_targets == 0 and (empty.tokens == PAD_ID).all()


# ---------------------------------------------------------------------------------------------------------------
# Encoding and build_targets ablations.
# ---------------------------------------------------------------------------------------------------------------
def test_encode_targets_exact():
    watches = [watch("a", D0, "SFV", sid=(7, 0, 5)), watch("b", D0, "LFV", sid=(1, 2, 3))]
    rows = tg.encode_targets(watches, LAYOUT, 2, 4)
    assert rows.dtype == np.int64 and rows.shape == (4, 3)
    assert rows.tolist() == [[SFV_ID, LAYOUT.sid_token(0, 7), LAYOUT.sid_token(1, 0)],
                             [LFV_ID, LAYOUT.sid_token(0, 1), LAYOUT.sid_token(1, 2)],
                             [PAD_ID] * 3, [PAD_ID] * 3]
    full = tg.encode_targets(watches[:1], LAYOUT, 3, 1)
    assert full.tolist() == [[SFV_ID, LAYOUT.sid_token(0, 7), LAYOUT.sid_token(1, 0), LAYOUT.sid_token(2, 5)]]
    with pytest.raises(ValueError, match="do not fit max_targets=1"):
        tg.encode_targets(watches, LAYOUT, 2, 1)
    with pytest.raises(ValueError, match="2-level SID"):
        tg.encode_targets([watch("a", D0, sid=(1, 2))], LAYOUT, 2, 1)


def test_build_targets_lookahead_rows_follow_draw_order():
    built = tg.build_targets(WEIGHTED + ZERO, D0, LAYOUT, SequenceConfig(max_targets=3), 4, "u")
    assert built.num_targets == 3 and built.tokens.shape == (3, 3)
    assert ids(built.watches) == ids(tg.sample_targets(WEIGHTED + ZERO, 3, 4, "u", D0))
    for row, target in zip(built.tokens, built.watches):
        assert row.tolist() == [{"LFV": LFV_ID, "SFV": SFV_ID}[target.scenario], LAYOUT.sid_token(0, 1),
                                LAYOUT.sid_token(1, 2)]


def test_build_targets_k1_full_depth_and_one_scenario():
    k1 = tg.build_targets(WEIGHTED, D0, LAYOUT, SequenceConfig(max_targets=1), 0, "u")
    assert k1.tokens.shape == (1, 3) and k1.num_targets == 1
    full = tg.build_targets(WEIGHTED, D0, LAYOUT, SequenceConfig(full_depth_sids=True), 0, "u")
    assert full.tokens.shape == (8, 4) and full.num_targets == 5
    assert full.tokens[0, 1:].tolist() == [LAYOUT.sid_token(0, 1), LAYOUT.sid_token(1, 2), LAYOUT.sid_token(2, 3)]
    sfv_only = tg.build_targets(WEIGHTED, D0, LAYOUT, SequenceConfig(scenarios=("SFV",)), 0, "u")
    assert ids(sfv_only.watches) == ["r08"] and sfv_only.scenarios == ("SFV",)
    lfv_only = tg.build_targets(WEIGHTED, D0, LAYOUT, SequenceConfig(scenarios=("LFV",)), 0, "u")
    assert sorted(ids(lfv_only.watches)) == ["r02", "r04", "r06", "r15"]
    assert SFV_ID not in lfv_only.tokens.tolist()


def test_targets_never_come_from_the_history():
    rng = np.random.default_rng(2)
    config = SequenceConfig(max_targets=8, max_tokens=100)
    for _ in range(30):
        times = rng.integers(D0, D0 + 3 * DAY, size=30)
        watches = [ratio_watch(f"v{i}", float(rng.uniform(0, 1.2)), ts=int(t)) for i, t in enumerate(times)]
        timeline = seq.build_timeline(watches, [], config)
        for cutoff in rng.integers(D0, D0 + 2 * DAY, size=5):
            cutoff = int(cutoff)
            history = seq.select_history_events(timeline, cutoff, LAYOUT, config)
            built = tg.build_targets(watches, cutoff, LAYOUT, config, 0, "u")
            history_events = {(w.video_id, w.event_ts_us) for w in history.watches}
            for target in built.watches:
                assert (target.video_id, target.event_ts_us) not in history_events
                assert cutoff <= target.event_ts_us < cutoff + DAY
                assert tg.reward(target) > 0
