"""Collapse diagnostics: do the user representations differ between users?

    python -m tokenminds_model.diagnostics --output_root=workdir/out --date=2026-01-08 \
        [--perturbed_representations=DIR] [--output=diagnostics.json]

Reads the ``pipelines.refresh_users`` output of one day (``<output_root>/user_representations/date=D/*.parquet``,
``schemas.USER_REPRESENTATIONS_SCHEMA``), prints a short report and, with ``--output``, writes it as JSON.

Per scenario (``token_diversity``), over each user's ranked tokens (rank 0 = best):
  distinct_tokens     distinct tokens over all users and ranks (a collapsed model reuses a handful)
  distinct_per_rank   distinct tokens at rank r across users; rank 0 is the user's single best token
  top_token_share     share of users whose token set holds the most common token
  shared_by_all       tokens that every user holds
  rank0_top_share     share of users whose rank-0 token is the most common rank-0 token
  mean_jaccard        mean Jaccard similarity of two users' token sets (1 = identical sets, 0 = disjoint)
Embeddings (``embedding_spread``):
  mean_pairwise_cosine        mean cosine of two different users' embeddings (1 = every user the same vector)
  mean_self_cosine_perturbed  mean cosine of a user's embedding with the same user's embedding from a perturbed
                              history (only when perturbed embeddings are given: ``--perturbed_representations``,
                              a second refresh_users partition over perturbed histories, joined on user_id)
  separation                  self - pairwise: a representation that tells users apart has self >> pairwise

Pairs of users are ``pairs`` seeded random pairs of two distinct users, or every pair when there are at most
``pairs`` of them (then the value is exact). The core functions are plain NumPy; the reader needs pyarrow only.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import glob
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_PAIRS = 2000
# The verdict's thresholds: tokens are "not personalised" when most users share one best token, when two users'
# token sets overlap by half or more on average, or when some token is held by every user of a large population.
COLLAPSED_RANK0_SHARE = 0.5
COLLAPSED_MEAN_JACCARD = 0.5
SHARED_BY_ALL_MIN_USERS = 100
CLOSE_EMBEDDINGS_COSINE = 0.5


# ---------------------------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------------------------
def user_pairs(n: int, pairs: int = DEFAULT_PAIRS, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j, of n users: every unordered pair when there are at most ``pairs`` of them,
    otherwise ``pairs`` seeded uniform random pairs of two distinct users. Empty when n < 2."""
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n * (n - 1) // 2 <= pairs:
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=pairs)
    j = (i + rng.integers(1, n, size=pairs)) % n  # uniform over the other n - 1 users
    return i, j


def token_diversity(tokens_by_user: Sequence[Sequence[str]], pairs: int = DEFAULT_PAIRS, seed: int = 0
                    ) -> Dict[str, Any]:
    """How much one scenario's user tokens differ between users.

    ``tokens_by_user[u]``: user u's token strings, best first (rank 0 first). Returns ``users``, ``distinct_tokens``
    (over all users and ranks), ``distinct_per_rank`` (distinct tokens at rank r among the users that have a rank r),
    ``top_token_share`` (share of users whose token set holds the single most common token), ``shared_by_all``
    (tokens every user holds), ``rank0_top_share`` (share of users whose rank-0 token is the most common rank-0
    token) and ``mean_jaccard`` (mean Jaccard similarity of two users' token sets over ``user_pairs``; two empty
    sets count as identical; None with fewer than two users)."""
    sets = [set(tokens) for tokens in tokens_by_user]
    users = len(sets)
    holders = collections.Counter(token for s in sets for token in s)  # users holding each token
    depth = max((len(tokens) for tokens in tokens_by_user), default=0)
    distinct_per_rank = [len({tokens[r] for tokens in tokens_by_user if len(tokens) > r}) for r in range(depth)]
    rank0 = collections.Counter(tokens[0] for tokens in tokens_by_user if len(tokens))
    i, j = user_pairs(users, pairs, seed)
    jaccards = [len(sets[a] & sets[b]) / len(sets[a] | sets[b]) if sets[a] | sets[b] else 1.0 for a, b in zip(i, j)]
    return {"users": users,
            "distinct_tokens": len(holders),
            "distinct_per_rank": distinct_per_rank,
            "top_token_share": holders.most_common(1)[0][1] / users if holders else 0.0,
            "shared_by_all": sum(1 for count in holders.values() if count == users) if users else 0,
            "rank0_top_share": rank0.most_common(1)[0][1] / users if rank0 else 0.0,
            "mean_jaccard": float(np.mean(jaccards)) if jaccards else None}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedding_spread(embeddings: np.ndarray, perturbed: Optional[np.ndarray] = None, pairs: int = DEFAULT_PAIRS,
                     seed: int = 0) -> Dict[str, Any]:
    """How far apart the users' embeddings are.

    ``embeddings``: float[users, dim]; ``perturbed``: None, or float[users, dim], row u = user u's embedding from a
    perturbed history (e.g. some watches dropped). Returns ``users``, ``mean_pairwise_cosine`` (over ``user_pairs``
    of two distinct users; None with fewer than two users), ``mean_self_cosine_perturbed`` (mean over users of the
    cosine of a user's two embeddings; None without ``perturbed``) and ``separation`` = self - pairwise (None unless
    both are known). A representation that distinguishes users has self >> pairwise."""
    unit = _unit_rows(np.asarray(embeddings).reshape(len(embeddings), -1))
    i, j = user_pairs(len(unit), pairs, seed)
    pairwise = float(np.mean(np.sum(unit[i] * unit[j], axis=1))) if len(i) else None
    self_cos = None
    if perturbed is not None:
        other = _unit_rows(np.asarray(perturbed).reshape(len(perturbed), -1))
        if other.shape != unit.shape:
            raise ValueError(f"perturbed embeddings {other.shape} do not match the embeddings {unit.shape}")
        self_cos = float(np.mean(np.sum(unit * other, axis=1))) if len(unit) else None
    separation = self_cos - pairwise if self_cos is not None and pairwise is not None else None
    return {"users": int(len(unit)), "mean_pairwise_cosine": pairwise, "mean_self_cosine_perturbed": self_cos,
            "separation": separation}


