"""Downstream ranking study: do TokenMinds user representations make a ranker better? (the paper's RQ1 / RQ2)

    python -m tokenminds_model.downstream --output_root=workdir/out --refresh_date=2026-01-08 \
        --model=workdir/out/models/date=2026-01-07 --output=workdir/out/downstream/date=2026-01-08 \
        [--seeds=5] [--label_days=1]

The setting is the paper's: a refresh as of day D (``pipelines.refresh_users`` over the history snapshot at the end
of D) serves the rankers of the following day. For every user with a representation and at least one engagement in
the label window (D+1 .. D+label_days), the study ranks that user's candidates:

- positives: items the user engaged with in the window (watch ratio >= ``min_watch_ratio``; on MovieLens imports the
  ratio is rating / 5, so 0.8 = four stars), at most ``max_positives`` of them;
- real negatives: items the user watched in the window below that ratio (at most ``max_positives``);
- sampled negatives: ``negatives`` catalogue items the user did not watch in the window, uniform, seeded.

A small ranker (:class:`Ranker`, Flax) scores (user, item) pairs; the item side is always the item's content
embedding; the user side is, variant by variant (``VARIANTS``):

  base         what a production ranker already has: the mean content embedding of the user's last
               ``recent_watches`` watches and log(1 + history length)
  +emb         + the TokenMinds user embedding
  +EM          + tokens via static prefix-embedding mapping: each scenario's decoded prefixes pooled over the
               ``build_adaptation`` prefix-embedding table (score-weighted)
  +LE          + tokens via learnable embeddings: each decoded prefix's SID n-gram ids and SID SentencePiece ids
               (``build_adaptation`` artifacts), one embedding table learned end to end, mean-pooled per user
  +emb+EM      embedding and EM tokens together
  +emb+LE      embedding and LE tokens together

Protocol, per seed: users are split 70 / 10 / 20 into train / validation / test by a seeded permutation; sampled
negatives are drawn with the seed; the ranker is trained with binary cross-entropy (Adam), evaluated on the
validation users after every epoch, and the epoch with the best validation log loss is kept (patience
``patience``). Test metrics: AUC over all test pairs, mean log loss, and NDCG@10 of each test user's candidate list
averaged over users. Every variant of a seed sees the same split, candidates and initialisation seed, so variants are
compared paired: the relative lift over base is computed per seed, and every figure is reported as the mean over
seeds with a 95% Student-t interval over seeds.

Reads only files (pyarrow, no Beam): ``user_representations/date=D``, ``histories/date=D``,
``validated/videos/date<=D+label_days``, ``validated/watch_events/date=D+1..``, ``adaptation/date=D``. Writes
``metrics.json`` (every seed's figures and the summary), ``report.md`` and ``downstream.png``. With ``--model`` (the
checkpoint the refresh ran) it first checks that the model trained only on days before D
(:func:`check_model_saw_no_labels`); the report also repeats the refresh's collapse diagnostics where
``tokenminds_model.diagnostics --output`` wrote them beside its run summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import glob
import json
import math
import os
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenminds_model import adaptation
from tokenminds_model.diagnostics import read_job_output

# Variant name -> user-side feature groups. "base" is in every variant, so lifts are over what a ranker has anyway.
VARIANTS: Dict[str, Tuple[str, ...]] = {
    "base": ("base",),
    "+emb": ("base", "emb"),
    "+EM": ("base", "em"),
    "+LE": ("base", "le"),
    "+emb+EM": ("base", "emb", "em"),
    "+emb+LE": ("base", "emb", "le"),
}
METRICS = ("auc", "log_loss", "ndcg@10")
HIGHER_IS_BETTER = {"auc": True, "log_loss": False, "ndcg@10": True}
SPLIT = (0.7, 0.1, 0.2)  # train / validation / test users


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    seeds: int = 5
    negatives: int = 20  # sampled catalogue negatives per user
    max_positives: int = 10  # per user, and as many real (watched, not engaged) negatives at most
    min_watch_ratio: float = 0.5
    recent_watches: int = 50
    hidden: int = 64
    token_dim: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 512
    max_epochs: int = 30
    patience: int = 3

    def __post_init__(self):
        if self.seeds < 2:
            raise ValueError(f"seeds must be >= 2 for an interval over seeds, got {self.seeds}")
        for name in ("negatives", "max_positives", "recent_watches", "hidden", "token_dim", "batch_size",
                     "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.min_watch_ratio <= 2.0:
            raise ValueError(f"min_watch_ratio must be in (0, 2], got {self.min_watch_ratio}")


# ---------------------------------------------------------------------------------------------------------------
# The study's data: plain arrays.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StudyData:
    """Everything the rankers see, aligned by user index u (0..U-1) and item index i (0..N-1)."""
    user_ids: List[str]
    item_ids: List[str]
    item_embeddings: np.ndarray  # float32[N, D] content embeddings
    groups: Dict[str, np.ndarray]  # dense user features: "base" [U, D+1], "emb" [U, E], "em" [U, S*D]
    token_ids: np.ndarray  # int32[U, T] learnable-token ids (LE), -1 = padding
    token_vocab: int  # size of the LE id space
    positives: List[np.ndarray]  # per user: engaged item indices in the label window
    watched: List[np.ndarray]  # per user: every item index watched in the label window (engaged or not)
    description: Dict[str, object]  # what was read, for the report


def read_catalog(validated_root: str, last_day: dt.date) -> Tuple[List[str], np.ndarray]:
    """Every validated video published on or before ``last_day`` -> (video ids, float32[N, D]); the first copy of a
    republished id is kept (partitions in date order, ids sorted within the result)."""
    tables = []
    for path in sorted(glob.glob(os.path.join(validated_root, "videos", "date=*"))):
        if dt.date.fromisoformat(path.rsplit("date=", 1)[1]) <= last_day:
            tables.append(read_job_output(path, ["video_id", "content_embedding"]))
    if not tables:
        raise FileNotFoundError(f"no validated videos on or before {last_day} under {validated_root}")
    table = pa.concat_tables(tables)
    ids = table.column("video_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)  # sorted unique ids, index of the first copy
    table = table.take(pa.array(first))
    embeddings = table.column("content_embedding").combine_chunks()
    dim = len(embeddings[0]) if len(embeddings) else 0
    return table.column("video_id").to_pylist(), embeddings.flatten().to_numpy().reshape(-1, dim).astype(np.float32)


def _index_of(values: pa.Array, item_index: Mapping[str, int]) -> np.ndarray:
    """Indices (``item_index`` values) of ids, -1 for ids not in it."""
    found = pc.index_in(values, value_set=pa.array(list(item_index), pa.string())).fill_null(-1).to_numpy(
        zero_copy_only=False).astype(np.int64)
    positions = np.asarray(list(item_index.values()), np.int64)
    return np.where(found >= 0, positions[np.maximum(found, 0)], -1)


def recent_history_features(histories: pa.Table, user_index: Mapping[str, int], item_index: Mapping[str, int],
                            item_embeddings: np.ndarray, recent: int) -> np.ndarray:
    """The base group: [mean content embedding of the user's last ``recent`` watches in the catalog,
    log(1 + history length)] per user, float32[U, D+1]; zeros for a user without a snapshot row."""
    out = np.zeros((len(user_index), item_embeddings.shape[1] + 1), np.float32)
    watches = histories.column("watches").combine_chunks()
    users = histories.column("user_id").to_pylist()
    offsets = watches.offsets.to_numpy()
    items = _index_of(watches.flatten().field("video_id"), item_index)
    for row, user in enumerate(users):
        u = user_index.get(user)
        if u is None:
            continue
        start, end = offsets[row], offsets[row + 1]
        last = items[max(start, end - recent):end]
        last = last[last >= 0]
        if len(last):
            out[u, :-1] = item_embeddings[last].mean(axis=0)
        out[u, -1] = math.log1p(end - start)
    return out


def token_features(user_tokens: Sequence[Sequence[Mapping]], scenarios: Sequence[str],
                   prefix_table: adaptation.PrefixEmbeddingTable, ngram_vocab: adaptation.SidNgramVocab,
                   pieces: adaptation.SidPieceModel) -> Tuple[np.ndarray, np.ndarray, int]:
    """Each user's decoded tokens as (EM float32[U, S*D], LE ids int32[U, T] padded with -1, LE vocabulary size).

    EM: per scenario, the score-weighted pool of the prefixes' table embeddings (``pool_prefix_embeddings``).
    LE: per token, its SID n-gram ids and its SentencePiece piece ids (offset past the n-gram ids), offset again by
    scenario so the same codes in LFV and SFV learn separate embeddings; OOV / <unk> ids are dropped."""
    per_scenario = ngram_vocab.size + pieces.vocab_size
    lookups = {s: prefix_table.for_scenario(s) for s in scenarios}
    em = np.zeros((len(user_tokens), len(scenarios) * prefix_table.dim), np.float32)
    bags: List[List[int]] = []
    for u, tokens in enumerate(user_tokens):
        bag = []
        for k, scenario in enumerate(scenarios):
            mine = sorted((t for t in tokens or [] if t["scenario"] == scenario), key=lambda t: t["rank"])
            if not mine:
                continue
            if len({len(t["sid"]) for t in mine}) > 1:
                raise ValueError(f"user {u}: {scenario} tokens of different prefix lengths; one refresh decodes "
                                 "one prefix length per scenario")
            codes = np.asarray([t["sid"] for t in mine], np.int64)
            scores = np.asarray([t["score"] for t in mine], np.float64)
            em[u, k * prefix_table.dim:(k + 1) * prefix_table.dim] = adaptation.pool_prefix_embeddings(
                codes, scores, lookups[scenario], "score_weighted", dim=prefix_table.dim)
            for t in mine:
                ids = [i for i in ngram_vocab.encode(t["sid"]) if i != adaptation.OOV_ID]
                ids += [ngram_vocab.size + i for i in pieces.encode(t["sid"]) if i != 0]
                bag += [k * per_scenario + i for i in ids]
        bags.append(bag)
    width = max([len(b) for b in bags] + [1])
    ids = np.full((len(bags), width), -1, np.int32)
    for u, bag in enumerate(bags):
        ids[u, :len(bag)] = bag
    return em, ids, len(scenarios) * per_scenario


def label_window(validated_root: str, days: Sequence[dt.date], user_index: Mapping[str, int],
                 item_index: Mapping[str, int], min_watch_ratio: float) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(engaged items, watched items) per user over the label days' validated watches (catalog items only)."""
    tables = [read_job_output(os.path.join(validated_root, "watch_events", f"date={d.isoformat()}"),
                              ["user_id", "video_id", "watch_time_s", "video_duration_s"]) for d in days]
    table = pa.concat_tables(tables)
    users = _index_of(table.column("user_id").combine_chunks(), user_index)
    items = _index_of(table.column("video_id").combine_chunks(), item_index)
    watch = table.column("watch_time_s").to_numpy(zero_copy_only=False).astype(np.float64)
    duration = table.column("video_duration_s").to_numpy(zero_copy_only=False).astype(np.float64)
    ratio = np.where(duration > 0, watch / np.where(duration > 0, duration, 1.0), 0.0)
    keep = (users >= 0) & (items >= 0)
    users, items, engaged = users[keep], items[keep], ratio[keep] >= min_watch_ratio
    # Each user's rows once (sorted by user), rather than a scan of every row per user.
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(len(user_index) + 1))
    rows = [order[bounds[u]:bounds[u + 1]] for u in range(len(user_index))]
    return [np.unique(items[r[engaged[r]]]) for r in rows], [np.unique(items[r]) for r in rows]


