"""transforms.sequences: events -> timeline -> history tokens, cutoffs, and per-user examples.

Expected token ids are always spelled through the layout's scalar helpers (``sid_token``, ``feature_token``,
``query_piece_token``), a different code path from the vectorised one the builder uses.
"""
import dataclasses
import itertools

import numpy as np
import pytest

from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SEARCH_ID, SFV_ID, SOFT_ID, VocabularyLayout
from transforms import schemas
from transforms import sequences as seq
from transforms.sequences import SearchEvent, SequenceConfig, WatchEvent

S = 1_000_000  # microseconds per second
HOUR = 3600 * S
DAY = 24 * HOUR
D0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z

LAYOUT = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=20)
F = len(LAYOUT.feature_names)  # 7
EVENT_START_TOKENS = {LFV_ID, SFV_ID, SEARCH_ID}


def watch(video_id, ts, scenario="LFV", sid=(1, 2, 3), watch_time_s=30.0, video_duration_s=60.0, surface="home",
          device="IOS", liked=False, disliked=False):
    return dict(video_id=video_id, scenario=scenario, event_ts_us=ts, watch_time_s=watch_time_s,
                video_duration_s=video_duration_s, surface=surface, device=device, liked=liked, disliked=disliked,
                sid=list(sid))


def search(ts, query, pieces=(1, 2)):
    return dict(event_ts_us=ts, query=query, pieces=list(pieces))


