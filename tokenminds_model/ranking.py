"""Full-ranking metrics for leave-one-out next-item benchmarks (one relevant item per user). Pure NumPy.

Every user has exactly one held-out target item, and the model scores *all* items (no sampled candidate sets, which
inflate and reorder results: Krichene & Rendle, "On Sampled Metrics for Item Recommendation", KDD 2020). From the
scores we only need the target's 0-based rank:

- :func:`target_ranks` ranks each user's target among all N items. Ties are broken deterministically by item index:
  an item outranks the target if its score is strictly higher, or equal with a smaller index. (Counting only strictly
  higher scores would reward a model that gives every item the same score; counting every tie as ahead would punish
  it. The index tie-break sits in between and is reproducible.) A score of ``-inf`` (a masked item, such as the
  padding column) never outranks a finite score.
- :func:`metrics_from_ranks` turns ranks into Recall@k (hit rate: ``rank < k``) and NDCG@k (``1 / log2(rank + 2)``
  within the top k, else 0; the ideal DCG is 1 with a single relevant item), averaged over users.
- :func:`bootstrap_ci` gives percentile-bootstrap confidence intervals over users for the same metrics.
- :func:`most_popular_scores` is the popularity baseline's scorer.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

KS = (5, 10, 20)
# Elements of one [rows, N] block compared at a time by target_ranks (about 32 MiB of float64): bounds memory when
# U x N is large (e.g. 6,040 users x 3,707 items is 22M scores; larger catalogs are far worse).
RANK_CHUNK_ELEMENTS = 2 ** 22


def exclude_seen(scores: np.ndarray, seen: Sequence[Sequence[int]]) -> np.ndarray:
    """A copy of ``scores`` (``[U, N]``) with ``-inf`` at every item of ``seen[u]``: full ranking with the items a
    user already interacted with masked (the usual protocol on data without repeat consumption, such as MovieLens:
    the held-out item is never among them)."""
    masked = np.array(scores, dtype=np.float64 if np.asarray(scores).dtype == np.float64 else np.float32)
    for row, items in enumerate(seen):
        masked[row, np.asarray(items, dtype=np.int64)] = -np.inf
    return masked


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of ``targets[u]`` among all items of ``scores[u]`` (``[U, N]``), as ``int64[U]``.

    rank = #items with a strictly higher score + #items with an equal score and a smaller index. So rank 0 is the top,
    ties go to the smaller item index, and ``-inf`` scores sink below every finite score. NaN scores are refused.
    Rows are processed in chunks so no more than ``RANK_CHUNK_ELEMENTS`` comparisons are materialised at once.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets).astype(np.int64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [users, items], got shape {scores.shape}")
    num_users, num_items = scores.shape
    if targets.shape != (num_users,):
        raise ValueError(f"targets must be [{num_users}], got shape {targets.shape}")
    if num_users and (targets.min() < 0 or targets.max() >= num_items):
        raise ValueError(f"targets must lie in [0, {num_items})")

    ranks = np.empty(num_users, dtype=np.int64)
    rows_per_chunk = max(1, RANK_CHUNK_ELEMENTS // max(num_items, 1))
    item_index = np.arange(num_items)
    for start in range(0, num_users, rows_per_chunk):
        block = scores[start:start + rows_per_chunk]
        block_targets = targets[start:start + rows_per_chunk]
        if np.isnan(block).any():
            raise ValueError("scores contain NaN; rank is undefined")
        target_scores = block[np.arange(len(block)), block_targets][:, None]
        higher = (block > target_scores).sum(axis=1)
        tied_before = ((block == target_scores) & (item_index[None, :] < block_targets[:, None])).sum(axis=1)
        ranks[start:start + len(block)] = higher + tied_before
    return ranks


def _per_user_metrics(ranks: np.ndarray, ks: Sequence[int]) -> Dict[str, np.ndarray]:
    """Each metric's value for each user (``float64[U]``), in the order recall@k..., ndcg@k..."""
    ranks = np.asarray(ranks, dtype=np.int64)
    values = {}
    for k in ks:
        values[f"recall@{k}"] = (ranks < k).astype(np.float64)
    for k in ks:
        values[f"ndcg@{k}"] = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return values


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> Dict[str, float]:
    """Recall@k and NDCG@k (means over users, one relevant item each) for every k, plus ``users`` (the count)."""
    per_user = _per_user_metrics(ranks, ks)
    metrics: Dict[str, float] = {name: float(values.mean()) if len(values) else float("nan")
                                 for name, values in per_user.items()}
    metrics["users"] = int(len(np.asarray(ranks)))
    return metrics


def bootstrap_ci(ranks: np.ndarray, ks: Sequence[int] = KS, draws: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Dict[str, List[float]]:
    """Percentile-bootstrap confidence interval ``[lo, hi]`` of every metric of :func:`metrics_from_ranks`.

    Each draw resamples the users with replacement and recomputes the means; the interval is the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles of the draws. Seeded (``np.random.default_rng(seed)``), so repeatable. Draws are
    vectorised in blocks to bound memory (a block holds ``block x U x metrics`` values).
    """
    per_user = _per_user_metrics(ranks, ks)
    names = list(per_user)
    values = np.stack([per_user[name] for name in names], axis=1)  # [U, metrics]
    num_users = len(values)
    if num_users == 0:
        return {name: [float("nan"), float("nan")] for name in names}
    rng = np.random.default_rng(seed)
    draw_block = max(1, min(draws, 2 ** 22 // (num_users * len(names))))
    draw_means = []
    for start in range(0, draws, draw_block):
        count = min(draw_block, draws - start)
        resampled_users = rng.integers(0, num_users, size=(count, num_users))
        draw_means.append(values[resampled_users].mean(axis=1))  # [count, metrics]
    draw_means = np.concatenate(draw_means, axis=0)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draw_means, [tail, 1.0 - tail], axis=0)
    return {name: [float(lo[i]), float(hi[i])] for i, name in enumerate(names)}


def most_popular_scores(train_item_counts: np.ndarray) -> np.ndarray:
    """The popularity baseline: every user gets the same scores, the items' training counts (``float64[N]``).

    Broadcast to ``[U, N]`` (e.g. ``np.broadcast_to``) for :func:`target_ranks`, whose index tie-break orders items
    with equal counts.
    """
    return np.asarray(train_item_counts, dtype=np.float64).copy()
