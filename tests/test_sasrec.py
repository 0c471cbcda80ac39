"""Full-ranking metrics (tokenminds_model.ranking) and the SASRec baseline (tokenminds_model.sasrec)."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from tokenminds_model import ranking

# ---------------------------------------------------------------------------------------------------------------
# ranking
# ---------------------------------------------------------------------------------------------------------------


def test_target_ranks_counts_higher_scores_and_breaks_ties_by_index():
    scores = np.array([
        [0.1, 0.9, 0.5, 0.5, 0.2],   # target 3 (0.5): item 1 higher, item 2 ties with a smaller index -> 2
        [0.1, 0.9, 0.5, 0.5, 0.2],   # target 2 (0.5): item 1 higher, item 3 ties with a larger index -> 1
        [0.3, 0.3, 0.3, 0.3, 0.3],   # all tied: rank = index
        [0.0, 1.0, 2.0, 3.0, 4.0],   # target is the top
    ])
    targets = np.array([3, 2, 4, 4])
    np.testing.assert_array_equal(ranking.target_ranks(scores, targets), [2, 1, 4, 0])


def test_target_ranks_minus_inf_never_outranks_finite():
    scores = np.array([
        [-np.inf, -5.0, -np.inf, -7.0],  # target 3 (-7): only item 1 (-5) is ahead
        [-np.inf, -5.0, -np.inf, -7.0],  # target 2 (-inf): both finite items, and the -inf item 0 (smaller index)
    ])
    np.testing.assert_array_equal(ranking.target_ranks(scores, np.array([3, 2])), [1, 3])


def test_target_ranks_chunked_matches_unchunked(monkeypatch):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(37, 11)).astype(np.float32)  # many ties
    targets = rng.integers(0, 11, size=37)
    expected = ranking.target_ranks(scores, targets)
    monkeypatch.setattr(ranking, "RANK_CHUNK_ELEMENTS", 25)  # 2 rows per chunk
    np.testing.assert_array_equal(ranking.target_ranks(scores, targets), expected)
    # Brute force from the definition.
    brute = [sum(s > row[t] or (s == row[t] and j < t) for j, s in enumerate(row)) for row, t in zip(scores, targets)]
    np.testing.assert_array_equal(expected, brute)


def test_target_ranks_refuses_nan():
    with pytest.raises(ValueError):
        ranking.target_ranks(np.array([[0.0, np.nan]]), np.array([0]))


def test_metrics_from_ranks_exact_values():
    metrics = ranking.metrics_from_ranks(np.array([0, 4, 9, 19, 100]))
    assert metrics["users"] == 5
    assert metrics["recall@5"] == pytest.approx(2 / 5)
    assert metrics["recall@10"] == pytest.approx(3 / 5)
    assert metrics["recall@20"] == pytest.approx(4 / 5)
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 5)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert metrics["ndcg@20"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11) + 1 / math.log2(21)) / 5)
    assert set(metrics) == {"users", *(f"{m}@{k}" for m in ("recall", "ndcg") for k in ranking.KS)}


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded():
    ranks = np.random.default_rng(0).geometric(0.1, size=500) - 1
    point = ranking.metrics_from_ranks(ranks)
    intervals = ranking.bootstrap_ci(ranks, draws=300, seed=7)
    for name, (lo, hi) in intervals.items():
        assert lo <= point[name] <= hi, name
        assert hi - lo > 0.01, name  # 500 users: the interval is not degenerate
    assert ranking.bootstrap_ci(ranks, draws=300, seed=7) == intervals
    assert ranking.bootstrap_ci(ranks, draws=300, seed=8) != intervals


def test_most_popular_scores_rank_by_count_then_index():
    scores = ranking.most_popular_scores(np.array([0, 5, 2, 5]))
    grid = np.broadcast_to(scores, (4, 4))
    np.testing.assert_array_equal(ranking.target_ranks(grid, np.arange(4)), [3, 0, 2, 1])


# ---------------------------------------------------------------------------------------------------------------
# SASRec
# ---------------------------------------------------------------------------------------------------------------

NUM_ITEMS = 50


def cyclic_dataset(users=300, seed=0):
    """Each user walks items i -> i+1 (mod 50, ids 1..50) from a random start: training prefix, then the next item
    held out for validation."""
    rng = np.random.default_rng(seed)
    train, targets = [], []
    for _ in range(users):
        start, length = rng.integers(0, NUM_ITEMS), rng.integers(3, 16)
        walk = (start + np.arange(length + 1)) % NUM_ITEMS + 1
        train.append(walk[:-1])
        targets.append(walk[-1])
    return train, np.array(targets)


@pytest.fixture(scope="module")
def cyclic_run():
    from tokenminds_model import sasrec

    train, targets = cyclic_dataset()
    config = sasrec.SASRecConfig(num_items=NUM_ITEMS, max_len=20, d_model=32, num_heads=2, num_layers=1,
                                 dropout=0.1, learning_rate=1e-3, batch_size=32, max_steps=300, eval_every=20,
                                 patience=3, seed=0)
    logs = []
    result = sasrec.train_sasrec(train, train, targets, config, log=logs.append)
    return sasrec, train, targets, result, logs


def test_sasrec_learns_a_deterministic_successor_pattern(cyclic_run):
    sasrec, train, targets, result, _ = cyclic_run
    metrics = sasrec.evaluate(result.params, result.config, train, targets)
    # Chance is 10/50 = 0.2; the pattern is fully predictable from the last item.
    assert metrics["recall@10"] > 0.8, result.history
    # It learned during the run (the first evaluation is far from the best) and stopped early once it plateaued.
    assert result.history[0]["step"] == 20 and result.history[0]["ndcg@10"] < metrics["ndcg@10"] - 0.2
    assert result.steps_run < 300 and result.best_step == result.steps_run - 3 * 20
    assert result.num_params > 0


def test_sasrec_returns_the_best_evaluated_params(cyclic_run):
    sasrec, train, targets, result, _ = cyclic_run
    by_step = {record["step"]: record for record in result.history}
    assert result.best_step in by_step
    best_ndcg = max(record["ndcg@10"] for record in result.history)
    assert by_step[result.best_step]["ndcg@10"] == best_ndcg
    metrics = sasrec.evaluate(result.params, result.config, train, targets)
    assert metrics["ndcg@10"] == pytest.approx(best_ndcg, abs=1e-6)


def test_score_users_shapes_padding_and_history_order(cyclic_run):
    sasrec, train, _, result, _ = cyclic_run
    # 3 histories with batch_size 2: the last batch is padded; an over-long history is cut to its last max_len.
    histories = [np.array([1, 2, 3]), np.array([7]), np.concatenate([np.arange(30, 51), np.arange(1, 10)])]
    scores = sasrec.score_users(result.params, result.config, histories, batch_size=2)
    assert scores.shape == (3, NUM_ITEMS + 1) and scores.dtype == np.float32
    assert np.all(np.isneginf(scores[:, 0])) and np.all(np.isfinite(scores[:, 1:]))
    # Another batch size pads differently; only float rounding may differ.
    np.testing.assert_allclose(scores, sasrec.score_users(result.params, result.config, histories, batch_size=8),
                               rtol=1e-4, atol=1e-5)
    # The successor of the most recent item is ranked near the top.
    top = np.argsort(-scores, axis=1)[:, :10]
    assert 4 in top[0] and 8 in top[1] and 10 in top[2]


def test_sasrec_keeps_a_copy_of_the_best_params_not_the_last(monkeypatch):
    from tokenminds_model import sasrec

    train, targets = cyclic_dataset(users=60, seed=1)
    config = sasrec.SASRecConfig(num_items=NUM_ITEMS, max_len=8, d_model=16, num_heads=2, num_layers=1,
                                 learning_rate=1e-2, batch_size=8, max_steps=1000, eval_every=5, patience=2)
    # Scripted validation NDCG@10 per evaluation: best at the 2nd (step 10), then two worse ones -> stop at step 20.
    scripted = iter([0.1, 0.5, 0.3, 0.2])
    real_evaluate = sasrec.evaluate
    monkeypatch.setattr(sasrec, "evaluate", lambda *args: {**real_evaluate(*args), "ndcg@10": next(scripted)})
    result = sasrec.train_sasrec(train, train, targets, config, log=lambda _: None)
    assert [r["step"] for r in result.history] == [5, 10, 15, 20] and result.steps_run == 20
    assert result.best_step == 10
    monkeypatch.undo()
    # The same run stopped at step 10 (evaluated there only; evaluating does not touch the batch RNG) ends with
    # exactly the returned params, and one stopped at step 20 does not: later updates did not leak into the copy.
    at_best = sasrec.train_sasrec(train, train, targets, dataclasses.replace(config, max_steps=10, eval_every=10),
                                  log=lambda _: None)
    for returned, expected in zip(jax.tree.leaves(result.params), jax.tree.leaves(at_best.params)):
        np.testing.assert_array_equal(returned, expected)
    last = sasrec.train_sasrec(train, train, targets, dataclasses.replace(config, max_steps=20, eval_every=20),
                               log=lambda _: None)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(last.params)))


def test_sasrec_bce_run_is_deterministic_given_the_seed():
    from tokenminds_model import sasrec

    train, targets = cyclic_dataset(users=60, seed=1)
    config = sasrec.SASRecConfig(num_items=NUM_ITEMS, max_len=8, d_model=16, num_heads=2, num_layers=1,
                                 learning_rate=1e-2, batch_size=8, max_steps=10, eval_every=5, loss="bce")
    first = sasrec.train_sasrec(train, train, targets, config, log=lambda _: None)
    second = sasrec.train_sasrec(train, train, targets, config, log=lambda _: None)
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(a, b)
    other_seed = sasrec.train_sasrec(train, train, targets, dataclasses.replace(config, seed=1), log=lambda _: None)
    assert [r["loss"] for r in other_seed.history] != [r["loss"] for r in first.history]


def test_sasrec_config_rejects_unknown_loss():
    from tokenminds_model import sasrec

    with pytest.raises(ValueError):
        sasrec.SASRecConfig(num_items=5, loss="bpr")
    assert sasrec.SASRecConfig(num_items=5).to_dict()["loss"] == "ce"