def bucket_featurize(watches, gaps):
    """A deterministic stand-in for the tensorflow-transform buckets, built on the raw columns."""
    raw = seq.raw_watch_features(watches, gaps)
    gap = raw["time_gap_s"].astype(np.float64)
    return {
        "watch_ratio": np.minimum((raw["watch_ratio"] * 4).astype(np.int64), 15),
        "watch_time": np.minimum((raw["watch_time_s"] // 10).astype(np.int64), 15),
        "surface": np.array([schemas.SURFACES.index(v) for v in raw["surface"]], dtype=np.int64),
        "device": np.array([schemas.DEVICES.index(v) for v in raw["device"]], dtype=np.int64),
        "liked": raw["liked"],
        "disliked": raw["disliked"],
        "time_gap": np.where(gap < 0, 0, np.minimum(1 + gap // 60, 15)).astype(np.int64),
    }


def soft_featurize(watches, gaps):
    raw = seq.raw_watch_features(watches, gaps)
    return np.stack([raw["watch_ratio"], raw["liked"], raw["disliked"], raw["time_gap_s"]], axis=1
                    ).astype(np.float32).reshape(len(watches), 4)


def zero_buckets(n):
    return {name: np.zeros(n, dtype=np.int64) for name in LAYOUT.feature_names}


def event_lengths(tokens, length):
    """Split tokens[:length] at event-start tokens (never inside an event: no event body holds one)."""
    starts = [i for i in range(length) if tokens[i] in EVENT_START_TOKENS]
    return [b - a for a, b in zip(starts, starts[1:] + [length])], starts


# ---------------------------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------------------------
def test_config_defaults():
    config = SequenceConfig()
    assert (config.prefix_len, config.full_depth_sids, config.max_tokens, config.max_watches, config.max_searches,
            config.max_pieces_per_query, config.feature_mode, config.include_searches, config.scenarios,
            config.max_targets, config.target_mode, config.window_s, config.max_cutoffs_per_day,
            config.session_gap_s) == (2, False, 1024, 1200, 50, 8, "hard", True, ("LFV", "SFV"), 8, "lookahead",
                                      86400.0, 4, 1800.0)
    assert config.reward == seq.RewardConfig()
    assert config.window_us == DAY and config.session_gap_us == 1800 * S
    assert hash(config) == hash(SequenceConfig())  # frozen value: Beam can ship it
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_tokens = 5


def test_sid_length_and_token_counts():
    assert SequenceConfig().sid_length(LAYOUT) == 2
    assert SequenceConfig(full_depth_sids=True).sid_length(LAYOUT) == 3
    with pytest.raises(ValueError, match="prefix_len 3 must be < the layout's sid_levels 3"):
        SequenceConfig(prefix_len=3).sid_length(LAYOUT)
    assert SequenceConfig().watch_token_count(LAYOUT) == 1 + 2 + F
    assert SequenceConfig(feature_mode="soft").watch_token_count(LAYOUT) == 1 + 2 + 1
    assert SequenceConfig(full_depth_sids=True, feature_mode="soft").watch_token_count(LAYOUT) == 5
    assert SequenceConfig().search_token_count(3) == 4
    assert SequenceConfig().search_token_count(30) == 9
    assert SequenceConfig(max_pieces_per_query=0).search_token_count(3) == 1


@pytest.mark.parametrize("overrides, error, message", [
    (dict(prefix_len=0), ValueError, "prefix_len must be >= 1"),
    (dict(max_tokens=0), ValueError, "max_tokens must be >= 1"),
    (dict(max_watches=-1), ValueError, "max_watches must be >= 0"),
    (dict(max_targets=0), ValueError, "max_targets must be >= 1"),
    (dict(max_cutoffs_per_day=0), ValueError, "max_cutoffs_per_day"),
    (dict(feature_mode="fuzzy"), ValueError, "feature_mode"),
    (dict(target_mode="random"), ValueError, "target_mode"),
    (dict(scenarios=()), ValueError, "scenarios"),
    (dict(scenarios=("LFV", "LFV")), ValueError, "scenarios"),
    (dict(scenarios=("MOVIE",)), ValueError, "scenarios"),
    (dict(scenarios="LFV"), TypeError, "scenarios"),
    (dict(window_s=0), ValueError, "window_s"),
    (dict(window_s=float("nan")), ValueError, "window_s"),
    (dict(session_gap_s=-1), ValueError, "session_gap_s"),
    (dict(include_searches=1), TypeError, "include_searches"),
    (dict(max_tokens=10.0), TypeError, "max_tokens"),
    (dict(reward=dict(ratio_weight=1.0)), TypeError, "RewardConfig"),
])
def test_invalid_config_is_rejected(overrides, error, message):
    with pytest.raises(error, match=message):
        SequenceConfig(**overrides)


def test_scenarios_are_normalised_to_a_tuple():
    assert SequenceConfig(scenarios=["SFV"]).scenarios == ("SFV",)


# ---------------------------------------------------------------------------------------------------------------
# Events.
# ---------------------------------------------------------------------------------------------------------------
def test_watch_dict_converts_with_contract_defaults():
    record = watch("v1", 5)
    del record["surface"]
    record["device"] = None
    event = seq.as_watch_event(record)
    assert event == WatchEvent(video_id="v1", scenario="LFV", event_ts_us=5, watch_time_s=30.0,
                               video_duration_s=60.0, surface="other", device="OTHER", liked=False, disliked=False,
                               sid=(1, 2, 3))
    assert seq.as_watch_event(event) is event
    assert seq.as_event(record) == event
    assert seq.as_event(search(5, "q", [3])) == SearchEvent(event_ts_us=5, query="q", pieces=(3,))
    # Snapshot SIDs may come as NumPy ints (pyarrow lists).
    assert seq.as_watch_event(watch("v1", 5, sid=np.array([1, 2, 3], dtype=np.int32))).sid == (1, 2, 3)


@pytest.mark.parametrize("edit, error, message", [
    (lambda r: r.pop("video_id"), ValueError, "no 'video_id'"),
    (lambda r: r.update(scenario="MOVIE"), ValueError, "scenario 'MOVIE'"),
    (lambda r: r.update(sid=[]), ValueError, "empty sid"),
    (lambda r: r.update(sid=[1, -2, 3]), ValueError, "sid must be >= 0"),
    (lambda r: r.update(sid=[1.0, 2.0, 3.0]), TypeError, "sid"),
    (lambda r: r.update(video_duration_s=0.0), ValueError, "video_duration_s"),
    (lambda r: r.update(watch_time_s=float("inf")), ValueError, "watch_time_s"),
    (lambda r: r.update(event_ts_us=1.5), TypeError, "event_ts_us"),
])
def test_bad_watch_records_are_rejected(edit, error, message):
    record = watch("v1", 5)
    edit(record)
    with pytest.raises(error, match=message):
        seq.as_watch_event(record)


def test_search_needs_pieces():
    with pytest.raises(ValueError, match="no 'pieces'"):
        seq.as_search_event({"event_ts_us": 1, "query": "cats"})


# ---------------------------------------------------------------------------------------------------------------
# Interleaving and gaps.
# ---------------------------------------------------------------------------------------------------------------
TIE_WATCHES = [watch("b", 100, "SFV"), watch("z", 100, "LFV"), watch("a", 100, "LFV"), watch("c", 50, "SFV"),
               watch("a", 200, "LFV")]
TIE_SEARCHES = [search(100, "dogs"), search(100, "cats"), search(200, "zebra"), search(10, "first")]
TIE_EXPECTED = [("search", "first"), ("watch", "c"), ("search", "cats"), ("search", "dogs"), ("watch", "a"),
                ("watch", "z"), ("watch", "b"), ("search", "zebra"), ("watch", "a")]


def _describe(events):
    return [("watch", e.video_id) if isinstance(e, WatchEvent) else ("search", e.query) for e in events]


def test_interleave_order_and_tie_breaks():
    events = seq.interleave_events(TIE_WATCHES, TIE_SEARCHES)
    # At one timestamp: searches (by query) before watches, watches LFV before SFV, then by video id.
    assert _describe(events) == TIE_EXPECTED
    assert [e.event_ts_us for e in events] == [10, 50, 100, 100, 100, 100, 100, 200, 200]


def test_interleave_is_independent_of_input_order():
    expected = seq.interleave_events(TIE_WATCHES, TIE_SEARCHES)
    rng = np.random.default_rng(0)
    for _ in range(50):
        watches = [TIE_WATCHES[i] for i in rng.permutation(len(TIE_WATCHES))]
        searches = [TIE_SEARCHES[i] for i in rng.permutation(len(TIE_SEARCHES))]
        assert seq.interleave_events(watches, searches) == expected
    for watches in itertools.permutations(TIE_WATCHES[:3]):
        assert _describe(seq.interleave_events(list(watches))) == [("watch", "a"), ("watch", "z"), ("watch", "b")]


def test_same_video_same_time_duplicates_that_differ_still_sort_deterministically():
    first = watch("a", 100, watch_time_s=10.0)
    second = watch("a", 100, watch_time_s=20.0)
    assert seq.interleave_events([second, first]) == seq.interleave_events([first, second])
    assert [e.watch_time_s for e in seq.interleave_events([second, first])] == [10.0, 20.0]


def test_time_gaps_exact_with_sentinel_for_the_first_event():
    events = seq.interleave_events([watch("a", 10 * S), watch("b", 70 * S), watch("c", 70 * S)],
                                   [search(12 * S + 500_000, "q")])
    gaps = seq.time_gaps_s(events)
    assert gaps.dtype == np.float64
    np.testing.assert_array_equal(gaps, [seq.FIRST_EVENT_GAP_S, 2.5, 57.5, 0.0])
    assert seq.FIRST_EVENT_GAP_S == -1.0
    assert seq.time_gaps_s([]).shape == (0,)
    with pytest.raises(ValueError, match="time order"):
        seq.time_gaps_s([watch("a", 20), watch("b", 10)])


def test_build_timeline_applies_ablations_before_gaps():
    watches = [watch("a", 0), watch("b", 100 * S, "SFV"), watch("c", 200 * S)]
    searches = [search(150 * S, "q")]
    full = seq.build_timeline(watches, searches, SequenceConfig())
    assert _describe(full.events) == [("watch", "a"), ("watch", "b"), ("search", "q"), ("watch", "c")]
    assert full.gaps_s == (-1.0, 100.0, 50.0, 50.0)
    no_search = seq.build_timeline(watches, searches, SequenceConfig(include_searches=False))
    assert _describe(no_search.events) == [("watch", "a"), ("watch", "b"), ("watch", "c")]
    assert no_search.gaps_s == (-1.0, 100.0, 100.0)
    lfv = seq.build_timeline(watches, searches, SequenceConfig(scenarios=("LFV",)))
    assert _describe(lfv.events) == [("watch", "a"), ("search", "q"), ("watch", "c")]
    assert lfv.gaps_s == (-1.0, 150.0, 50.0)
    assert [w.video_id for w in lfv.watches] == ["a", "c"]
    np.testing.assert_array_equal(lfv.watch_gaps_s(), [-1.0, 50.0])


# ---------------------------------------------------------------------------------------------------------------
# Raw features.
# ---------------------------------------------------------------------------------------------------------------
def test_raw_watch_features_exact():
    watches = [watch("a", 0, watch_time_s=45.0, video_duration_s=60.0, surface="search", device="TV", liked=True),
               watch("b", 1, watch_time_s=500.0, video_duration_s=100.0, disliked=True),
               watch("c", 2, watch_time_s=0.0, video_duration_s=10.0)]
    raw = seq.raw_watch_features(watches, [-1.0, 2.5, 0.0])
    assert tuple(raw) == seq.RAW_WATCH_FEATURE_COLUMNS == (
        "watch_ratio", "watch_time_s", "surface", "device", "liked", "disliked", "time_gap_s")
    np.testing.assert_array_equal(raw["watch_ratio"], np.array([0.75, 2.0, 0.0], dtype=np.float32))  # clipped at 2
    np.testing.assert_array_equal(raw["watch_time_s"], [45.0, 500.0, 0.0])
    assert raw["surface"].tolist() == ["search", "home", "home"]
    assert raw["device"].tolist() == ["TV", "IOS", "IOS"]
    assert raw["liked"].tolist() == [1, 0, 0] and raw["disliked"].tolist() == [0, 1, 0]
    np.testing.assert_array_equal(raw["time_gap_s"], [-1.0, 2.5, 0.0])
    assert {c: raw[c].dtype.kind for c in raw} == {"watch_ratio": "f", "watch_time_s": "f", "surface": "O",
                                                   "device": "O", "liked": "i", "disliked": "i", "time_gap_s": "f"}
    with pytest.raises(ValueError, match="one gap per watch"):
        seq.raw_watch_features(watches, [1.0])
    empty = seq.raw_watch_features([], [])
    assert all(len(v) == 0 for v in empty.values())


def test_raw_columns_cover_the_layout_features():
    assert set(seq.RAW_COLUMN_FOR_FEATURE) == set(VocabularyLayout(sid_levels=3, codebook_size=8,
                                                                   query_vocab_size=5).feature_names)
    assert set(seq.RAW_COLUMN_FOR_FEATURE.values()) == set(seq.RAW_WATCH_FEATURE_COLUMNS)
    assert set(seq.RAW_NUMERIC_COLUMNS + seq.RAW_FLAG_COLUMNS + seq.RAW_CATEGORICAL_COLUMNS) == set(
        seq.RAW_WATCH_FEATURE_COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# Token layout per event.
# ---------------------------------------------------------------------------------------------------------------
def test_hard_watch_token_layout_exact():
    w = watch("v", 100 * S, "SFV", sid=(3, 5, 7), watch_time_s=45.0, surface="search", device="TV", liked=True)
    history = seq.tokenize_history([w], LAYOUT, SequenceConfig(),
                                   watch_features=bucket_featurize([w], [120.0]))
    expected = [SFV_ID, LAYOUT.sid_token(0, 3), LAYOUT.sid_token(1, 5),
                LAYOUT.feature_token("watch_ratio", 3), LAYOUT.feature_token("watch_time", 4),
                LAYOUT.feature_token("surface", 3), LAYOUT.feature_token("device", 3),
                LAYOUT.feature_token("liked", 1), LAYOUT.feature_token("disliked", 0),
                LAYOUT.feature_token("time_gap", 3)]
    assert history.tokens[:history.length].tolist() == expected
    assert LAYOUT.format_tokens(expected).split()[:3] == ["<SFV>", "sid_0_3", "sid_1_5"]
    assert history.length == 10 and (history.num_watches, history.num_searches) == (1, 0)
    assert history.soft_features is None


def test_hard_features_follow_layout_feature_order_not_dict_order():
    layout = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=5,
                              feature_sizes=[("liked", 2), ("surface", 4)])
    features = {"surface": np.array([2]), "liked": np.array([1]), "unused_column": np.array([9])}
    history = seq.tokenize_history([watch("v", 0)], layout, SequenceConfig(), watch_features=features)
    assert history.tokens[:history.length].tolist() == [
        LFV_ID, layout.sid_token(0, 1), layout.sid_token(1, 2), layout.feature_token("liked", 1),
        layout.feature_token("surface", 2)]


def test_soft_watch_token_layout_and_features():
    config = SequenceConfig(feature_mode="soft")
    watches = [watch("a", 0, sid=(4, 6, 0)), watch("b", 5 * S, "SFV", sid=(7, 1, 2))]
    vectors = np.array([[0.5, 1.0, 2.0], [3.0, 4.0, 5.0]])
    history = seq.tokenize_history(watches, LAYOUT, config, soft_vectors=vectors)
    assert history.tokens[:history.length].tolist() == [
        LFV_ID, LAYOUT.sid_token(0, 4), LAYOUT.sid_token(1, 6), SOFT_ID,
        SFV_ID, LAYOUT.sid_token(0, 7), LAYOUT.sid_token(1, 1), SOFT_ID]
    assert history.soft_features.shape == (1024, 3) and history.soft_features.dtype == np.float32
    np.testing.assert_array_equal(history.soft_features[3], [0.5, 1.0, 2.0])
    np.testing.assert_array_equal(history.soft_features[7], [3.0, 4.0, 5.0])
    mask = np.ones(1024, dtype=bool)
    mask[[3, 7]] = False
    assert not history.soft_features[mask].any()  # zeros everywhere but the <soft> positions
    np.testing.assert_array_equal(np.flatnonzero(history.tokens == SOFT_ID), [3, 7])


def test_search_token_layout_with_piece_cap():
    pieces = list(range(10))
    history = seq.tokenize_history([search(0, "long query", pieces)], LAYOUT, SequenceConfig())
    assert history.tokens[:history.length].tolist() == [SEARCH_ID] + [LAYOUT.query_piece_token(p)
                                                                      for p in range(8)]
    assert (history.length, history.num_watches, history.num_searches) == (9, 0, 1)
    capped = seq.tokenize_history([search(0, "q", [19, 4, 7])], LAYOUT, SequenceConfig(max_pieces_per_query=2))
    assert capped.tokens[:capped.length].tolist() == [SEARCH_ID, LAYOUT.query_piece_token(19),
                                                      LAYOUT.query_piece_token(4)]
    bare = seq.tokenize_history([search(0, "q", [])], LAYOUT, SequenceConfig())
    assert bare.tokens[:bare.length].tolist() == [SEARCH_ID]


def test_full_depth_sids_use_every_level():
    config = SequenceConfig(full_depth_sids=True, feature_mode="soft")
    history = seq.tokenize_history([watch("a", 0, sid=(4, 6, 5))], LAYOUT, config, soft_vectors=np.ones((1, 2)))
    assert history.tokens[:history.length].tolist() == [LFV_ID, LAYOUT.sid_token(0, 4), LAYOUT.sid_token(1, 6),
                                                        LAYOUT.sid_token(2, 5), SOFT_ID]
    np.testing.assert_array_equal(history.soft_features[4], [1.0, 1.0])


def test_sequence_is_left_aligned_and_padded():
    events = [watch("a", 0), search(1, "q", [1, 2, 3]), watch("b", 2, "SFV")]
    history = seq.tokenize_history(events, LAYOUT, SequenceConfig(max_tokens=40), watch_features=zero_buckets(2))
    assert history.tokens.shape == (40,) and history.tokens.dtype == np.int64
    assert history.length == 10 + 4 + 10
    assert (history.tokens[history.length:] == PAD_ID).all()
    assert (history.tokens[:history.length] != PAD_ID).all()
    assert history.tokens[0] == LFV_ID and history.tokens[10] == SEARCH_ID and history.tokens[14] == SFV_ID
    assert (history.num_watches, history.num_searches) == (2, 1)


def test_empty_history_is_all_padding():
    for config, kwargs in [(SequenceConfig(), dict(watch_features=zero_buckets(0))),
                           (SequenceConfig(feature_mode="soft"), dict(soft_vectors=np.zeros((0, 3))))]:
        history = seq.tokenize_history([], LAYOUT, config, **kwargs)
        assert history.length == 0 and (history.tokens == PAD_ID).all()
        assert (history.num_watches, history.num_searches) == (0, 0)


@pytest.mark.parametrize("config, events, kwargs, error, message", [
    (SequenceConfig(), [watch("a", 0)], {}, ValueError, "needs watch_features"),
    (SequenceConfig(), [watch("a", 0)], dict(watch_features={"liked": np.zeros(1, int)}), ValueError,
     "no 'watch_ratio'"),
    (SequenceConfig(), [watch("a", 0)], dict(watch_features=zero_buckets(2)), ValueError, r"expected \(1,\)"),
    (SequenceConfig(), [watch("a", 0)], dict(watch_features={**zero_buckets(1), "liked": np.array([2])}),
     ValueError, r"bucket of feature 'liked' out of range \[0, 2\): \[2\]"),
    (SequenceConfig(), [watch("a", 0)], dict(watch_features={**zero_buckets(1), "liked": np.array([0.5])}),
     TypeError, "integer buckets"),
    (SequenceConfig(), [watch("a", 0, sid=(1, 2))], dict(watch_features=zero_buckets(1)), ValueError,
     "2-level SID"),
    (SequenceConfig(feature_mode="soft"), [watch("a", 0)], {}, ValueError, "needs soft_vectors"),
    (SequenceConfig(feature_mode="soft"), [watch("a", 0)], dict(soft_vectors=np.zeros(3)), ValueError,
     "soft_vectors has shape"),
    (SequenceConfig(feature_mode="soft"), [watch("a", 0)], dict(soft_vectors=np.full((1, 2), np.nan)),
     ValueError, "NaN"),
    (SequenceConfig(include_searches=False), [search(0, "q")], {}, ValueError, "excluded by the config"),
    (SequenceConfig(scenarios=("LFV",)), [watch("a", 0, "SFV")], dict(watch_features=zero_buckets(1)),
     ValueError, "excluded by the config"),
])
def test_tokenize_history_rejects_misaligned_or_excluded_input(config, events, kwargs, error, message):
    with pytest.raises(error, match=message):
        seq.tokenize_history(events, LAYOUT, config, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Selection and truncation.
# ---------------------------------------------------------------------------------------------------------------
# Hard mode: a watch is 10 tokens, a search 1 + pieces.
TRUNCATION_WATCHES = [watch("w1", 100), watch("w2", 300, "SFV"), watch("w3", 500)]
TRUNCATION_SEARCHES = [search(200, "s1", [1, 2, 3, 4, 5]), search(400, "s2", [6, 7])]


def _select(watches, searches, cutoff, config):
    return seq.select_history_events(seq.build_timeline(watches, searches, config), cutoff, LAYOUT, config)


@pytest.mark.parametrize("max_tokens, expected, length", [
    (1024, ["w1", "s1", "w2", "s2", "w3"], 39),
    (39, ["w1", "s1", "w2", "s2", "w3"], 39),
    (38, ["s1", "w2", "s2", "w3"], 29),  # w1 would need 39: the oldest event goes first
    (29, ["s1", "w2", "s2", "w3"], 29),
    (28, ["w2", "s2", "w3"], 23),
    (13, ["s2", "w3"], 13),
    (12, ["w3"], 10),
    (9, [], 0),  # not even the most recent watch fits
])
def test_token_budget_drops_whole_oldest_events(max_tokens, expected, length):
    config = SequenceConfig(max_tokens=max_tokens)
    selected = _select(TRUNCATION_WATCHES, TRUNCATION_SEARCHES, 1000, config)
    assert [e.video_id if isinstance(e, WatchEvent) else e.query for e in selected.events] == expected
    history = seq.tokenize_history(selected, LAYOUT, config, watch_features=zero_buckets(len(selected.watches)))
    assert history.length == length <= max_tokens
    if length:
        assert history.tokens[0] in EVENT_START_TOKENS
        lengths, _ = event_lengths(history.tokens, history.length)
        assert lengths == [10 if name.startswith("w") else {"s1": 6, "s2": 3}[name] for name in expected]


def test_token_budget_never_skips_over_an_event():
    # The 9-token s_big does not fit beside w1, the older 2-token s_small would: it is dropped anyway, since a
    # history is a contiguous run of the most recent events.
    config = SequenceConfig(max_tokens=15)
    selected = _select([watch("w1", 300)], [search(100, "s_small", [1]), search(200, "s_big", range(8))], 1000,
                       config)
    assert [getattr(e, "video_id", None) for e in selected.events] == ["w1"]


def test_tokenize_history_truncates_whole_oldest_events_too():
    timeline = seq.build_timeline(TRUNCATION_WATCHES, TRUNCATION_SEARCHES)
    history = seq.tokenize_history(timeline, LAYOUT, SequenceConfig(max_tokens=28), watch_features=zero_buckets(3))
    assert history.length == 23 and (history.num_watches, history.num_searches) == (2, 1)
    assert history.tokens[0] == SFV_ID  # w2, the oldest kept event, starts the sequence
    assert event_lengths(history.tokens, history.length)[0] == [10, 3, 10]


def test_max_watches_keeps_the_most_recent_watches():
    watches = [watch("w1", 100), watch("w2", 200), watch("w3", 300), watch("w4", 400)]
    searches = [search(150, "s1"), search(350, "s2")]
    selected = _select(watches, searches, 1000, SequenceConfig(max_watches=2))
    # The cap drops older watches only; the older search s1 is still within the other caps.
    assert _describe(selected.events) == [("search", "s1"), ("watch", "w3"), ("search", "s2"), ("watch", "w4")]
    assert _describe(_select(watches, searches, 1000, SequenceConfig(max_watches=0)).events) == [
        ("search", "s1"), ("search", "s2")]


def test_max_searches_keeps_the_most_recent_queries():
    searches = [search(100 + i, f"s{i}") for i in range(6)]
    watches = [watch("w_old", 50), watch("w_new", 200)]
    selected = _select(watches, searches, 1000, SequenceConfig(max_searches=2))
    assert _describe(selected.events) == [("watch", "w_old"), ("search", "s4"), ("search", "s5"),
                                          ("watch", "w_new")]
    history = seq.tokenize_history(selected, LAYOUT, SequenceConfig(), watch_features=zero_buckets(2))
    assert (history.num_watches, history.num_searches) == (2, 2)


def test_history_is_strictly_before_the_cutoff():
    watches = [watch("before", 999), watch("at", 1000), watch("after", 1001)]
    selected = _select(watches, [search(1000, "at_cutoff")], 1000, SequenceConfig())
    assert _describe(selected.events) == [("watch", "before")]
    assert _select(watches, [], 999, SequenceConfig()).events == ()


def test_selection_keeps_each_events_timeline_gap():
    config = SequenceConfig(max_tokens=20)
    timeline = seq.build_timeline([watch("a", 0), watch("b", 10 * S), watch("c", 30 * S)], [], config)
    selected = seq.select_history_events(timeline, 100 * S, LAYOUT, config)
    assert [w.video_id for w in selected.watches] == ["b", "c"]
    # b's gap is measured to a, which was truncated away: not replaced by the first-event sentinel.
    np.testing.assert_array_equal(selected.watch_gaps_s(), [10.0, 20.0])


def test_no_search_ablation_has_no_search_token():
    config = SequenceConfig(include_searches=False)
    timeline = seq.build_timeline(TRUNCATION_WATCHES, TRUNCATION_SEARCHES, config)
    history = seq.build_history(timeline, 1000, LAYOUT, config, bucket_featurize)
    assert SEARCH_ID not in history.tokens.tolist()
    assert (history.num_watches, history.num_searches, history.length) == (3, 0, 30)
    # Selection applies the ablations even to a timeline built without them.
    unfiltered = seq.build_timeline(TRUNCATION_WATCHES, TRUNCATION_SEARCHES)
    assert seq.select_history_events(unfiltered, 1000, LAYOUT, config).searches == []


def test_one_scenario_ablation_drops_other_scenario_watches():
    config = SequenceConfig(scenarios=("LFV",))
    timeline = seq.build_timeline(TRUNCATION_WATCHES, TRUNCATION_SEARCHES, config)
    history = seq.build_history(timeline, 1000, LAYOUT, config, bucket_featurize)
    assert SFV_ID not in history.tokens.tolist()
    assert (history.num_watches, history.num_searches) == (2, 2)


def test_build_history_featurizes_exactly_the_selected_watches():
    calls = []

    def featurize(watches, gaps):
        calls.append(([w.video_id for w in watches], gaps.tolist()))
        return bucket_featurize(watches, gaps)

    config = SequenceConfig(max_tokens=29)
    timeline = seq.build_timeline(TRUNCATION_WATCHES, TRUNCATION_SEARCHES, config)
    history = seq.build_history(timeline, 1000, LAYOUT, config, featurize)
    assert calls == [(["w2", "w3"], [100e-6, 100e-6])]
    assert history.length == 29


def test_build_history_checks_what_featurize_returns():
    timeline = seq.build_timeline([watch("a", 0)], [])
    with pytest.raises(TypeError, match="hard feature mode"):
        seq.build_history(timeline, 10, LAYOUT, SequenceConfig(), soft_featurize)
    with pytest.raises(TypeError, match="soft feature mode"):
        seq.build_history(timeline, 10, LAYOUT, SequenceConfig(feature_mode="soft"), bucket_featurize)


def test_soft_history_through_build_history():
    config = SequenceConfig(feature_mode="soft")
    timeline = seq.build_timeline([watch("a", 0, watch_time_s=30.0, liked=True), watch("b", 4 * S)],
                                  [search(2 * S, "q", [5])], config)
    history = seq.build_history(timeline, 10 * S, LAYOUT, config, soft_featurize)
    assert history.tokens[:history.length].tolist() == [
        LFV_ID, LAYOUT.sid_token(0, 1), LAYOUT.sid_token(1, 2), SOFT_ID, SEARCH_ID, LAYOUT.query_piece_token(5),
        LFV_ID, LAYOUT.sid_token(0, 1), LAYOUT.sid_token(1, 2), SOFT_ID]
    np.testing.assert_array_equal(history.soft_features[3], [0.5, 1.0, 0.0, -1.0])
    np.testing.assert_array_equal(history.soft_features[9], [0.5, 0.0, 0.0, 2.0])
    assert np.count_nonzero(history.soft_features.any(axis=1)) == 2


# ---------------------------------------------------------------------------------------------------------------
# Keyed hashing.
# ---------------------------------------------------------------------------------------------------------------
def test_keyed_hash_is_pinned_and_separates_fields():
    # Pinned: a change here silently changes every sampled dataset.
    assert seq.keyed_hash64("target", 7, "user-1", 123456789, "video-9", 42) == 5023580461400977544
    assert seq.keyed_hash64("cutoff", 0, "u", 5) == 5663955047267772353
    assert seq.keyed_hash64("ab", "c") != seq.keyed_hash64("a", "bc")
    assert seq.keyed_hash64(1) != seq.keyed_hash64("1")
    assert seq.keyed_hash64(np.int64(5)) == seq.keyed_hash64(5)
    with pytest.raises(TypeError):
        seq.keyed_hash64(1.5)
    assert seq.uniform_from_hash(0) == 2.0 ** -53 and seq.uniform_from_hash(2 ** 64 - 1) == 1.0


def test_keyed_hasher_is_keyed_hash_with_a_prefix():
    from transforms.events import keyed_hasher

    target_hash = keyed_hasher("target", 7, "user-1", 123456789)
    assert target_hash("video-9", 42) == 5023580461400977544
    assert target_hash("video-9", 42) == target_hash("video-9", 42)  # the prefix state is copied, never consumed
    assert keyed_hasher()("cutoff", 0, "u", 5) == seq.keyed_hash64("cutoff", 0, "u", 5)
    with pytest.raises(TypeError):
        target_hash(1.5)


# ---------------------------------------------------------------------------------------------------------------
# Cutoffs.
# ---------------------------------------------------------------------------------------------------------------
def test_session_starts():
    events = [watch("yesterday", D0 - 10 * S),  # 10 s before midnight: the day's first event still starts one
              watch("a", D0 + 0), watch("b", D0 + 60 * S),
              search(D0 + 60 * S + 1800 * S, "exactly 30 min later"),  # a gap of exactly session_gap_s counts
              watch("c", D0 + 60 * S + 3599 * S),  # 29:59 after the search: same session
              watch("d", D0 + 5 * HOUR), watch("d2", D0 + 5 * HOUR),  # same time: one cutoff
              watch("tomorrow", D0 + DAY)]
    assert seq.session_starts(events, D0, D0 + DAY, 1800) == [D0, D0 + 1860 * S, D0 + 5 * HOUR]
    assert seq.session_starts([watch("only", D0 + HOUR)], D0, D0 + DAY, 1800) == [D0 + HOUR]
    assert seq.session_starts([], D0, D0 + DAY, 1800) == []


def test_choose_cutoffs_caps_deterministically():
    config = SequenceConfig()
    events = [watch(f"v{i}", D0 + i * HOUR) for i in range(10)]
    cutoffs = seq.choose_cutoffs(events, D0, D0 + DAY, config, seed=0, user_id="u")
    assert len(cutoffs) == 4 and cutoffs == sorted(cutoffs)
    assert set(cutoffs) <= {D0 + i * HOUR for i in range(10)}
    assert seq.choose_cutoffs(events[::-1], D0, D0 + DAY, config, seed=0, user_id="u") == cutoffs
    by_key = sorted(range(10), key=lambda i: seq.keyed_hash64("cutoff", 0, "u", D0 + i * HOUR))[:4]
    assert cutoffs == sorted(D0 + i * HOUR for i in by_key)
    choices = {tuple(seq.choose_cutoffs(events, D0, D0 + DAY, config, seed, "u")) for seed in range(10)}
    assert len(choices) > 1  # the seed matters
    assert seq.choose_cutoffs(events[:3], D0, D0 + DAY, config, 0, "u") == [D0, D0 + HOUR, D0 + 2 * HOUR]
    assert len(seq.choose_cutoffs(events, D0, D0 + DAY, SequenceConfig(max_cutoffs_per_day=1), 0, "u")) == 1


# ---------------------------------------------------------------------------------------------------------------
# Per-user examples.
# ---------------------------------------------------------------------------------------------------------------
def _user_events():
    watches = [
        watch("old", D0 - HOUR, sid=(0, 1, 2)),  # yesterday: the first cutoff's history
        watch("b", D0 + 8 * HOUR + 10 * S, sid=(3, 4, 5)),
        watch("c", D0 + 8 * HOUR + 300 * S, "SFV", sid=(6, 7, 0), liked=True),
        watch("skip", D0 + 23 * HOUR, watch_time_s=1.0),  # starts a session, zero reward
        watch("later", D0 + 50 * HOUR),  # outside every window of day D
    ]
    searches = [search(D0 + 8 * HOUR, "cats", [3, 4])]  # starts the first session
    return watches, searches


def test_make_user_examples_exact():
    watches, searches = _user_events()
    calls = []

    def featurize(selected_watches, gaps):
        calls.append([w.video_id for w in selected_watches])
        return bucket_featurize(selected_watches, gaps)

    examples = seq.make_user_examples("u1", watches, searches, D0, D0 + DAY, LAYOUT, SequenceConfig(), 0, featurize)
    # Cutoffs: 08:00 (the search) and 23:00 ("skip"). 23:00 has no positive-reward watch in [23:00, 47:00): no
    # example, and featurize is not called for it.
    assert len(examples) == 1 and calls == [["old"]]
    example = examples[0]
    assert set(example) == {"user_id", "cutoff_ts_us", "tokens", "length", "num_watches", "num_searches",
                            "targets", "num_targets", "target_scenarios", "target_video_ids"}
    assert example["user_id"] == "u1" and example["cutoff_ts_us"] == D0 + 8 * HOUR
    assert example["tokens"][:example["length"]].tolist() == [
        LFV_ID, LAYOUT.sid_token(0, 0), LAYOUT.sid_token(1, 1), LAYOUT.feature_token("watch_ratio", 2),
        LAYOUT.feature_token("watch_time", 3), LAYOUT.feature_token("surface", 0),
        LAYOUT.feature_token("device", 0), LAYOUT.feature_token("liked", 0), LAYOUT.feature_token("disliked", 0),
        LAYOUT.feature_token("time_gap", 0)]  # the user's first event: gap sentinel -> bucket 0
    assert (example["num_watches"], example["num_searches"]) == (1, 0)
    assert example["num_targets"] == 2 and sorted(example["target_video_ids"]) == ["b", "c"]
    rows = {"b": [LFV_ID, LAYOUT.sid_token(0, 3), LAYOUT.sid_token(1, 4)],
            "c": [SFV_ID, LAYOUT.sid_token(0, 6), LAYOUT.sid_token(1, 7)]}
    assert example["targets"].shape == (8, 3) and example["targets"].dtype == np.int64
    assert example["targets"][:2].tolist() == [rows[v] for v in example["target_video_ids"]]
    assert (example["targets"][2:] == PAD_ID).all()
    assert example["target_scenarios"] == [{"b": "LFV", "c": "SFV"}[v] for v in example["target_video_ids"]]


def test_a_cutoff_without_history_yields_no_example():
    watches, searches = _user_events()
    new_user = [w for w in watches if w["video_id"] != "old"]  # the 08:00 cutoff now has nothing before it
    assert seq.make_user_examples("u1", new_user, searches, D0, D0 + DAY, LAYOUT, SequenceConfig(), 0,
                                  bucket_featurize) == []
    # Without the search, the first cutoff moves to "b" (08:00:10), still with nothing before it.
    assert seq.make_user_examples("u1", new_user, [], D0, D0 + DAY, LAYOUT, SequenceConfig(), 0,
                                  bucket_featurize) == []


def test_make_user_examples_is_deterministic_and_input_order_independent():
    watches, searches = _user_events()
    watches = watches + [watch(f"extra{i}", D0 + 8 * HOUR + (400 + i) * S, liked=i % 2 == 0) for i in range(12)]
    config = SequenceConfig(max_targets=3)
    first = seq.make_user_examples("u1", watches, searches, D0, D0 + DAY, LAYOUT, config, 3, bucket_featurize)
    again = seq.make_user_examples("u1", watches[::-1], searches, D0, D0 + DAY, LAYOUT, config, 3,
                                   bucket_featurize)
    assert len(first) == len(again) == 1

    def frozen(example):
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in example.items()}

    assert frozen(first[0]) == frozen(again[0])
    picks = {tuple(seq.make_user_examples("u1", watches, searches, D0, D0 + DAY, LAYOUT, config, seed,
                                          bucket_featurize)[0]["target_video_ids"]) for seed in range(8)}
    assert len(picks) > 1


def test_make_user_examples_soft_mode_and_serving_agree():
    watches, searches = _user_events()
    config = SequenceConfig(feature_mode="soft")
    [example] = seq.make_user_examples("u1", watches, searches, D0, D0 + DAY, LAYOUT, config, 0, soft_featurize)
    assert example["soft_features"].shape == (1024, 4)
    np.testing.assert_array_equal(example["soft_features"][3], [0.5, 0.0, 0.0, -1.0])
    # Serving builds the same history with the same function at any cutoff (end of day in production).
    timeline = seq.build_timeline(watches, searches, config)
    served = seq.build_history(timeline, example["cutoff_ts_us"], LAYOUT, config, soft_featurize)
    np.testing.assert_array_equal(served.tokens, example["tokens"])
    np.testing.assert_array_equal(served.soft_features, example["soft_features"])
    end_of_day = seq.build_history(timeline, D0 + DAY, LAYOUT, config, soft_featurize)
    assert (end_of_day.num_watches, end_of_day.num_searches) == (4, 1)


def test_ablations_in_examples():
    watches, searches = _user_events()
    no_search = seq.make_user_examples("u1", watches, searches, D0, D0 + DAY, LAYOUT,
                                       SequenceConfig(include_searches=False), 0, bucket_featurize)
    # Without the 08:00 search, the session starts at b (08:00:10), so b is a target and c too.
    assert [e["cutoff_ts_us"] for e in no_search] == [D0 + 8 * HOUR + 10 * S]
    for example in no_search:
        assert SEARCH_ID not in example["tokens"].tolist()

    lfv_only = seq.make_user_examples("u1", watches, searches, D0, D0 + DAY, LAYOUT,
                                      SequenceConfig(scenarios=("LFV",)), 0, bucket_featurize)
    [example] = lfv_only
    assert example["target_video_ids"] == ["b"] and example["target_scenarios"] == ["LFV"]
    assert SFV_ID not in example["tokens"].tolist() and SFV_ID not in example["targets"].tolist()

    full_depth = seq.make_user_examples("u1", watches, searches, D0, D0 + DAY, LAYOUT,
                                        SequenceConfig(full_depth_sids=True, max_targets=1), 0, bucket_featurize)
    [example] = full_depth
    assert example["targets"].shape == (1, 4) and example["num_targets"] == 1
    assert example["length"] == 1 + 3 + F
    assert example["tokens"][:4].tolist() == [LFV_ID, LAYOUT.sid_token(0, 0), LAYOUT.sid_token(1, 1),
                                              LAYOUT.sid_token(2, 2)]


def test_history_and_targets_never_overlap_on_random_timelines():
    rng = np.random.default_rng(1)
    config = SequenceConfig(max_targets=4, max_tokens=64)
    for user in range(20):
        times = np.sort(rng.integers(D0 - DAY, D0 + 2 * DAY, size=40))
        watches = [watch(f"v{i}", int(t), "LFV" if i % 3 else "SFV", watch_time_s=float(rng.uniform(0, 60)))
                   for i, t in enumerate(times)]
        searches = [search(int(t), f"q{i}") for i, t in enumerate(rng.integers(D0 - DAY, D0 + DAY, size=10))]
        timeline = seq.build_timeline(watches, searches, config)
        for example in seq.make_user_examples(f"u{user}", watches, searches, D0, D0 + DAY, LAYOUT, config, 0,
                                              bucket_featurize):
            cutoff = example["cutoff_ts_us"]
            history = seq.select_history_events(timeline, cutoff, LAYOUT, config)
            history_ids = {(w.video_id, w.event_ts_us) for w in history.watches}
            assert all(e.event_ts_us < cutoff for e in history.events)
            target_ids = set(example["target_video_ids"])
            window = {w["video_id"] for w in watches if cutoff <= w["event_ts_us"] < cutoff + DAY}
            assert target_ids <= window
            assert not target_ids & {vid for vid, _ in history_ids}  # video ids are unique per event here
            assert example["length"] <= 64 and example["tokens"][0] in EVENT_START_TOKENS
            assert sum(event_lengths(example["tokens"], example["length"])[0]) == example["length"]