def check_model_saw_no_labels(model_dir: str, output_root: str, refresh_date: dt.date) -> Dict[str, object]:
    """The model behind the refresh must not have trained on the label window, or the study measures leakage.

    An example of day d is cut inside d and takes look-ahead targets from the 24 hours after the cutoff, i.e. from
    d and d+1; so a model whose training days include D (or later) has seen the engagements of D+1 the study scores.
    Production has the same cadence: the nightly refresh of D uses the model trained through D-1. Also checks that
    ``model_dir`` is the checkpoint the refresh ran (its version is in the refresh summary). Returns what was checked.
    """
    from tokenminds_model.model_checkpoints import read_checkpoint_document
    from transforms import schemas

    document = read_checkpoint_document(model_dir, verify=False)
    summary_path = schemas.run_summary_path(output_root, schemas.USER_REPRESENTATIONS, refresh_date)
    with open(summary_path) as handle:
        refreshed_with = json.load(handle).get("versions", {}).get("model")
    if refreshed_with != document["version"]:
        raise ValueError(f"{model_dir} (version {document['version']}) is not the model of the refresh of "
                         f"{refresh_date} (version {refreshed_with}, {summary_path})")
    days = sorted(document.get("training_days", []))
    late = [day for day in days if dt.date.fromisoformat(day) >= refresh_date]
    if late:
        raise ValueError(f"{model_dir} trained on examples of {late}, whose look-ahead targets reach the label window "
                         f"(after {refresh_date}): train through {refresh_date - dt.timedelta(days=1)} at the latest")
    return {"model": model_dir, "version": document["version"], "training_days": days}


