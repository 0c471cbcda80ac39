"""The downstream ranking study's parts: metrics against direct computations, the candidate draw, token features from
the adaptation artifacts, paired verdicts, and a ranker that must learn from the features it is given. The study on
a real refresh runs in tests/test_refresh_users.py (it reuses that module's refreshed sample)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokenminds_model import adaptation as A
from tokenminds_model import downstream as D


def test_auc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60).astype(np.float32)
    scores = rng.integers(0, 5, 60).astype(np.float64)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
    assert D.auc(labels, scores) == pytest.approx(pairwise)
    assert D.auc(np.ones(3), np.arange(3.0)) != D.auc(np.ones(3), np.arange(3.0))  # NaN without negatives


def test_log_loss_and_ndcg_against_direct_formulas():
    labels, logits = np.array([1.0, 0.0, 1.0]), np.array([2.0, -1.0, -30.0])
    probs = 1 / (1 + np.exp(-logits))
    assert D.log_loss(labels, logits) == pytest.approx(-np.mean(labels * np.log(probs)
                                                                + (1 - labels) * np.log(1 - probs)))
    # user 0: positive ranked 2nd of 3 -> 1/log2(3); user 1: both positives on top -> 1.
    users = np.array([0, 0, 0, 1, 1, 1])
    labels = np.array([0, 1, 0, 1, 1, 0], np.float32)
    scores = np.array([3.0, 2.0, 1.0, 5.0, 4.0, 0.0])
    assert D.mean_ndcg(users, labels, scores, 10) == pytest.approx((1 / np.log2(3) + 1.0) / 2)


def test_candidates_hold_every_positive_and_unwatched_negatives_and_are_seeded():
    positives = [np.array([1, 2]), np.array([5])]
    watched = [np.array([1, 2, 3]), np.array([4, 5])]
    users, items, labels = D.build_candidates(positives, watched, 50, 10, 10, np.random.default_rng(3))
    for u, (pos, seen) in enumerate(zip(positives, watched)):
        mine, mine_labels = items[users == u], labels[users == u]
        assert sorted(mine[mine_labels == 1]) == sorted(pos)
        negatives = mine[mine_labels == 0]
        real = np.setdiff1d(seen, pos)
        assert set(real) <= set(negatives) and len(negatives) == len(real) + 10
        sampled = np.setdiff1d(negatives, real)
        assert len(set(sampled)) == 10 and not set(sampled) & set(seen)
    again = D.build_candidates(positives, watched, 50, 10, 10, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip((users, items, labels), again))
    capped = D.build_candidates([np.arange(20)], [np.arange(20)], 100, 5, 4, np.random.default_rng(0))
    assert capped[2].sum() == 4 and len(capped[1]) == 9
    with pytest.raises(ValueError, match="too few"):
        D.build_candidates([np.array([0])], [np.array([0])], 5, 10, 10, np.random.default_rng(0))


def test_token_features_pool_the_prefix_table_and_offset_learned_ids_by_scenario():
    sids = [[0, 1, 2], [0, 2, 3], [1, 0, 0], [1, 2, 3]]
    embeddings = np.arange(len(sids) * 4, dtype=np.float32).reshape(len(sids), 4)
    table = A.PrefixEmbeddingTable(A.prefix_means(["LFV", "LFV", "SFV", "SFV"], sids, embeddings))
    vocab = A.SidNgramVocab.build(A.count_ngrams(sids), len(sids))
    pieces = A.train_sid_piece_model(sids, A.SidSymbols(3, 4), 20)
    tokens = [[{"scenario": "LFV", "rank": 1, "sid": [0, 2], "score": -2.0},
               {"scenario": "LFV", "rank": 0, "sid": [0, 1], "score": -1.0},
               {"scenario": "SFV", "rank": 0, "sid": [1, 2], "score": -0.5}],
              []]
    em, ids, size = D.token_features(tokens, ["LFV", "SFV"], table, vocab, pieces)
    per_scenario = vocab.size + pieces.vocab_size
    assert size == 2 * per_scenario and em.shape == (2, 8)
    # LFV, score-weighted: softmax over the two tokens' scores (rank 0 [0, 1] at -1.0, rank 1 [0, 2] at -2.0).
    weights = np.exp([-1.0, -2.0]) / np.exp([-1.0, -2.0]).sum()
    only, lfv = table.embedding("LFV", [0, 1]), table.embedding("LFV", [0, 2])
    np.testing.assert_allclose(em[0, :4], weights[0] * only + weights[1] * lfv, rtol=1e-6)
    np.testing.assert_allclose(em[0, 4:], table.embedding("SFV", [1, 2]))
    assert not em[1].any() and (ids[1] == -1).all()  # a user without tokens: zeros and padding only
    row = ids[0][ids[0] >= 0]
    lfv_ids = sorted(row[row < per_scenario])
    expected = sorted(vocab.encode([0, 1]) + vocab.encode([0, 2])
                      + [vocab.size + i for i in pieces.encode([0, 1]) + pieces.encode([0, 2])])
    assert lfv_ids == expected
    sfv_ids = sorted(row[row >= per_scenario] - per_scenario)
    assert sfv_ids == sorted(vocab.encode([1, 2]) + [vocab.size + i for i in pieces.encode([1, 2])])


def test_verdicts_are_paired_over_seeds():
    base = [{"auc": 0.60 + 0.05 * s, "log_loss": 0.5, "ndcg@10": 0.3} for s in range(5)]
    better = [dict(r, auc=r["auc"] + 0.01 + 0.001 * s) for s, r in enumerate(base)]  # small but every seed
    runs = {"base": base, "+LE": better, "+EM": base, "+emb": base, "+emb+LE": base}
    summary = D.summarize(runs)
    assert summary["+LE"]["auc"]["lift_low"] > 0 and summary["+EM"]["auc"]["lift"] == 0
    assert summary["base"]["auc"]["low"] < 0.70 < summary["base"]["auc"]["high"]  # spread across seeds
    found = {v["compare"]: v["finding"] for v in D.verdicts(runs)}
    assert found["+LE vs base"] == "reproduces" and found["+EM vs base"].startswith("not resolved")
    assert found["+emb+LE vs +LE"] == "reversed"


def synthetic_study(users=300, items=60, seed=0):
    """Engagement is decided by a hidden user taste that only the "emb" group carries."""
    rng = np.random.default_rng(seed)
    item_embeddings = rng.normal(size=(items, 8)).astype(np.float32)
    taste = rng.normal(size=(users, 8)).astype(np.float32)
    affinity = taste @ item_embeddings.T
    positives = [np.sort(np.argsort(-a)[:3]) for a in affinity]
    watched = [np.union1d(p, np.argsort(a)[:2]) for p, a in zip(positives, affinity)]  # + two disliked watches
    groups = {"base": rng.normal(size=(users, 9)).astype(np.float32), "emb": taste,
              "em": np.zeros((users, 4), np.float32)}
    return D.StudyData([f"u{u}" for u in range(users)], [f"i{i}" for i in range(items)], item_embeddings, groups,
                       np.full((users, 1), -1, np.int32), 1, positives, watched, {})


def test_the_ranker_learns_from_an_informative_group_and_not_from_noise():
    data = synthetic_study()
    config = D.StudyConfig(seeds=2, negatives=10, max_epochs=15, patience=3, batch_size=256)
    candidates = D.build_candidates(data.positives, data.watched, len(data.item_ids), 10, 10,
                                    np.random.default_rng(0))
    split = D.split_users(len(data.user_ids), 0)
    base = D.train_and_evaluate(data, D.VARIANTS["base"], 0, config, candidates, split)
    informed = D.train_and_evaluate(data, D.VARIANTS["+emb"], 0, config, candidates, split)
    assert informed["auc"] > base["auc"] + 0.1 and informed["ndcg@10"] > base["ndcg@10"]
    assert informed["log_loss"] < base["log_loss"]
    assert set(split[0]).isdisjoint(split[2]) and len(np.concatenate(split)) == len(data.user_ids)


def test_the_report_carries_the_refresh_collapse_diagnostics(tmp_path):
    import datetime as dt
    import json

    from transforms import schemas

    day = dt.date(2026, 1, 8)
    assert D.read_collapse_diagnostics(str(tmp_path), day) is None
    summary = schemas.run_summary_path(str(tmp_path), schemas.USER_REPRESENTATIONS, day)
    (tmp_path / summary).parent.mkdir(parents=True)
    scenario = {"distinct_tokens": 31, "distinct_per_rank": [2, 2, 3, 5, 4, 4], "rank0_top_share": 0.99,
                "shared_by_all": 11, "mean_jaccard": 0.83, "top_token_share": 1.0, "users": 10}
    (tmp_path / summary).with_name("diagnostics.json").write_text(json.dumps({
        "embedding": {"mean_pairwise_cosine": 0.907}, "scenarios": {"LFV": scenario},
        "personalised": {"LFV": False}}))
    collapse = D.read_collapse_diagnostics(str(tmp_path), day)
    assert collapse["scenarios"]["LFV"]["distinct_per_rank"] == [2, 2, 3, 5, 4, 4]
    text = "\n".join(D._collapse_lines(collapse))
    assert "0.907" in text and "99% of users share the top rank-0 token" in text and "NOT personalised" in text
