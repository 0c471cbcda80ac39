"""Training examples for a batch of users at once, on NumPy/Arrow columns: the fast path of ``build_examples``.

``sequences.make_user_examples`` is the specification (one user, plain Python objects); this module computes the
same examples, byte for byte, without a Python object per event:

- ``pack_snapshots`` turns an Arrow table of history snapshots into one small ``Pack`` (flat NumPy arrays, strings
  as UTF-8 blobs + offsets) per user: cheap to pickle through the shuffle, with no per-event dicts. With a ``Trim``
  it keeps only the events that can reach an example of the day (``_trim`` argues why that is exact), so what
  crosses the shuffle and what a batch decodes does not grow with the history's length.
- ``build_batch`` takes the packs of many users (D-1, D, D+1 each), merges and orders their events with array sorts,
  picks cutoffs, and selects each cutoff's history from the most recent ``max_watches``/``max_searches`` events of
  each kind only (all a history can hold), so the per-cutoff work does not grow with the history's length. Only the
  selected watches are featurized, in ONE tensorflow-transform call for the whole batch (a row's features do not
  depend on the call it is in: ``WatchFeaturizer.featurize_columns``).

Any error in a batch is retried user by user, so one user's bad data dead-letters that user alone.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenminds_model import vocabulary
from tokenminds_model.vocabulary import PAD_ID, SEARCH_ID, SOFT_ID, TOKEN_DTYPE, VocabularyLayout
from transforms import schemas
from transforms.events import MAX_WATCH_RATIO, SECOND_US, FIRST_EVENT_GAP_S, SequenceConfig, keyed_hash64
from transforms.events import _hash_field, uniform_from_hash

_DEFAULTS = schemas.OPTIONAL_DEFAULTS[schemas.WATCH_EVENTS]
_WATCH_STRINGS = ("video_id", "surface", "device")


# ---------------------------------------------------------------------------------------------------------------
# Packing: an Arrow table of snapshots -> one Pack per user.
# ---------------------------------------------------------------------------------------------------------------
NO_FLOOR = -2 ** 63  # Pack.floor_ts when no event was trimmed away

# Per-snapshot data checks, in the order a user's error reports them (``Pack.error``).
_ERRORS = ("a watch or search record has no value for a required field",
           f"a watch scenario is not one of {schemas.SCENARIOS}",
           "watch_time_s must be finite and >= 0, video_duration_s finite and > 0",
           "a watch has an empty SID or a negative SID code")


class Pack(NamedTuple):
    """One snapshot row's events as flat arrays. ``w_num`` float64 [n, 2]: watch_time_s, video_duration_s (NaN
    where null). ``w_small`` int8 [n, 3]:
    scenario index (-1 unknown or null), liked, disliked. Strings are (UTF-8 bytes, int64 offsets [n + 1]).

    ``floor_ts``: with a ``Trim``, the time of the newest event below the kept watches (what the oldest kept
    watches' time gaps may be measured to: ``_trim``), ``NO_FLOOR`` if none. ``error``: the first of the data
    checks that some event of the snapshot (trimmed or not) fails, "" if none."""
    w_ts: np.ndarray
    w_num: np.ndarray
    w_small: np.ndarray
    w_sid_offsets: np.ndarray
    w_sid: np.ndarray
    w_strings: Tuple[Tuple[bytes, np.ndarray], ...]  # video_id, surface, device
    s_ts: np.ndarray
    s_query: Tuple[bytes, np.ndarray]
    null_required: bool  # a required value is missing: the user is an error, as in ``as_watch_event``
    floor_ts: int = NO_FLOOR
    error: str = ""

    def __reduce__(self):
        """Pickled as one bytes payload and a few ints (every array's bytes back to back): what crosses the shuffle,
        several times cheaper to pickle and unpickle than a dozen NumPy arrays."""
        (video, video_offsets), (surface, surface_offsets), (device, device_offsets) = self.w_strings
        query, query_offsets = self.s_query
        blobs = [video, surface, device, query]
        payload = b"".join([_raw(self.w_ts, _I8), _raw(self.w_num, _F8), _raw(self.w_small, _I1),
                            _raw(self.w_sid_offsets, _I8), _raw(self.w_sid, _I8), _raw(video_offsets, _I8),
                            _raw(surface_offsets, _I8), _raw(device_offsets, _I8), _raw(self.s_ts, _I8),
                            _raw(query_offsets, _I8)] + blobs)
        return _unpack, (len(self.w_ts), len(self.w_sid), len(self.s_ts), tuple(len(b) for b in blobs), payload,
                         bool(self.null_required), int(self.floor_ts), self.error)


_I8, _F8, _I1 = np.dtype(np.int64), np.dtype(np.float64), np.dtype(np.int8)


def _raw(array: np.ndarray, dtype: np.dtype) -> bytes:
    """The array's values as ``dtype``, C order (``tobytes`` copies any layout to C order)."""
    return array.tobytes() if array.dtype == dtype else np.asarray(array, dtype).tobytes()


def _unpack(n: int, sids: int, searches: int, blob_lengths: Tuple[int, ...], payload: bytes, null_required: bool,
            floor_ts: int, error: str) -> Pack:
    """``Pack.__reduce__``'s inverse: arrays are read-only views of the payload."""
    position = 0

    def take(dtype, count, shape=None):
        nonlocal position
        array = np.frombuffer(payload, dtype, count, position)
        position += array.nbytes
        return array if shape is None else array.reshape(shape)

    w_ts = take(np.int64, n)
    w_num = take(np.float64, 2 * n, (n, 2))
    w_small = take(np.int8, 3 * n, (n, 3))
    w_sid_offsets = take(np.int64, n + 1)
    w_sid = take(np.int64, sids)
    string_offsets = [take(np.int64, n + 1) for _ in _WATCH_STRINGS]
    s_ts = take(np.int64, searches)
    query_offsets = take(np.int64, searches + 1)
    blobs = []
    for length in blob_lengths:
        blobs.append(payload[position:position + length])
        position += length
    return Pack(w_ts, w_num, w_small, w_sid_offsets, w_sid, tuple(zip(blobs[:-1], string_offsets)), s_ts,
                (blobs[-1], query_offsets), null_required, floor_ts, error)


class Trim(NamedTuple):
    """What of a snapshot can reach an example of the day [start_us, end_us) (``pack_snapshots``' ``trim``).

    ``keep_watches``/``keep_searches`` are K and S of ``_history``: a history at any cutoff holds (or stops at) only
    events among the K most recent kept watches and S most recent kept searches before it."""
    start_us: int
    end_us: int
    keep_watches: int
    keep_searches: int
    scenarios: Tuple[int, ...]  # scenario indices the config keeps
    include_searches: bool

    @classmethod
    def for_day(cls, start_us: int, end_us: int, layout: VocabularyLayout, config: SequenceConfig) -> "Trim":
        watch_cost = config.watch_token_count(layout)
        return cls(start_us, end_us + config.window_us,
                   min(config.max_watches, config.max_tokens // watch_cost + 1),
                   min(config.max_searches, config.max_tokens + 1),
                   tuple(schemas.SCENARIOS.index(s) for s in config.scenarios), config.include_searches)


def _numbers(values: pa.Array, dtype) -> Tuple[np.ndarray, np.ndarray]:
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    return pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(dtype), nulls


def _strings(values: pa.Array) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data uint8, offsets int64 [n + 1], nulls) of a string array, nulls as empty strings."""
    values = values.cast(pa.large_string())
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    values = pc.fill_null(values, "")
    offsets = np.frombuffer(values.buffers()[1], np.int64)[values.offset:values.offset + len(values) + 1]
    data = np.frombuffer(values.buffers()[2], np.uint8) if values.buffers()[2] is not None else np.zeros(0, np.uint8)
    return data, offsets, nulls


def _blob(parts: Tuple[np.ndarray, np.ndarray, Any], a: int, b: int) -> Tuple[bytes, np.ndarray]:
    data, offsets, _ = parts
    return data[offsets[a]:offsets[b]].tobytes(), offsets[a:b + 1] - offsets[a]


def _list_parts(column: pa.ChunkedArray) -> Tuple[np.ndarray, pa.Array]:
    lists = column.combine_chunks()
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    return offsets, lists.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])), offsets - offsets[0]


def _row_of(offsets: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _nth_newest(ts: np.ndarray, row: np.ndarray, rows: int, n: int) -> np.ndarray:
    """Per row: the time of its n-th most recent event of ``ts``; ``NO_FLOOR`` (no bound) if it has fewer than n,
    ``2**63 - 1`` if n is 0."""
    if n == 0:
        return np.full(rows, 2 ** 63 - 1, np.int64)
    out = np.full(rows, NO_FLOOR, np.int64)
    if not len(ts):
        return out
    counts = np.bincount(row, minlength=rows)
    enough = counts >= n
    ends = np.cumsum(counts)
    # Snapshots hold each row's events in time order, nearly always: then a row's n-th newest is n from its end
    # (rows are contiguous), with no sort. Otherwise sort each row newest first.
    new_row = row[1:] != row[:-1]
    if bool(((ts[1:] >= ts[:-1]) | new_row).all()) and bool((row[1:] >= row[:-1]).all()):
        out[enough] = ts[ends[enough] - n]
        return out
    order = np.lexsort([-ts, row])
    starts = ends - counts
    out[enough] = ts[order[starts[enough] + n - 1]]
    return out


def _trim(trim: Trim, rows: int, w_row, w_ts, w_keep, s_row, s_ts, s_keep):
    """(watch mask, search mask, floor per row) of ``pack_snapshots``' trim.

    Why the union over D-1, D and D+1 of per-snapshot trims gives the reference's examples exactly:

    Per snapshot X, let W_X be the time of X's K-th newest kept watch before the day (no bound if X has fewer than
    K; the day's start if K is 0) and S_X that of its S-th newest kept search (likewise). X keeps the kept watches
    in [W_X, end_us), the kept searches in [min(W_X, S_X), end_us), and ``floor_ts``, the newest time of a kept
    event below W_X. Then for every cutoff c (in the day):

    1. Cutoffs, look-ahead windows and rewards only see events in the day and the window ([start_us, end_us)), all
       kept in every snapshot, latest versions included, so these are unchanged. (The day's first event is a
       session start whatever precedes it.)
    2. The merged timeline of the trims is, by event key (time, scenario, video / time, query), a subsequence of the
       reference's merged timeline, in the same (key) order. ``select_history_events`` walks the reference newest
       first; every event it keeps or stops at is within the K newest kept watches or S newest kept searches before
       c (see ``_history``), hence within X's K newest watches / S newest searches before the day for every snapshot
       X that holds it, in particular the latest such X, whose version wins the dedupe ("later snapshot wins"): it
       is there, with that version. The events the trims miss are ones the walk skips (a cap reached: skipping does
       not change the walk's state) or never reaches (past the stop), so the walk on the trims keeps the same events.
    3. A selected watch e is within every snapshot X's K newest watches, so e's time >= W_X for every X. Its time
       gap is to the newest event of the merged timeline before it: the newest, over the snapshots X, of X's
       newest event before e, which is either at >= W_X (kept: every kept event of X at >= W_X is) or the newest
       below W_X (X's ``floor_ts``). ``Batch`` puts the floors into the timeline for the gaps alone; events older
       than some floor may get other gaps, but by the same argument none of them is a selected watch, and only
       watches' gaps are features. So every selected watch has the reference's gap.
    Non-kept events (scenarios or searches the config excludes) never reach a timeline; the data checks run on
    every event before trimming (``Pack.error``)."""
    def bound(row, ts, keep, n):
        before = keep & (ts < trim.start_us)
        return np.minimum(_nth_newest(ts[before], row[before], rows, n), trim.start_us)

    watch_from = bound(w_row, w_ts, w_keep, trim.keep_watches)
    search_from = np.minimum(bound(s_row, s_ts, s_keep, trim.keep_searches), watch_from)
    w_mask = w_keep & (w_ts >= watch_from[w_row]) & (w_ts < trim.end_us)
    s_mask = s_keep & (s_ts >= search_from[s_row]) & (s_ts < trim.end_us)
    floor = np.full(rows, NO_FLOOR, np.int64)
    for row, ts, keep in ((w_row, w_ts, w_keep), (s_row, s_ts, s_keep)):
        below = keep & (ts < watch_from[row])
        np.maximum.at(floor, row[below], ts[below])
    return w_mask, s_mask, floor


def pack_snapshots(table: pa.Table, trim: Optional[Trim] = None) -> Iterator[Tuple[str, Pack]]:
    """(user_id, Pack) for every row of a snapshot table (``schemas.HISTORIES_SCHEMA``); with ``trim``, only the
    events that can reach an example of that day (``_trim``), so that what crosses the shuffle and what a batch
    decodes does not grow with the history's length."""
    _, watches, w_off = _list_parts(table.column("watches"))
    _, searches, s_off = _list_parts(table.column("searches"))
    rows = table.num_rows
    w_row, s_row = _row_of(w_off), _row_of(s_off)
    ts, ts_null = _numbers(watches.field("event_ts_us"), np.int64)
    s_ts, s_ts_null = _numbers(searches.field("event_ts_us"), np.int64)
    numbers = [_numbers(watches.field(name), np.float64) for name in ("watch_time_s", "video_duration_s")]
    w_num = np.stack([np.where(nulls, np.nan, v) for v, nulls in numbers], axis=1).reshape(len(watches), 2)
    scenario = watches.field("scenario")
    scenario_index = np.full(len(watches), -1, np.int8)
    for index, name in enumerate(schemas.SCENARIOS):
        scenario_index[pc.fill_null(pc.equal(scenario, name), False).to_numpy(zero_copy_only=False)] = index
    sid_lists = watches.field("sid")
    sid_off = np.asarray(sid_lists.offsets, dtype=np.int64)
    sid_values, sid_null = _numbers(sid_lists.values, np.int64)
    sid_values = sid_values[sid_off[0]:sid_off[-1]]
    sid_null = sid_null[sid_off[0]:sid_off[-1]]
    sid_off = sid_off - sid_off[0]
    video_null = watches.field("video_id").is_null().to_numpy(zero_copy_only=False)
    query_null = searches.field("query").is_null().to_numpy(zero_copy_only=False)

    # The data checks, on every event of the snapshot (trimmed or not): per row, the first one failed.
    scenario_null = scenario.is_null().to_numpy(zero_copy_only=False)
    bad_sid_code = np.zeros(len(watches) + 1, np.int64)  # per watch: null SID codes
    np.add.at(bad_sid_code, np.searchsorted(sid_off, np.flatnonzero(sid_null), side="right") - 1, 1)
    null_watch = ts_null | video_null | scenario_null | sid_lists.is_null().to_numpy(
        zero_copy_only=False) | np.isnan(w_num).any(axis=1) | (bad_sid_code[:-1] > 0)
    error = np.full(rows, len(_ERRORS), np.int64)
    negative_code = np.zeros(len(watches) + 1, np.int64)
    np.add.at(negative_code, np.searchsorted(sid_off, np.flatnonzero(sid_values < 0), side="right") - 1, 1)
    with np.errstate(invalid="ignore"):
        checks = [(null_watch, w_row), (s_ts_null | query_null, s_row), (scenario_index < 0, w_row),
                  (~np.isfinite(w_num).all(axis=1) | (w_num[:, 0] < 0) | (w_num[:, 1] <= 0), w_row),
                  ((np.diff(sid_off) == 0) | (negative_code[:-1] > 0), w_row)]
    for code, (bad, row) in zip((0, 0, 1, 2, 3), checks):
        np.minimum.at(error, row[bad], code)

    floor = np.full(rows, NO_FLOOR, np.int64)
    if trim is not None:
        w_keep = np.isin(scenario_index, trim.scenarios)
        s_keep = np.full(len(searches), trim.include_searches)
        w_mask, s_mask, floor = _trim(trim, rows, w_row, ts, w_keep, s_row, s_ts, s_keep)
        take_w = np.flatnonzero(w_mask)
        watches, searches = watches.take(pa.array(take_w)), searches.take(pa.array(np.flatnonzero(s_mask)))
        ts, s_ts, w_num, scenario_index = ts[take_w], s_ts[s_mask], w_num[take_w], scenario_index[take_w]
        sid_lengths = np.diff(sid_off)[take_w]
        sid_starts = sid_off[:-1][take_w]
        sid_values = sid_values[np.repeat(sid_starts - (np.cumsum(sid_lengths) - sid_lengths), sid_lengths)
                                + np.arange(int(sid_lengths.sum()))]
        sid_off = np.concatenate([[0], np.cumsum(sid_lengths)]).astype(np.int64)
        w_off = np.concatenate([[0], np.cumsum(np.bincount(w_row[take_w], minlength=rows))]).astype(np.int64)
        s_off = np.concatenate([[0], np.cumsum(np.bincount(s_row[s_mask], minlength=rows))]).astype(np.int64)

    flags = [pc.fill_null(watches.field(name), _DEFAULTS[name]).to_numpy(zero_copy_only=False).astype(np.int8)
             for name in ("liked", "disliked")]
    w_small = np.stack([scenario_index] + flags, axis=1)
    strings = [_strings(pc.fill_null(watches.field(name), _DEFAULTS[name]) if name in _DEFAULTS
                        else watches.field(name)) for name in _WATCH_STRINGS]
    query = _strings(searches.field("query"))
    users = table.column("user_id").to_pylist()
    for row, user_id in enumerate(users):
        a, b = int(w_off[row]), int(w_off[row + 1])
        c, d = int(s_off[row]), int(s_off[row + 1])
        code = int(error[row])
        yield user_id, Pack(
            w_ts=ts[a:b], w_num=w_num[a:b], w_small=w_small[a:b], w_sid_offsets=sid_off[a:b + 1] - sid_off[a],
            w_sid=sid_values[sid_off[a]:sid_off[b]], w_strings=tuple(_blob(s, a, b) for s in strings),
            s_ts=s_ts[c:d], s_query=_blob(query, c, d), null_required=code == 0, floor_ts=int(floor[row]),
            error=_ERRORS[code] if code < len(_ERRORS) else "")


def active_in(table: pa.Table, start_us: int, end_us: int) -> np.ndarray:
    """bool per row: the user has a watch or a search in [start_us, end_us)."""
    active = np.zeros(table.num_rows, bool)
    for column in ("watches", "searches"):
        _, events, offsets = _list_parts(table.column(column))
        ts = pc.fill_null(events.field("event_ts_us"), -2 ** 63).to_numpy(zero_copy_only=False)
        inside = np.flatnonzero((ts >= start_us) & (ts < end_us))
        active[np.searchsorted(offsets, inside, side="right") - 1] = True
    return active


# ---------------------------------------------------------------------------------------------------------------
# One batch of users.
# ---------------------------------------------------------------------------------------------------------------
def _concat_strings(blobs: Sequence[Tuple[bytes, np.ndarray]]) -> pa.Array:
    lengths = [len(offsets) - 1 for _, offsets in blobs]
    shifts = np.cumsum([0] + [len(data) for data, _ in blobs])
    offsets = np.concatenate([[0]] + [offsets[1:] + shift for (_, offsets), shift in zip(blobs, shifts)])
    return pa.LargeStringArray.from_buffers(int(sum(lengths)), pa.py_buffer(offsets.astype(np.int64)),
                                            pa.py_buffer(b"".join(data for data, _ in blobs)))


def _dense_rank(strings: pa.Array) -> np.ndarray:
    """Each string's rank in code-point order (Python's str order; UTF-8 byte order is the same)."""
    if len(strings) == 0:
        return np.zeros(0, np.int64)
    return pc.rank(strings, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)


def _winners(group_keys: List[np.ndarray], source: np.ndarray) -> np.ndarray:
    """Indices of one row per group (``group_keys``, most significant first), the one with the highest ``source``
    (later snapshot, later position: what ``examples.merge_user_events``' dict overwrite keeps), in key order."""
    order = np.lexsort([-source] + group_keys[::-1])
    keys = np.stack([k[order] for k in group_keys], axis=1)
    first = np.ones(len(order), bool)
    first[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    return order[first]


class Batch:
    """The merged, ordered, config-filtered events of a batch of users, as flat arrays."""

    def __init__(self, users: Sequence[Tuple[str, Sequence[Pack]]], layout: VocabularyLayout, config: SequenceConfig,
                 tokenizer):
        packs = [(u, p) for u, (_, user_packs) in enumerate(users) for p in user_packs]
        errors = [_ERRORS[0] if p.null_required else p.error for _, p in packs if p.null_required or p.error]
        if errors:  # the first check failed, over all snapshots, as the reference checks them
            raise ValueError(min(errors, key=_ERRORS.index))
        source = lambda sizes: np.concatenate([np.zeros(0, np.int64)] + [  # noqa: E731
            np.arange(n) + (i << 32) for i, n in enumerate(sizes)])
        w_user = np.repeat([u for u, _ in packs], [len(p.w_ts) for _, p in packs]).astype(np.int64)
        s_user = np.repeat([u for u, _ in packs], [len(p.s_ts) for _, p in packs]).astype(np.int64)
        w_ts = np.concatenate([np.zeros(0, np.int64)] + [p.w_ts for _, p in packs])
        s_ts = np.concatenate([np.zeros(0, np.int64)] + [p.s_ts for _, p in packs])
        w_small = np.concatenate([np.zeros((0, 3), np.int8)] + [p.w_small for _, p in packs])
        video_ids = _concat_strings([p.w_strings[0] for _, p in packs])
        queries = _concat_strings([p.s_query for _, p in packs])
        v_rank, q_rank = _dense_rank(video_ids), _dense_rank(queries)
        # Dedupe as merge_user_events does, then order as event_sort_key does (searches first at equal times).
        w = _winners([w_user, w_ts, w_small[:, 0].astype(np.int64), v_rank], source([len(p.w_ts) for _, p in packs]))
        s = _winners([s_user, s_ts, q_rank], source([len(p.s_ts) for _, p in packs]))
        small = w_small[w]
        if (small[:, 0] < 0).any():
            raise ValueError(f"a watch scenario is not one of {schemas.SCENARIOS}")
        numbers = np.concatenate([np.zeros((0, 2))] + [p.w_num for _, p in packs])[w]
        if not np.isfinite(numbers).all() or (numbers[:, 0] < 0).any() or (numbers[:, 1] <= 0).any():
            raise ValueError("watch_time_s must be finite and >= 0, video_duration_s finite and > 0")
        sid_lengths = np.concatenate([np.zeros(0, np.int64)] + [np.diff(p.w_sid_offsets) for _, p in packs])
        sid_values = np.concatenate([np.zeros(0, np.int64)] + [p.w_sid for _, p in packs])
        if (sid_lengths[w] == 0).any() or (sid_values < 0).any():
            raise ValueError("a watch has an empty SID or a negative SID code")
        sid_starts = np.cumsum(sid_lengths) - sid_lengths
        self.sid_ok = sid_lengths[w] == layout.sid_levels  # others fail only where used, as in the reference
        levels = np.arange(layout.sid_levels)
        self.sids = sid_values[np.minimum(sid_starts[w][:, None] + levels, max(len(sid_values) - 1, 0))] \
            if len(w) else np.zeros((0, layout.sid_levels), np.int64)
        self.video_rank = v_rank[w]  # equal ranks: equal video ids
        self.video_ids = video_ids.take(pa.array(w, pa.int64()))
        self.video_id_list = self.video_ids.to_pylist()  # str per watch, for the per-cutoff Python work
        self.surface = _concat_strings([p.w_strings[1] for _, p in packs]).take(pa.array(w, pa.int64()))
        self.device = _concat_strings([p.w_strings[2] for _, p in packs]).take(pa.array(w, pa.int64()))
        self.scenario, self.liked, self.disliked = small[:, 0].astype(np.int64), small[:, 1] > 0, small[:, 2] > 0
        self.watch_time_s, self.duration_s = numbers[:, 0], numbers[:, 1]
        # The search tokens of every distinct query, one SentencePiece call.
        query_strings = queries.take(pa.array(s, pa.int64()))
        distinct = pc.unique(query_strings)
        pieces = tokenizer.encode_batch(distinct.to_pylist(), config.max_pieces_per_query)
        self.search_pieces = [pieces[i] for i in pc.index_in(query_strings, distinct).to_numpy()]

        # The timeline: kept events only (keeps_event), each with its gap to the user's previous kept event. A
        # trimmed snapshot's floor (``_trim``) takes part as a time-only event (kind 2) for the gaps, then goes.
        keep_w = np.isin(self.scenario, [schemas.SCENARIOS.index(x) for x in config.scenarios])
        keep_s = np.full(len(s), config.include_searches)
        floors = np.full(len(users), NO_FLOOR, np.int64)
        np.maximum.at(floors, np.asarray([u for u, _ in packs], np.int64),
                      np.asarray([p.floor_ts for _, p in packs], np.int64))
        floored = np.flatnonzero(floors != NO_FLOOR)
        kind = np.concatenate([np.ones(keep_w.sum(), np.int64), np.zeros(keep_s.sum(), np.int64),
                               np.full(len(floored), 2, np.int64)])
        index = np.concatenate([np.flatnonzero(keep_w), np.flatnonzero(keep_s), np.zeros(len(floored), np.int64)])
        user = np.concatenate([w_user[w][keep_w], s_user[s][keep_s], floored])
        ts = np.concatenate([w_ts[w][keep_w], s_ts[s][keep_s], floors[floored]])
        tie = np.concatenate([self.scenario[keep_w] * (1 << 40) + v_rank[w][keep_w], q_rank[s][keep_s],
                              np.zeros(len(floored), np.int64)])
        order = np.lexsort([tie, kind, ts, user])
        gap_s = np.full(len(order), FIRST_EVENT_GAP_S)
        same_user = np.flatnonzero(user[order][1:] == user[order][:-1]) + 1
        gap_s[same_user] = (ts[order][same_user] - ts[order][same_user - 1]) / SECOND_US
        real = kind[order] != 2
        order = order[real]
        self.kind, self.index, self.user, self.ts, self.gap_s = kind[order], index[order], user[order], ts[order], \
            gap_s[real]
        self.user_bounds = np.searchsorted(self.user, np.arange(len(users) + 1))
        self.w_ts = w_ts[w]
        self.target_hash_keys: Dict[int, bytes] = {}  # watch -> its hashed (video, time) fields
        self.ratio = np.minimum(np.maximum(self.watch_time_s / self.duration_s, 0.0), MAX_WATCH_RATIO)


def rewards(batch: Batch, config: SequenceConfig) -> np.ndarray:
    """``targets.reward`` of every watch of the batch, vectorized with the same float operations."""
    reward = config.reward
    value = (reward.ratio_weight * np.minimum(batch.ratio, reward.ratio_cap) + reward.like_weight * batch.liked
             - reward.dislike_weight * batch.disliked)
    zero = (batch.ratio < reward.min_watch_ratio) | (batch.disliked & reward.disliked_is_zero)
    return np.where(zero, 0.0, np.maximum(0.0, value))


def _cutoffs(ts: np.ndarray, day_start_us: int, day_end_us: int, config: SequenceConfig, seed: int,
             user_id: str) -> List[int]:
    """``sequences.choose_cutoffs`` on one user's (sorted) kept timestamps."""
    previous = np.concatenate([ts[:1], ts[:-1]])
    first_of_day = (np.arange(len(ts)) == 0) | (previous < day_start_us)
    starts = ts[(ts >= day_start_us) & (ts < day_end_us) & (first_of_day | (ts - previous >= config.session_gap_us))]
    candidates = [int(t) for t in starts]
    if len(candidates) > config.max_cutoffs_per_day:
        candidates = sorted(sorted(candidates, key=lambda t: (keyed_hash64("cutoff", seed, user_id, t), t))
                            [:config.max_cutoffs_per_day])
    return candidates


def history_positions(batch: Batch, lo: int, hi: int, watch_cost: int, config: SequenceConfig) -> np.ndarray:
    """Timeline positions (in [lo, hi), oldest first) that ``sequences.select_history_events`` keeps.

    Kept watches are always a suffix of the watches before the cutoff (at most max_watches, and at most what fits
    the token budget), kept searches likewise, so only those two suffixes are looked at: plus one event of each
    kind past the budget, which is where the reference stops looking for older events of the other kind."""
    kinds = batch.kind[lo:hi]
    watches = np.flatnonzero(kinds == 1)[::-1][:min(config.max_watches, config.max_tokens // watch_cost + 1)]
    searches = np.flatnonzero(kinds == 0)[::-1][:min(config.max_searches, config.max_tokens + 1)]
    newest_first = np.sort(np.concatenate([watches, searches]))[::-1] + lo
    cost = np.where(batch.kind[newest_first] == 1, watch_cost, 0)
    pieces = [len(batch.search_pieces[batch.index[p]]) for p in newest_first[cost == 0]]
    cost[cost == 0] = 1 + np.minimum(np.asarray(pieces, np.int64), config.max_pieces_per_query)
    return newest_first[np.cumsum(cost) <= config.max_tokens][::-1]


def look_ahead_targets(batch: Batch, cutoffs: Sequence[Tuple[int, int]], user_ids: Sequence[str], reward: np.ndarray,
                       config: SequenceConfig, seed: int) -> List[Tuple[List[int], List[float]]]:
    """``targets.sample_targets`` (or ``next_watch_target``) for every (user index, cutoff) of ``cutoffs`` at once:
    per cutoff, the picked watches (batch watch indices, in draw order) and each one's video's best reward in the
    window (what the stats report).

    Windows, the best watch per video and the draw order are array operations over all windows of the batch; only
    the keyed hash of each candidate is a Python call (a watch's (video, time) fields are hashed once per batch)."""
    is_watch = batch.kind == 1
    timeline = batch.index[is_watch]  # watch indices, user by user, each in timeline order (= index order)
    bounds = np.searchsorted(batch.user[is_watch], np.arange(len(batch.user_bounds)))
    ts = batch.w_ts[timeline]
    lo = np.zeros(len(cutoffs), np.int64)
    hi = np.zeros(len(cutoffs), np.int64)
    for e, (u, cutoff) in enumerate(cutoffs):
        a, b = bounds[u], bounds[u + 1]
        lo[e], hi[e] = a + np.searchsorted(ts[a:b], [cutoff, cutoff + config.window_us])
    # Every (window, watch in it) pair, windows in order, each window's watches in timeline order.
    lengths = hi - lo
    example = np.repeat(np.arange(len(cutoffs)), lengths)
    position = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    watch = timeline[position]
    value, video = reward[watch], batch.video_rank[watch]
    # Each window's best watch of each video: highest reward, the earliest on ties (sorted by window, video).
    order = np.lexsort([position, -value, video, example])
    first = np.ones(len(order), bool)
    first[1:] = (example[order][1:] != example[order][:-1]) | (video[order][1:] != video[order][:-1])
    best = order[first]
    if config.target_mode == "next":
        positive = np.flatnonzero(value > 0.0)  # in (window, timeline) order
        chosen = positive[np.r_[True, example[positive][1:] != example[positive][:-1]]] if len(positive) else positive
        # The chosen watch's video's best reward: its (window, video) group's, found in ``best``'s order.
        span = int(video.max()) + 1 if len(video) else 1
        group = np.searchsorted(example[best] * span + video[best], example[chosen] * span + video[chosen])
        picks, chosen_value = chosen, value[best[group]]
    else:
        candidates = best[value[best] > 0.0]
        keys = np.empty(len(candidates))
        hashed = batch.target_hash_keys
        video_ids, base, current = batch.video_id_list, None, -1
        for j, (e, i, r) in enumerate(zip(example[candidates].tolist(), watch[candidates].tolist(),
                                          value[candidates].tolist())):
            if e != current:  # keyed_hasher("target", seed, user_id, cutoff), once per window
                u, cutoff = cutoffs[e]
                base, current = hashlib.blake2b(digest_size=8), e
                base.update(b"".join([_hash_field("target"), _hash_field(seed), _hash_field(user_ids[u]),
                                      _hash_field(cutoff)]))
            key = hashed.get(i)
            if key is None:
                key = hashed[i] = _hash_field(video_ids[i]) + _hash_field(int(batch.w_ts[i]))
            digest = base.copy()
            digest.update(key)
            keys[j] = -math.log(uniform_from_hash(int.from_bytes(digest.digest(), "big"))) / r
        # Draw order: smallest key first (ties, which need equal 53-bit hashes, by timeline order); K per window.
        drawn = candidates[np.lexsort([watch[candidates], keys, example[candidates]])]
        starts = np.searchsorted(example[drawn], example[drawn])
        picks = drawn[np.arange(len(drawn)) - starts < config.max_targets]
        chosen_value = value[picks]
    split = np.searchsorted(example[picks], np.arange(1, len(cutoffs)))
    return [(w.tolist(), v.tolist()) for w, v in zip(np.split(watch[picks], split), np.split(chosen_value, split))]


def build_batch(users: Sequence[Tuple[str, Sequence[Pack]]], day_start_us: int, day_end_us: int,
                layout: VocabularyLayout, config: SequenceConfig, seed: int, tokenizer, featurizer
                ) -> List[Tuple[List[Dict[str, Any]], List[List[float]]]]:
    """Per user of ``users``: (examples as ``sequences.make_user_examples`` returns them, each example's target
    rewards (the best reward of the target's video in the window, as the stats report)). Raises on bad data."""
    batch = Batch(users, layout, config, tokenizer)
    reward = rewards(batch, config)
    watch_cost = config.watch_token_count(layout)
    with_history = []  # (user index, cutoff, history positions)
    for u, (user_id, _) in enumerate(users):
        lo, hi = batch.user_bounds[u], batch.user_bounds[u + 1]
        for cutoff in _cutoffs(batch.ts[lo:hi], day_start_us, day_end_us, config, seed, user_id):
            history = history_positions(batch, lo, lo + int(np.searchsorted(batch.ts[lo:hi], cutoff)), watch_cost,
                                        config)
            if len(history):
                with_history.append((u, cutoff, history))
    targets = look_ahead_targets(batch, [(u, cutoff) for u, cutoff, _ in with_history], [u for u, _ in users],
                                 reward, config, seed)
    planned = []  # (user index, cutoff, history positions, target watch indices, their rewards)
    for (u, cutoff, history), (picked, target_rewards) in zip(with_history, targets):
        if not batch.sid_ok[picked].all() or (picked and not batch.sid_ok[
                batch.index[history][batch.kind[history] == 1]].all()):
            raise ValueError(f"a watch's SID does not have the layout's {layout.sid_levels} levels")
        if picked:
            planned.append((u, cutoff, history, picked, target_rewards))

    watch_block, soft, feature_row = featurized_watch_tokens(batch, [h for _, _, h, _, _ in planned], layout, config,
                                                             featurizer)
    results: List[Tuple[List[Dict[str, Any]], List[List[float]]]] = [([], []) for _ in users]
    for u, cutoff, history, picked, target_rewards in planned:
        examples, rewards_of_user = results[u]
        examples.append(example_from_history(batch, users[u][0], cutoff, history, picked, watch_block, soft,
                                             feature_row, layout, config))
        rewards_of_user.append(target_rewards)
    return results


def featurized_watch_tokens(batch: Batch, histories: Sequence[np.ndarray], layout: VocabularyLayout,
                            config: SequenceConfig, featurizer) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tokens of every watch that some history of ``histories`` (timeline positions) holds, featurized in ONE
    tensorflow-transform call for the whole batch (a watch's features do not depend on the cutoff).

    Returns (``watch_block`` int64 [n, watch_token_count], ``soft`` float32 [n, F], ``feature_row``: per timeline
    position, its row in the two, -1 for positions no history holds)."""
    selected = np.unique(np.concatenate([np.zeros(0, np.int64)] + list(histories)))
    selected = selected[batch.kind[selected] == 1]
    rows = batch.index[selected]
    take = pa.array(rows, pa.int64())
    buckets, soft = featurizer.featurize_columns({
        "watch_ratio": batch.ratio[rows].astype(np.float32), "watch_time_s": batch.watch_time_s[rows].astype(
            np.float32), "surface": batch.surface.take(take).to_numpy(zero_copy_only=False),
        "device": batch.device.take(take).to_numpy(zero_copy_only=False),
        "liked": batch.liked[rows].astype(np.int64), "disliked": batch.disliked[rows].astype(np.int64),
        "time_gap_s": batch.gap_s[selected].astype(np.float32)})
    feature_row = np.full(len(batch.kind), -1)
    feature_row[selected] = np.arange(len(selected))
    conditions = np.asarray([vocabulary.condition_token(s) for s in schemas.SCENARIOS], TOKEN_DTYPE)
    watch_tokens = [conditions[batch.scenario[rows]][:, None], layout.sid_tokens(batch.sids[rows],
                                                                                 config.sid_length(layout))]
    if config.feature_mode == "hard":
        watch_tokens += [layout.feature_token(name, buckets[name].astype(TOKEN_DTYPE))[:, None]
                         for name in layout.feature_names]
    else:
        watch_tokens.append(np.full((len(rows), 1), SOFT_ID, TOKEN_DTYPE))
    return np.concatenate(watch_tokens, axis=1), soft, feature_row


def example_from_history(batch: Batch, user_id: str, cutoff: int, history: np.ndarray, picked: List[int],
             watch_block: np.ndarray, soft: np.ndarray, feature_row: np.ndarray, layout: VocabularyLayout,
             config: SequenceConfig) -> Dict[str, Any]:
    """One example dict of ``sequences.make_user_examples``: the history's tokens laid out oldest first."""
    is_watch = batch.kind[history] == 1
    rows = feature_row[history]
    search_tokens = [np.concatenate([[SEARCH_ID], layout.query_piece_token(
        np.asarray(batch.search_pieces[batch.index[p]], TOKEN_DTYPE))]).astype(TOKEN_DTYPE)
        for p in history[~is_watch]]
    lengths = np.where(is_watch, watch_block.shape[1], 0)
    lengths[~is_watch] = [len(t) for t in search_tokens]
    starts = np.cumsum(lengths) - lengths
    length = int(lengths.sum())
    tokens = np.full(config.max_tokens, PAD_ID, TOKEN_DTYPE)
    # Watches: a [n, watch_cost] block scattered at their start positions; searches one by one (few, short).
    tokens[(starts[is_watch][:, None] + np.arange(watch_block.shape[1])).ravel()] = watch_block[rows[is_watch]].ravel()
    for start, search in zip(starts[~is_watch], search_tokens):
        tokens[start:start + len(search)] = search
    sid_len = config.sid_length(layout)
    target_rows = np.full((config.max_targets, 1 + sid_len), PAD_ID, TOKEN_DTYPE)
    target_rows[:len(picked), 0] = [vocabulary.condition_token(schemas.SCENARIOS[batch.scenario[i]]) for i in picked]
    target_rows[:len(picked), 1:] = layout.sid_tokens(batch.sids[picked].reshape(len(picked), -1), sid_len)
    example = {
        "user_id": user_id, "cutoff_ts_us": cutoff, "tokens": tokens, "length": length,
        "num_watches": int(is_watch.sum()), "num_searches": int((~is_watch).sum()),
        "targets": target_rows, "num_targets": len(picked),
        "target_scenarios": [schemas.SCENARIOS[batch.scenario[i]] for i in picked],
        "target_video_ids": [batch.video_id_list[i] for i in picked],
    }
    if config.feature_mode == "soft":
        soft_features = np.zeros((config.max_tokens, soft.shape[1]), np.float32)
        soft_features[starts[is_watch] + 1 + sid_len] = soft[rows[is_watch]]
        example["soft_features"] = soft_features
    return example


def per_user_or_error(build, users: Sequence[Tuple[str, Sequence[Pack]]], *args) -> Iterator[Tuple[str, Any]]:
    """(user_id, ``build(users, *args)``'s result for that user, or the exception) per user: the batch at once, or,
    if it fails on bad data, user by user, so one user's bad data fails that user alone."""
    try:
        yield from zip((u for u, _ in users), build(users, *args))
    except (ValueError, KeyError, TypeError, IndexError) as batch_error:
        if len(users) == 1:
            yield users[0][0], batch_error
            return
        for user in users:
            yield from per_user_or_error(build, [user], *args)


def build_users(users: Sequence[Tuple[str, Sequence[Pack]]], *args) -> Iterator[Tuple[str, Any]]:
    """(user_id, (examples, rewards) or the exception) per user: the batch at once, or user by user if it fails."""
    return per_user_or_error(build_batch, users, *args)