def load_study_data(output_root: str, refresh_date: dt.date, label_days: int, config: StudyConfig,
                    validated_root: Optional[str] = None) -> StudyData:
    """Read one refresh and its label window into arrays; users without an engagement in the window are left out."""
    from transforms import schemas  # plain pyarrow: the layout's one definition

    validated_root = validated_root or os.path.join(output_root, "validated")
    days = [refresh_date + dt.timedelta(days=k) for k in range(1, label_days + 1)]
    reps = read_job_output(schemas.partition_dir(output_root, schemas.USER_REPRESENTATIONS, refresh_date),
                           ["user_id", "embedding", "user_tokens"], "refresh_users")
    reps = reps.take(pc.sort_indices(reps, [("user_id", "ascending")]))
    all_users = reps.column("user_id").to_pylist()
    item_ids, item_embeddings = read_catalog(validated_root, days[-1])
    item_index = {v: i for i, v in enumerate(item_ids)}
    positives, watched = label_window(validated_root, days, {u: k for k, u in enumerate(all_users)}, item_index,
                                      config.min_watch_ratio)
    keep = np.asarray([len(p) > 0 for p in positives], bool)
    reps = reps.filter(pa.array(keep))
    user_ids = reps.column("user_id").to_pylist()
    user_index = {u: k for k, u in enumerate(user_ids)}
    positives = [p for p, k in zip(positives, keep) if k]
    watched = [w for w, k in zip(watched, keep) if k]

    histories = read_job_output(schemas.partition_dir(output_root, schemas.HISTORIES, refresh_date),
                                ["user_id", "watches"], "update_histories")
    base = recent_history_features(histories, user_index, item_index, item_embeddings, config.recent_watches)
    embedding = reps.column("embedding").combine_chunks()
    emb = embedding.flatten().to_numpy().reshape(len(user_ids), -1).astype(np.float32)

    artifacts = schemas.partition_dir(output_root, schemas.ADAPTATION, refresh_date)
    if not os.path.exists(os.path.join(artifacts, "_SUCCESS")):
        raise FileNotFoundError(f"{artifacts} is not complete: run pipelines.build_adaptation --date={refresh_date}")
    prefix_table = adaptation.PrefixEmbeddingTable.from_parquet(os.path.join(artifacts, schemas.PREFIX_EMBEDDINGS))
    ngram_vocab = adaptation.SidNgramVocab.load(os.path.join(artifacts, adaptation.NGRAM_VOCAB_FILENAME))
    pieces = adaptation.SidPieceModel.load(artifacts)
    user_tokens = reps.column("user_tokens").to_pylist()
    scenarios = sorted({t["scenario"] for tokens in user_tokens for t in tokens or []})
    em, token_ids, token_vocab = token_features(user_tokens, scenarios, prefix_table, ngram_vocab, pieces)
    description = {
        "output_root": output_root, "refresh_date": refresh_date.isoformat(),
        "label_days": [d.isoformat() for d in days], "users_with_representations": len(all_users),
        "users": len(user_ids), "catalog_items": len(item_ids), "scenarios": scenarios,
        "engagements": int(sum(len(p) for p in positives)), "label_watches": int(sum(len(w) for w in watched)),
        "embedding_dim": int(emb.shape[1]), "content_dim": int(item_embeddings.shape[1]),
        "le_vocabulary": token_vocab, "le_ids_per_user": float((token_ids >= 0).sum(1).mean()) if len(user_ids)
        else 0.0, "prefix_table_rows": len(prefix_table)}
    return StudyData(user_ids, item_ids, item_embeddings, {"base": base, "emb": emb, "em": em}, token_ids,
                     token_vocab, positives, watched, description)


