"""Quality metrics for Semantic IDs, and the disambiguation code that makes full SIDs unique.

Everything here works on plain ``int[N, L]`` code matrices (one row per item, one column per RQ level), so the
same numbers can be computed for an RQ-VAE, an RQ-KMeans baseline, or SIDs read back from a table.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np


def _as_code_matrix(codes: Any) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D [num_items, levels] array, got shape {codes.shape}")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    return codes.astype(np.int64, copy=False)


def _group_sizes_of_rows(rows: np.ndarray) -> np.ndarray:
    """For every row, how many rows (itself included) are identical to it."""
    if rows.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)]


def sid_metrics(codes: Any, codebook_size: int,
                reconstruction_mse: Optional[float] = None) -> Dict[str, Any]:
    """Codebook usage and SID uniqueness figures for a ``[N, L]`` code matrix.

    Returns a JSON-serialisable dict:
      * ``num_items``, ``levels``, ``codebook_size``
      * ``utilisation_per_level``: fraction of the ``codebook_size`` codes used at least once, per level
      * ``normalized_entropy_per_level``: entropy of the code distribution / log(codebook_size) (1.0 = uniform)
      * ``perplexity_per_level``: exp(entropy), the "effective number of codes" in use
      * ``unique_sids``: number of distinct full SIDs
      * ``full_sid_collision_rate``: fraction of items whose full SID is shared with at least one other item
      * ``max_items_per_sid``: size of the largest full-SID bucket (needed width of the disambiguation code)
      * ``prefix_collision_rate``: list over prefix lengths 1..L, fraction of items sharing that prefix with
        another item (the last entry equals ``full_sid_collision_rate``)
      * ``reconstruction_mse``: passed through (``None`` when not given)
    """
    codes = _as_code_matrix(codes)
    if codebook_size <= 0:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    num_items, levels = codes.shape
    if num_items and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got range [{codes.min()}, {codes.max()}]")

    utilisation, normalized_entropy, perplexity = [], [], []
    for level in range(levels):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        probabilities = counts[counts > 0] / max(num_items, 1)
        entropy = float(-(probabilities * np.log(probabilities)).sum()) if num_items else 0.0
        utilisation.append(float((counts > 0).sum() / codebook_size))
        # log(1) = 0: a single-code book is trivially "uniform".
        normalized_entropy.append(entropy / math.log(codebook_size) if codebook_size > 1 else 1.0)
        perplexity.append(float(math.exp(entropy)))

    prefix_collision_rate = []
    for prefix_length in range(1, levels + 1):
        sizes = _group_sizes_of_rows(codes[:, :prefix_length])
        prefix_collision_rate.append(float((sizes > 1).sum() / num_items) if num_items else 0.0)

    full_sizes = _group_sizes_of_rows(codes)
    unique_sids = int(np.unique(codes, axis=0).shape[0]) if num_items else 0
    return {
        "num_items": int(num_items),
        "levels": int(levels),
        "codebook_size": int(codebook_size),
        "utilisation_per_level": utilisation,
        "normalized_entropy_per_level": normalized_entropy,
        "perplexity_per_level": perplexity,
        "unique_sids": unique_sids,
        "full_sid_collision_rate": float((full_sizes > 1).sum() / num_items) if num_items else 0.0,
        "max_items_per_sid": int(full_sizes.max()) if num_items else 0,
        "prefix_collision_rate": prefix_collision_rate,
        "reconstruction_mse": None if reconstruction_mse is None else float(reconstruction_mse),
    }


def disambiguate(codes: Any, sort_key: Optional[Sequence[Any]] = None) -> np.ndarray:
    """Deterministic disambiguation code: ``int32[N]`` such that (full SID, code) is unique per item.

    Items sharing a full SID get 0, 1, 2, ... in the order of ``sort_key`` (e.g. the video ids; any sortable
    values, strings included). Ties in ``sort_key``, or no key at all, fall back to row order. The result depends
    only on the (SID, key) pairs, so re-running on the same catalogue in another order reproduces it when the
    keys are unique.
    """
    codes = _as_code_matrix(codes)
    num_items = codes.shape[0]
    row_index = np.arange(num_items)
    if sort_key is None:
        key_rank = row_index
    else:
        sort_key = np.asarray(sort_key)
        if sort_key.shape != (num_items,):
            raise ValueError(f"sort_key must have shape ({num_items},), got {sort_key.shape}")
        # Ranks instead of raw keys so that strings and numbers are handled alike by lexsort.
        _, key_rank = np.unique(sort_key, return_inverse=True)
        key_rank = key_rank.reshape(-1)
    # np.lexsort sorts by the LAST key first: SID columns (level 0 most significant), then key, then row.
    order = np.lexsort((row_index, key_rank) + tuple(codes[:, level] for level in reversed(range(codes.shape[1]))))
    sorted_codes = codes[order]
    starts_group = np.ones(num_items, dtype=bool)
    if num_items > 1:
        starts_group[1:] = np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(starts_group, row_index, 0))
    result = np.empty(num_items, dtype=np.int32)
    result[order] = (np.arange(num_items) - group_start).astype(np.int32)
    return result


def label_agreement(codes: Any, labels: Any, prefix_length: int = 1, block_rows: int = 1024) -> Dict[str, float]:
    """How semantically coherent SID prefixes are, measured against item labels (e.g. genres).

    ``labels`` is a boolean ``[N, C]`` multi-hot matrix. Returns the fraction of item pairs sharing the first
    ``prefix_length`` codes that share at least one label (``same_prefix_agreement``), the same fraction over all
    item pairs (``all_pairs_agreement``, the random-pair baseline) and the pair counts. All pairs are counted
    exactly, in row blocks: O(N^2) time, O(block_rows * N) memory -- fine for catalogues up to tens of thousands.
    """
    codes = _as_code_matrix(codes)
    labels = np.asarray(labels, dtype=bool)
    num_items = codes.shape[0]
    if labels.ndim != 2 or labels.shape[0] != num_items:
        raise ValueError(f"labels must be [num_items, num_labels] = [{num_items}, C], got {labels.shape}")
    if not 1 <= prefix_length <= codes.shape[1]:
        raise ValueError(f"prefix_length must be in [1, {codes.shape[1]}], got {prefix_length}")
    _, prefix_group = np.unique(codes[:, :prefix_length], axis=0, return_inverse=True)
    prefix_group = prefix_group.reshape(-1)
    label_matrix = labels.astype(np.float32)

    same_pairs = same_agree = all_pairs = all_agree = 0
    for start in range(0, num_items, block_rows):
        stop = min(start + block_rows, num_items)
        shares_label = (label_matrix[start:stop] @ label_matrix.T) > 0  # [rows, N]
        # Count each unordered pair once: column index strictly greater than the row index.
        upper = np.arange(num_items)[None, :] > np.arange(start, stop)[:, None]
        same_prefix = prefix_group[start:stop, None] == prefix_group[None, :]
        all_pairs += int(upper.sum())
        all_agree += int((shares_label & upper).sum())
        same_pairs += int((same_prefix & upper).sum())
        same_agree += int((shares_label & same_prefix & upper).sum())
    return {
        "same_prefix_pairs": same_pairs,
        "same_prefix_agreement": same_agree / same_pairs if same_pairs else float("nan"),
        "all_pairs": all_pairs,
        "all_pairs_agreement": all_agree / all_pairs if all_pairs else float("nan"),
    }
