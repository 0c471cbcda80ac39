"""Serving inputs for a batch of users at once, on NumPy/Arrow columns: the fast path of ``refresh_users``.

``examples.serving_history`` is the specification (one user's snapshot rows, plain Python objects, one featurizer
call per user); ``build_serving_inputs`` gives the same arrays for every row of an Arrow table of snapshots with
the machinery of ``columnar`` (the build_examples fast path):

- ``columnar.pack_snapshots``, trimmed to what a history at the cutoff can hold (``serving_trim``), and
  ``columnar.Batch``: the users' events merged, deduplicated and ordered with array sorts, every distinct query cut
  into pieces in one SentencePiece call;
- ``columnar.history_positions``: the events each history keeps at the cutoff (the end of day D), looking only at the
  most recent events of each kind;
- the kept watches of the whole batch featurized in ONE tensorflow-transform call (``WatchFeaturizer`` pads every
  call so that a row's features do not depend on the other rows of the call);
- tokens laid out for all users at once (a ``[users, max_tokens]`` scatter).

Any error in a batch is retried user by user, so one user's bad data fails that user alone.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from tokenminds_model import vocabulary
from tokenminds_model.vocabulary import PAD_ID, SEARCH_ID, SOFT_ID, TOKEN_DTYPE, VocabularyLayout
from transforms import columnar, schemas
from transforms.events import SequenceConfig

ServingInput = Dict[str, Any]  # {"tokens": int64 [max_tokens], "length": int[, "soft_features": f32 [max_tokens, F]]}
# Errors a user's data can raise on its way to a serving input (the reference raises the same kinds).
DATA_ERRORS = (ValueError, KeyError, TypeError, IndexError)


def _featurize_watches(batch: columnar.Batch, positions: np.ndarray, featurizer):
    """Buckets and soft vectors of the watches at timeline ``positions``, in one featurizer call (a row's features
    depend on that row alone: ``WatchFeaturizer.featurize_columns``)."""
    rows = batch.index[positions]
    take = pa.array(rows, pa.int64())
    raw = {"watch_ratio": batch.ratio[rows], "watch_time_s": batch.watch_time_s[rows],
           "time_gap_s": batch.gap_s[positions], "liked": batch.liked[rows], "disliked": batch.disliked[rows],
           "surface": batch.surface.take(take), "device": batch.device.take(take)}
    dtypes = {"watch_ratio": np.float32, "watch_time_s": np.float32, "time_gap_s": np.float32, "liked": np.int64,
              "disliked": np.int64}
    return featurizer.featurize_columns(
        {name: (values.astype(dtypes[name]) if name in dtypes else values.to_numpy(zero_copy_only=False))
         for name, values in raw.items()})


def serving_batch(users: Sequence[Tuple[str, Sequence[columnar.Pack]]], cutoff_ts_us: int, layout: VocabularyLayout,
                  config: SequenceConfig, tokenizer, featurizer) -> List[ServingInput]:
    """Per user of ``users`` (user_id, its snapshot packs): the serving input as of ``cutoff_ts_us``, equal to
    ``examples.serving_history`` of the user's snapshot rows. Raises on bad data of any user."""
    batch = columnar.Batch(users, layout, config, tokenizer)
    watch_cost = config.watch_token_count(layout)
    # Timeline positions each history keeps (oldest first), and which user they belong to.
    histories = []
    for u in range(len(users)):
        lo, hi = int(batch.user_bounds[u]), int(batch.user_bounds[u + 1])
        cutoff = lo + int(np.searchsorted(batch.ts[lo:hi], cutoff_ts_us))
        histories.append(columnar.history_positions(batch, lo, cutoff, watch_cost, config))
    kept = np.concatenate([np.zeros(0, np.int64)] + histories).astype(np.int64)
    owner = batch.user[kept]
    is_watch = batch.kind[kept] == 1
    watches = kept[is_watch]
    if not batch.sid_ok[batch.index[watches]].all():
        raise ValueError(f"a history watch's SID does not have the layout's {layout.sid_levels} levels (SIDs from "
                         "another SID model?)")
    buckets, soft = _featurize_watches(batch, watches, featurizer)
    rows = batch.index[watches]
    sid_len = config.sid_length(layout)
    block = [np.asarray([vocabulary.condition_token(s) for s in schemas.SCENARIOS], TOKEN_DTYPE)[
        batch.scenario[rows]][:, None], layout.sid_tokens(batch.sids[rows], sid_len)]
    if config.feature_mode == "hard":
        block += [layout.feature_token(name, buckets[name].astype(TOKEN_DTYPE))[:, None]
                  for name in layout.feature_names]
    else:
        if not np.isfinite(soft).all():
            raise ValueError("soft_vectors holds NaN or infinite values")
        block.append(np.full((len(rows), 1), SOFT_ID, TOKEN_DTYPE))
    watch_block = np.concatenate(block, axis=1) if len(rows) else np.zeros((0, watch_cost), TOKEN_DTYPE)

    # Each kept event's token count, its start within its user's sequence, and the user's length.
    searches = kept[~is_watch]
    search_tokens = [np.concatenate([[SEARCH_ID], layout.query_piece_token(np.asarray(
        batch.search_pieces[batch.index[p]][:config.max_pieces_per_query], TOKEN_DTYPE))]).astype(TOKEN_DTYPE)
        for p in searches]
    cost = np.full(len(kept), watch_cost, np.int64)
    cost[~is_watch] = [len(t) for t in search_tokens]
    ends = np.cumsum(cost)
    first_of_user = np.searchsorted(owner, np.arange(len(users) + 1))
    user_offset = np.concatenate([[0], ends])[first_of_user]
    start = ends - cost - user_offset[owner]
    lengths = np.diff(user_offset)

    tokens = np.full((len(users), config.max_tokens), PAD_ID, TOKEN_DTYPE)
    at = start[is_watch][:, None] + np.arange(watch_cost)
    tokens[np.repeat(owner[is_watch], watch_cost), at.ravel()] = watch_block.ravel()
    for u, s, search in zip(owner[~is_watch], start[~is_watch], search_tokens):
        tokens[u, s:s + len(search)] = search
    soft_features = None
    if config.feature_mode == "soft":
        soft_features = np.zeros((len(users), config.max_tokens, soft.shape[1]), np.float32)
        soft_features[owner[is_watch], start[is_watch] + 1 + sid_len] = soft
    result = []
    for u in range(len(users)):
        serving_input = {"tokens": tokens[u], "length": int(lengths[u])}
        if soft_features is not None:
            serving_input["soft_features"] = soft_features[u]
        result.append(serving_input)
    return result