# ---------------------------------------------------------------------------------------------------------------
# Candidates and metrics (NumPy).
# ---------------------------------------------------------------------------------------------------------------
def build_candidates(positives: Sequence[np.ndarray], watched: Sequence[np.ndarray], num_items: int,
                     negatives: int, max_positives: int, rng: np.random.Generator
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, item index, label) per candidate row, grouped by user in user order. Per user: its positives
    and real negatives (watched, not engaged), each capped at ``max_positives`` by a seeded draw, then ``negatives``
    distinct items drawn uniformly from the catalogue items it did not watch in the window."""
    users, items, labels = [], [], []
    for u, (pos, seen) in enumerate(zip(positives, watched)):
        real_neg = np.setdiff1d(seen, pos)
        if len(pos) > max_positives:
            pos = np.sort(rng.choice(pos, max_positives, replace=False))
        if len(real_neg) > max_positives:
            real_neg = np.sort(rng.choice(real_neg, max_positives, replace=False))
        unseen = num_items - len(seen)
        if unseen < negatives:
            raise ValueError(f"the catalogue has {num_items} items: too few to draw {negatives} negatives per user")
        drawn: np.ndarray = np.zeros(0, np.int64)
        while len(drawn) < negatives:  # rejection: the window's items are few next to the catalogue
            more = rng.integers(0, num_items, size=2 * negatives)
            drawn = np.unique(np.concatenate([drawn, np.setdiff1d(more, seen)]))
        drawn = rng.permutation(drawn)[:negatives]
        row_items = np.concatenate([pos, real_neg, drawn]).astype(np.int64)
        users.append(np.full(len(row_items), u, np.int64))
        items.append(row_items)
        labels.append(np.concatenate([np.ones(len(pos)), np.zeros(len(real_neg) + len(drawn))]).astype(np.float32))
    return np.concatenate(users), np.concatenate(items), np.concatenate(labels)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN without both classes."""
    labels = np.asarray(labels) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(sorted_scores, return_inverse=True, return_counts=True)
    if (counts > 1).any():  # average ranks within ties
        first = np.cumsum(counts) - counts + 1
        ranks[order] = (first + (counts - 1) / 2.0)[inverse]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits), computed stably from the logits."""
    logits = np.asarray(logits, np.float64)
    return float(np.mean(np.logaddexp(0.0, logits) - np.asarray(labels, np.float64) * logits))


def mean_ndcg(users: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int = 10) -> float:
    """NDCG@k of each user's candidate list (binary relevance; ties broken by row order), averaged over users."""
    values = []
    for u in np.unique(users):
        rows = users == u
        rel = labels[rows][np.argsort(-scores[rows], kind="stable")][:k]
        ideal = np.sort(labels[rows])[::-1][:k]
        discounts = 1.0 / np.log2(np.arange(2, len(rel) + 2))
        best = float(ideal @ discounts[:len(ideal)])
        if best > 0:
            values.append(float(rel @ discounts[:len(rel)]) / best)
    return float(np.mean(values)) if values else float("nan")


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): a Student-t interval for the mean of independent seeds' values."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def split_users(num_users: int, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train / validation / test user indices in the ``SPLIT`` shares (each sorted)."""
    order = np.random.default_rng([seed, 1]).permutation(num_users)
    n_train, n_valid = int(round(SPLIT[0] * num_users)), int(round(SPLIT[1] * num_users))
    return (np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_valid]),
            np.sort(order[n_train + n_valid:]))