def collapse_reasons(diversity: Mapping[str, Any]) -> List[str]:
    """Why one scenario's ``token_diversity`` counts as collapsed (empty: its tokens are personalised)."""
    reasons = []
    if diversity["rank0_top_share"] >= COLLAPSED_RANK0_SHARE:
        reasons.append(f"{diversity['rank0_top_share']:.0%} of users share one rank-0 token")
    if (diversity["mean_jaccard"] or 0.0) >= COLLAPSED_MEAN_JACCARD:
        reasons.append(f"two users' token sets overlap by {diversity['mean_jaccard']:.0%} (Jaccard)")
    if diversity["users"] >= SHARED_BY_ALL_MIN_USERS and diversity["shared_by_all"] > 0:
        reasons.append(f"{diversity['shared_by_all']} token(s) held by every user")
    return reasons


def collapse_report(tokens_by_scenario: Mapping[str, Sequence[Sequence[str]]], embeddings: np.ndarray,
                    perturbed: Optional[np.ndarray] = None, pairs: int = DEFAULT_PAIRS, seed: int = 0
                    ) -> Dict[str, Any]:
    """``token_diversity`` per scenario and ``embedding_spread``, plus a verdict.

    Returns ``{"users", "scenarios": {scenario: token_diversity}, "embedding": embedding_spread,
    "personalised": {scenario: bool}, "collapse_reasons": {scenario: [reason]}, "embeddings_close": bool | None}``:
    a scenario's tokens are not personalised
    when ``rank0_top_share >= COLLAPSED_RANK0_SHARE``, ``mean_jaccard >= COLLAPSED_MEAN_JACCARD``, or (with at least
    ``SHARED_BY_ALL_MIN_USERS`` users) some token is held by every user; embeddings are close when their mean
    pairwise cosine is at least ``CLOSE_EMBEDDINGS_COSINE``."""
    scenarios = {name: token_diversity(tokens, pairs, seed) for name, tokens in sorted(tokens_by_scenario.items())}
    spread = embedding_spread(embeddings, perturbed, pairs, seed)
    reasons = {name: collapse_reasons(d) for name, d in scenarios.items()}
    close = None if spread["mean_pairwise_cosine"] is None \
        else spread["mean_pairwise_cosine"] >= CLOSE_EMBEDDINGS_COSINE
    return {"users": spread["users"], "scenarios": scenarios, "embedding": spread,
            "personalised": {name: not why for name, why in reasons.items()}, "collapse_reasons": reasons,
            "embeddings_close": close}


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a few human-readable lines: one per scenario, one for the embeddings, one verdict per
    scenario."""
    users = report["users"]
    lines = [f"collapse diagnostics over {users:,} users"]
    for name, d in report["scenarios"].items():
        ranks = d["distinct_per_rank"]
        shown = ", ".join(str(n) for n in ranks[:5]) + (", ..." if len(ranks) > 5 else "")
        lines.append(f"  {name} tokens: {d['distinct_tokens']} distinct; distinct per rank [{shown}]; "
                     f"rank-0: {ranks[0] if ranks else 0} distinct, the most common held by "
                     f"{d['rank0_top_share']:.0%} of users; most common token held by {d['top_token_share']:.0%}; "
                     f"held by every user: {d['shared_by_all']}; mean Jaccard of two users {_num(d['mean_jaccard'])}")
    e = report["embedding"]
    perturbed = "perturbed: not computed" if e["mean_self_cosine_perturbed"] is None else \
        f"mean cosine with own perturbed history {_num(e['mean_self_cosine_perturbed'])}, " \
        f"separation {_num(e['separation'])}"
    lines.append(f"  embeddings: mean cosine of two users {_num(e['mean_pairwise_cosine'])}; {perturbed}")
    for name, d in report["scenarios"].items():
        ranks = d["distinct_per_rank"]
        why = report["collapse_reasons"][name]
        state = f"NOT personalised: {'; '.join(why)}" if why else "personalised (they differ between users)"
        lines.append(f"  {name}: distinct rank-0 tokens: {ranks[0] if ranks else 0} of {d['users']:,} users; "
                     f"tokens are {state}")
    if report["embeddings_close"]:
        lines.append(f"  embeddings: two users' embeddings have mean cosine >= {CLOSE_EMBEDDINGS_COSINE}: "
                     "they are close together")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Reading refresh_users output.
# ---------------------------------------------------------------------------------------------------------------
def representations_dir(output_root: str, date: dt.date | str) -> str:
    """``<output_root>/user_representations/date=D``, the partition ``pipelines.refresh_users`` writes."""
    from transforms import schemas
    return schemas.partition_dir(output_root, schemas.USER_REPRESENTATIONS, date)


def read_job_output(directory: str, columns: Sequence[str], job: str = "job") -> "pa.Table":
    """The ``columns`` of one complete Parquet job output (a local partition directory whose ``_SUCCESS`` is
    present), its shards in name order; raises ``FileNotFoundError`` naming the directory otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not os.path.exists(os.path.join(directory, "_SUCCESS")):
        raise FileNotFoundError(f"{directory} is not a complete {job} output (no _SUCCESS)")
    files = sorted(glob.glob(os.path.join(directory, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {directory}")
    return pa.concat_tables([pq.read_table(path, columns=list(columns)) for path in files])


def read_representations(directory: str) -> Tuple[List[str], Dict[str, List[List[str]]], np.ndarray]:
    """One refresh_users partition (local directory of ``*.parquet``, complete: ``_SUCCESS`` present) ->
    (user ids sorted, ``{scenario: [user's tokens by rank]}`` in that user order, embeddings float32[users, dim]).
    A user without tokens of a scenario has an empty list there."""
    rows = read_job_output(directory, ["user_id", "embedding", "user_tokens"], "refresh_users").to_pylist()
    rows.sort(key=lambda row: row["user_id"])
    scenarios = sorted({t["scenario"] for row in rows for t in row["user_tokens"] or []})
    tokens = {s: [[t["token"] for t in sorted((t for t in row["user_tokens"] or [] if t["scenario"] == s),
                                               key=lambda t: t["rank"])] for row in rows] for s in scenarios}
    embeddings = np.asarray([row["embedding"] for row in rows], np.float32)
    return [row["user_id"] for row in rows], tokens, embeddings


def aligned_perturbed(user_ids: Sequence[str], directory: str) -> np.ndarray:
    """The embeddings of another refresh_users partition (e.g. a refresh over perturbed histories) in the order of
    ``user_ids``; every user must be there."""
    other_ids, _, other = read_representations(directory)
    index = {user: k for k, user in enumerate(other_ids)}
    missing = [user for user in user_ids if user not in index]
    if missing:
        raise ValueError(f"{len(missing)} user(s) missing from {directory}, e.g. {missing[:3]}")
    return other[[index[user] for user in user_ids]]


def diagnose(output_root: str, date: dt.date | str, perturbed_dir: Optional[str] = None,
             pairs: int = DEFAULT_PAIRS, seed: int = 0) -> Dict[str, Any]:
    """``collapse_report`` of the refresh_users output of ``date`` under ``output_root``, with ``date`` and the
    directory read added."""
    directory = representations_dir(output_root, date)
    user_ids, tokens, embeddings = read_representations(directory)
    perturbed = aligned_perturbed(user_ids, perturbed_dir) if perturbed_dir else None
    report = collapse_report(tokens, embeddings, perturbed, pairs, seed)
    return {"date": str(date), "representations": directory, **report}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_root", required=True, help="The refresh_users --output_root.")
    parser.add_argument("--date", required=True, type=dt.date.fromisoformat, help="The refreshed day, YYYY-MM-DD.")
    parser.add_argument("--perturbed_representations", default=None,
                        help="A second refresh_users partition directory, over perturbed histories of the same "
                             "users, for the self-vs-pairwise separation. Without it: 'perturbed: not computed'.")
    parser.add_argument("--output", default=None, help="Also write the report as JSON to this file.")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    report = diagnose(args.output_root, args.date, args.perturbed_representations, args.pairs, args.seed)
    print(format_report(report))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        print(f"  written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