def serving_trim(cutoff_ts_us: int, layout: VocabularyLayout, config: SequenceConfig) -> columnar.Trim:
    """Only what a history at ``cutoff_ts_us`` can hold (``columnar.Trim`` of an empty day at the cutoff): the
    newest kept watches and searches before it, and the time of the event before those (for the first one's gap)."""
    return columnar.Trim.for_day(cutoff_ts_us, cutoff_ts_us, layout, config)._replace(end_us=cutoff_ts_us)


def user_ids_of(table: pa.Table) -> List[Optional[str]]:
    return table.column("user_id").to_pylist()


def build_serving_inputs(table: pa.Table, cutoff_ts_us: int, layout: VocabularyLayout, config: SequenceConfig,
                         tokenizer, featurizer) -> Iterator[Tuple[int, Union[ServingInput, Exception]]]:
    """(row index, serving input or the exception that user's data raised) for every row of a snapshot table
    (``schemas.HISTORIES_SCHEMA``, one row per user): the whole table in one batch, or, if that fails, row by row.
    A row without a user_id is an error of its own."""
    ids = user_ids_of(table)
    valid = np.asarray([isinstance(u, str) and bool(u) for u in ids], bool)
    for row in np.flatnonzero(~valid):
        yield int(row), ValueError(f"snapshot row without a user_id: {ids[row]!r}")
    rows = np.flatnonzero(valid)
    if not len(rows):
        return
    try:
        packs = columnar.pack_snapshots(table.take(pa.array(rows)), serving_trim(cutoff_ts_us, layout, config))
        users = [(user_id, [pack]) for user_id, pack in packs]
        yield from zip((int(r) for r in rows), serving_batch(users, cutoff_ts_us, layout, config, tokenizer,
                                                            featurizer))
    except DATA_ERRORS as error:
        if len(rows) == 1:
            yield int(rows[0]), error
            return
        for row in rows:
            for _, built in build_serving_inputs(table.slice(int(row), 1), cutoff_ts_us, layout, config, tokenizer,
                                                 featurizer):
                yield int(row), built