# ---------------------------------------------------------------------------------------------------------------
# The ranker (Flax) and its training.
# ---------------------------------------------------------------------------------------------------------------
def _ranker_module():
    import flax.linen as nn
    import jax.numpy as jnp

    class Ranker(nn.Module):
        """logit(user, item) = MLP([u, i, u * i]) with u = MLP(user dense features [+ mean learned token
        embedding]) and i = MLP(item content embedding): a small two-tower-with-interaction ranker."""
        hidden: int
        token_vocab: int  # 0: the variant has no learnable tokens
        token_dim: int

        @nn.compact
        def __call__(self, user_dense, token_ids, item):
            parts = [user_dense]
            if self.token_vocab:
                mask = (token_ids >= 0)[..., None]
                embedded = nn.Embed(self.token_vocab, self.token_dim, name="token_embedding")(
                    jnp.maximum(token_ids, 0)) * mask
                parts.append(embedded.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1))
            user = nn.relu(nn.Dense(self.hidden, name="user")(jnp.concatenate(parts, axis=-1)))
            item = nn.relu(nn.Dense(self.hidden, name="item")(item))
            hidden = nn.relu(nn.Dense(self.hidden, name="interaction")(jnp.concatenate([user, item, user * item], -1)))
            return nn.Dense(1, name="logit")(hidden)[..., 0]

    return Ranker


def _standardize(features: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """z-scores with the training users' mean and std (constant columns stay 0)."""
    mean = features[fit_rows].mean(axis=0)
    std = features[fit_rows].std(axis=0)
    return ((features - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def train_and_evaluate(data: StudyData, groups: Sequence[str], seed: int, config: StudyConfig,
                       candidates: Tuple[np.ndarray, np.ndarray, np.ndarray],
                       split: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> Dict[str, float]:
    """Train one variant's ranker on one seed's split and candidates; its test metrics and training figures."""
    import jax
    import jax.numpy as jnp
    import optax

    users, items, labels = candidates
    train_users, valid_users, test_users = split
    dense_groups = [g for g in groups if g != "le"]
    dense = _standardize(np.concatenate([data.groups[g] for g in dense_groups], axis=1), train_users)
    token_ids = data.token_ids if "le" in groups else np.full((len(data.user_ids), 1), -1, np.int32)
    item_features = _standardize(data.item_embeddings, np.unique(items[np.isin(users, train_users)]))
    model = _ranker_module()(config.hidden, data.token_vocab if "le" in groups else 0, config.token_dim)

    def rows_of(user_set):
        return np.flatnonzero(np.isin(users, user_set))

    train_rows, valid_rows, test_rows = rows_of(train_users), rows_of(valid_users), rows_of(test_users)
    dense_j, tokens_j, items_j = jnp.asarray(dense), jnp.asarray(token_ids), jnp.asarray(item_features)
    users_j, item_idx_j, labels_j = jnp.asarray(users), jnp.asarray(items), jnp.asarray(labels)

    def logits_of(params, rows):
        u = users_j[rows]
        return model.apply({"params": params}, dense_j[u], tokens_j[u], items_j[item_idx_j[rows]])

    def loss_of(params, rows, weights):
        per_row = optax.sigmoid_binary_cross_entropy(logits_of(params, rows), labels_j[rows])
        return (per_row * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)

    @jax.jit
    def step(params, opt_state, rows, weights):
        loss, grads = jax.value_and_grad(loss_of)(params, rows, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    score = jax.jit(logits_of)
    params = model.init(jax.random.PRNGKey(seed), dense_j[:1], tokens_j[:1], items_j[:1])["params"]
    opt_state = optimizer.init(params)

    def predict(params, rows):  # fixed-size chunks: one compilation
        out = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start:start + config.batch_size]
            padded = np.pad(chunk, (0, config.batch_size - len(chunk)))
            out[start:start + len(chunk)] = np.asarray(score(params, jnp.asarray(padded)))[:len(chunk)]
        return out

    rng = np.random.default_rng([seed, 2])
    best, best_params, best_epoch, waited, epochs, started = float("inf"), params, 0, 0, 0, time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(train_rows)
        for start in range(0, len(order), config.batch_size):
            chunk = order[start:start + config.batch_size]
            weights = np.zeros(config.batch_size, np.float32)
            weights[:len(chunk)] = 1.0
            padded = np.pad(chunk, (0, config.batch_size - len(chunk)))
            params, opt_state, _ = step(params, opt_state, jnp.asarray(padded), jnp.asarray(weights))
        epochs = epoch
        valid_loss = log_loss(labels[valid_rows], predict(params, valid_rows))
        if valid_loss < best - 1e-6:
            best, best_params, best_epoch, waited = valid_loss, params, epoch, 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    test_logits = predict(best_params, test_rows)
    return {"auc": auc(labels[test_rows], test_logits), "log_loss": log_loss(labels[test_rows], test_logits),
            "ndcg@10": mean_ndcg(users[test_rows], labels[test_rows], test_logits, 10),
            "valid_log_loss": best, "best_epoch": best_epoch, "epochs": epochs,
            "train_rows": int(len(train_rows)), "test_rows": int(len(test_rows)),
            "train_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------------------------
def run_study(data: StudyData, config: StudyConfig, variants: Sequence[str] = tuple(VARIANTS),
              log=print) -> Dict[str, object]:
    """Every variant on every seed (paired: one split and candidate set per seed), then the summary."""
    if len(data.user_ids) < 20:
        raise ValueError(f"only {len(data.user_ids)} users have an engagement in the label window: too few to split")
    if "base" not in variants:
        raise ValueError("the variants must include base: lifts are measured over it")
    runs: Dict[str, List[Dict[str, float]]] = {v: [] for v in variants}
    for seed in range(config.seeds):
        rng = np.random.default_rng([seed, 0])
        candidates = build_candidates(data.positives, data.watched, len(data.item_ids), config.negatives,
                                      config.max_positives, rng)
        split = split_users(len(data.user_ids), seed)
        for variant in variants:
            result = train_and_evaluate(data, VARIANTS[variant], seed, config, candidates, split)
            runs[variant].append(result)
            log(f"seed {seed} {variant:8s} AUC {result['auc']:.4f}  log loss {result['log_loss']:.4f}  "
                f"NDCG@10 {result['ndcg@10']:.4f}  (best epoch {result['best_epoch']}, "
                f"{result['train_seconds']:.1f} s)")
    return {"config": dataclasses.asdict(config), "data": data.description, "variants": list(variants),
            "runs": runs, "summary": summarize(runs)}


def summarize(runs: Mapping[str, Sequence[Mapping[str, float]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per variant and metric: mean with a t interval over seeds, and the paired relative lift over base (positive
    = better, for log loss too) with its interval."""
    summary = {}
    base = runs["base"]
    for variant, results in runs.items():
        entry = {}
        for metric in METRICS:
            values = [r[metric] for r in results]
            mean, low, high = t_interval(values)
            sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
            lifts = [sign * (r[metric] - b[metric]) / b[metric] for r, b in zip(results, base)]
            lift, lift_low, lift_high = t_interval(lifts)
            entry[metric] = {"mean": mean, "low": low, "high": high, "lift": lift, "lift_low": lift_low,
                             "lift_high": lift_high}
        summary[variant] = entry
    return summary


def paired_difference(runs: Mapping[str, Sequence[Mapping[str, float]]], better: str, worse: str,
                      metric: str) -> Tuple[float, float, float]:
    """Mean and t interval over seeds of (better - worse) on ``metric``, signed so that positive favours ``better``."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return t_interval([sign * (a[metric] - b[metric]) for a, b in zip(runs[better], runs[worse])])


def verdicts(runs: Mapping[str, Sequence[Mapping[str, float]]], metric: str = "auc") -> List[Dict[str, object]]:
    """The paper's claims as paired comparisons: reproduced when the interval of the difference lies above 0,
    reversed when below, not resolved otherwise."""
    claims = [("RQ1: tokens (LE) help a ranker", "+LE", "base"),
              ("RQ1: tokens (EM) help a ranker", "+EM", "base"),
              ("RQ1: learnable token embeddings (LE) beat prefix-embedding mapping (EM)", "+LE", "+EM"),
              ("RQ2: embedding + tokens beat the embedding alone", "+emb+LE", "+emb"),
              ("RQ2: embedding + tokens beat the tokens alone", "+emb+LE", "+LE")]
    out = []
    for claim, better, worse in claims:
        if better not in runs or worse not in runs:
            continue
        mean, low, high = paired_difference(runs, better, worse, metric)
        finding = "reproduces" if low > 0 else "reversed" if high < 0 else "not resolved (interval spans 0)"
        out.append({"claim": claim, "compare": f"{better} vs {worse}", "metric": metric, "difference": mean,
                    "low": low, "high": high, "finding": finding})
    return out


def read_collapse_diagnostics(output_root: str, refresh_date: dt.date) -> Optional[Dict[str, object]]:
    """The refresh's collapse diagnostics (``tokenminds_model.diagnostics --output`` beside its run summary), if
    written: whether the tokens differ between users decides how much the token variants can add."""
    from transforms import schemas

    path = os.path.join(os.path.dirname(schemas.run_summary_path(output_root, schemas.USER_REPRESENTATIONS,
                                                                 refresh_date)), "diagnostics.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        report = json.load(handle)
    return {"path": path, "embedding_mean_pairwise_cosine": report["embedding"]["mean_pairwise_cosine"],
            "scenarios": {name: {k: d[k] for k in ("distinct_tokens", "distinct_per_rank", "rank0_top_share",
                                                   "shared_by_all", "mean_jaccard")}
                          for name, d in report["scenarios"].items()},
            "personalised": report["personalised"]}


def _collapse_lines(collapse) -> List[str]:
    if not collapse:
        return ["- Collapse diagnostics: not found (run `tokenminds_model.diagnostics --output=` beside the refresh's "
                "summary).", ""]
    lines = [f"- Collapse diagnostics of the refresh (`{collapse['path']}`): mean cosine of two users' embeddings "
             f"{collapse['embedding_mean_pairwise_cosine']:.3f}."]
    for name, d in collapse["scenarios"].items():
        verdict = "personalised" if collapse["personalised"][name] else "NOT personalised"
        lines.append(f"  - {name}: {d['distinct_tokens']} distinct tokens, distinct per rank "
                     f"{d['distinct_per_rank'][:5]}, {d['rank0_top_share']:.0%} of users share the top rank-0 token, "
                     f"{d['shared_by_all']} tokens held by every user, mean Jaccard of two users "
                     f"{d['mean_jaccard']:.3f}: {verdict}.")
    return lines + [""]


def _leakage_line(check) -> str:
    if isinstance(check, dict):
        days = check["training_days"]
        return (f"checked: model {check['version']} trained on {days[0]} .. {days[-1]}" if days
                else f"checked: model {check['version']} has no recorded training days")
    return str(check or "not checked")


def write_report(result: Mapping[str, object], output: str, title: str = "Downstream ranking study") -> None:
    """metrics.json, report.md and downstream.png under ``output``."""
    os.makedirs(output, exist_ok=True)
    runs, summary, data, config = result["runs"], result["summary"], result["data"], result["config"]
    found = verdicts(runs)
    with open(os.path.join(output, "metrics.json"), "w") as handle:
        json.dump({**result, "verdicts": found}, handle, indent=2, sort_keys=True)
        handle.write("\n")
    _plot(summary, os.path.join(output, "downstream.png"))
    seeds = config["seeds"]
    epochs = {v: [r["best_epoch"] for r in rs] for v, rs in runs.items()}
    lines = [f"# {title}", "",
             f"Refresh of {data['refresh_date']} (`{data['output_root']}`), labels from "
             f"{', '.join(data['label_days'])}.", "",
             "## Data", "",
             f"- Users with a representation: {data['users_with_representations']:,}; with an engagement in the "
             f"label window (the study's users): {data['users']:,}.",
             f"- Engagements (watch ratio >= {config['min_watch_ratio']}): {data['engagements']:,} of "
             f"{data['label_watches']:,} (user, item) watches in the window; catalogue {data['catalog_items']:,} "
             f"items.",
             f"- Per user: up to {config['max_positives']} positives, up to {config['max_positives']} real "
             f"negatives (watched below the ratio), {config['negatives']} sampled catalogue negatives.",
             f"- Features: content embedding {data['content_dim']}-d (items, and the base user group: mean over the "
             f"last {config['recent_watches']} watches + log history length); TokenMinds embedding "
             f"{data['embedding_dim']}-d; tokens of {', '.join(data['scenarios'])} (EM: prefix table of "
             f"{data['prefix_table_rows']:,} prefixes; LE: {data['le_ids_per_user']:.1f} n-gram + piece ids per user "
             f"over {data['le_vocabulary']:,} ids).",
             f"- Label leakage (the refresh's model trained only on days before the refresh): "
             f"{_leakage_line(data.get('label_leakage_check'))}.", "",
             *_collapse_lines(data.get("collapse")),
             "## Protocol", "",
             f"{seeds} seeds; per seed users split {SPLIT[0]:.0%} / {SPLIT[1]:.0%} / {SPLIT[2]:.0%} train / "
             "validation / test, one candidate draw, the same initialisation seed for every variant. Ranker: "
             f"MLP([u, i, u*i]), hidden {config['hidden']}, LE token embeddings {config['token_dim']}-d, AdamW lr "
             f"{config['learning_rate']:g}, batch {config['batch_size']}, at most {config['max_epochs']} epochs, "
             f"best validation log loss kept (patience {config['patience']}). Intervals: 95% Student-t over seeds; "
             "lifts are paired per seed (log loss: reduction).", "",
             "## Results (test users)", "",
             "| variant | AUC [95% CI] | log loss [95% CI] | NDCG@10 [95% CI] | AUC lift vs base | NDCG@10 lift | "
             "best epochs |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant in result["variants"]:
        s = summary[variant]
        cells = [f"{s[m]['mean']:.4f} [{s[m]['low']:.4f}, {s[m]['high']:.4f}]" for m in METRICS]
        lifts = ["—" if variant == "base" else
                 f"{s[m]['lift']:+.2%} [{s[m]['lift_low']:+.2%}, {s[m]['lift_high']:+.2%}]" for m in ("auc", "ndcg@10")]
        lines.append(f"| {variant} | " + " | ".join(cells + lifts) + f" | {epochs[variant]} |")
    lines += ["", "![metrics per variant](downstream.png)", "", "## The paper's claims (AUC, paired over seeds)", "",
              "| claim | comparison | difference [95% CI] | finding |", "| --- | --- | --- | --- |"]
    for v in found:
        lines.append(f"| {v['claim']} | {v['compare']} | {v['difference']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] "
                     f"| {v['finding']} |")
    lines += ["", "A claim that does not reproduce is reported as found; nothing here is tuned per variant."]
    with open(os.path.join(output, "report.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def _plot(summary: Mapping[str, Mapping[str, Mapping[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for axis, metric in zip(axes, METRICS):
        means = np.asarray([summary[v][metric]["mean"] for v in variants])
        errors = np.asarray([[summary[v][metric]["mean"] - summary[v][metric]["low"],
                              summary[v][metric]["high"] - summary[v][metric]["mean"]] for v in variants]).T
        axis.bar(range(len(variants)), means, yerr=np.nan_to_num(errors), capsize=4, color="#4c72b0")
        axis.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        spread = float(np.nanmax(means + np.nan_to_num(errors[1])) - np.nanmin(means - np.nan_to_num(errors[0])))
        axis.set_ylim(float(np.nanmin(means - np.nan_to_num(errors[0]))) - spread,
                      float(np.nanmax(means + np.nan_to_num(errors[1]))) + spread)
        axis.set_title(f"{metric} (95% CI over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_root", required=True, help="the daily jobs' output root")
    parser.add_argument("--refresh_date", required=True, type=dt.date.fromisoformat,
                        help="the refresh_users / build_adaptation date D; labels come from D+1 ..")
    parser.add_argument("--label_days", type=int, default=1, help="days after D whose engagements are labels")
    parser.add_argument("--validated_root", default=None, help="default: <output_root>/validated")
    parser.add_argument("--output", required=True, help="directory for metrics.json, report.md, downstream.png")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--title", default="Downstream ranking study")
    parser.add_argument("--model", default=None,
                        help="the checkpoint the refresh ran: checked to have trained only on days before "
                             "--refresh_date (else its targets overlap the labels); the report says if unchecked")
    defaults = StudyConfig()
    for field in dataclasses.fields(StudyConfig):
        parser.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    if args.label_days < 1:
        parser.error("--label_days must be >= 1")
    try:
        config = StudyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)})
        leakage_check = (check_model_saw_no_labels(args.model, args.output_root, args.refresh_date) if args.model
                         else "not checked (no --model given)")
        data = load_study_data(args.output_root, args.refresh_date, args.label_days, config, args.validated_root)
        data.description["label_leakage_check"] = leakage_check
        data.description["collapse"] = read_collapse_diagnostics(args.output_root, args.refresh_date)
        print(f"{data.description['users']:,} users with engagements on {', '.join(data.description['label_days'])}"
              f"; catalogue {data.description['catalog_items']:,} items", flush=True)
        result = run_study(data, config, variants, log=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_report(result, args.output, args.title)
    for v in verdicts(result["runs"]):
        print(f"{v['claim']}: {v['finding']} ({v['compare']}, AUC difference {v['difference']:+.4f} "
              f"[{v['low']:+.4f}, {v['high']:+.4f}])")
    print(f"wrote {os.path.join(args.output, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
