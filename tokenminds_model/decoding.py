"""Beam search over SID prefixes: one user -> the top-N L-level SID prefixes per scenario, best first.

The decoder is any pure, jit-able function ``logits_fn(enc_states, enc_mask, decoder_inputs) -> logits[N, t, V]``
(or ``logits_fn(params, enc_states, enc_mask, decoder_inputs)`` when ``params=`` is given, so a model's
``decode(params, ...)`` plugs in directly and its weights stay jit *arguments*, not baked-in constants).
``decoder_inputs`` is int32 ``[N, t]``: a condition token (``<LFV>`` / ``<SFV>``) followed by the SID tokens chosen
so far, level 0 first; the logits at the last position predict the next level. The function must be batch-aligned:
row ``n`` of ``decoder_inputs`` reads row ``n`` of ``enc_states`` / ``enc_mask``. ``enc_states`` and ``enc_mask``
may be any pytrees whose leaves have leading batch dimension B (e.g. per-layer cross-attention keys/values computed
once per user); this module only broadcasts and repeats them along that dimension.

Scoring
    The score of a prefix is ``sum_l log p_l(code_l | condition, codes_<l)`` where ``p_l`` is a softmax over the
    ``codebook_size`` ids of SID level ``l`` only (``layout.sid_token(l, 0) ...``): the model's logits are sliced to
    that level's id range before ``log_softmax``, so every other id (specials, other levels, features, queries) is
    excluded and the level's codes are renormalised among themselves. This is the probability of the code *given*
    that a level-l SID token is emitted, which is what prefix generation asks for.

    A ``PrefixConstraint`` removes codes *after* that log-softmax (disallowed codes get ``-inf``) and does NOT
    renormalise over the allowed codes: a constrained result has exactly the score the unconstrained search would give
    the same prefix, and constrained beam search with a wide enough beam equals exhaustive search restricted to the
    catalogue's prefixes.

Beam search
    Level 0 runs the decoder once per user (all beams share the empty prefix); each later level runs it on all
    ``B * beam_size`` live prefixes, scores the ``beam_size * codebook_size`` one-code extensions of each user and keeps
    the best ``beam_size`` (``jax.lax.top_k``; equal scores keep the lower (beam, code) index first). After the last
    level the best ``top_n <= beam_size`` beams are returned, best first. Beam search is approximate in general: a
    prefix pruned at level l cannot come back even if one of its extensions would have made the final top-N. It is
    exact (returns the true top-``top_n`` prefixes by total log-probability) when ``beam_size`` is at least the number
    of candidate prefixes at every level before the last, i.e. ``beam_size >= codebook_size ** (prefix_len - 1)``
    unconstrained, or ``>=`` the number of distinct catalogue prefixes of length ``prefix_len - 1`` when constrained:
    then nothing is pruned before the last level and the last level takes the exact top-k of all completions.

    There is no KV cache: the decoder re-reads the whole (short: at most ``prefix_len`` tokens) decoder input at
    every level. Shapes are fixed and everything runs in one ``jax.jit``-compiled function per (logits_fn, shapes,
    dtypes, prefix_len, beam_size, top_n, constraint structure); ``logits_fn`` is a static argument hashed by
    identity, so pass the same function object every call (not a fresh lambda/partial) or every call recompiles.
    ``TRACE_COUNTS["decode"]`` counts traces.

    Cost note: the encoder states are materialised once per beam row (``[C * B * beam_size, T, ...]``), as the
    batch-aligned ``logits_fn`` contract requires, and a decoder that projects cross-attention keys/values itself
    redoes that projection per row and level; passing precomputed per-layer keys/values as the ``enc_states`` pytree
    avoids the latter, and the grouped contract below avoids both (bench/decoding.py measures all three).

Grouped logits functions (``grouped=True``)
    Every public decoder takes ``grouped=False`` (keyword). With ``grouped=True`` the logits function has the
    *grouped* contract instead: ``logits_fn([params,] enc_states, enc_mask, decoder_inputs int[B, R, t]) ->
    logits[B, R, t, V]``, where the R rows of group ``b`` all read user ``b``'s encoder states (leading dimension
    B, passed un-tiled). ``_decode`` then never tiles the encoder states: it regroups its ``[C * B * beam_size, t]``
    decoder rows (row order (context, user, beam)) into ``[B, C * beam_size, t]`` (per user: context-major, then
    beam; level 0: ``[B, C, 1]``) and maps the logits back, so a model can compute the memory and its
    cross-attention keys/values once per user and level (``model.ModelFunctions.decode_grouped`` folds the R rows
    into its decoder's sequence axis with a block-diagonal causal mask, as training does for the K targets). Codes
    and scores equal the batch-aligned path's for an equivalent function (scores up to float rounding). ``grouped``
    is a static argument: each setting compiles separately.

Sentinels
    When fewer than ``top_n`` valid prefixes exist (constrained by a small catalogue, or ``codebook_size ** prefix_len
    < top_n``) the remaining slots, at the end, have score ``-inf`` and every code ``-1`` (``SENTINEL_CODE``).

Multi-context decoding
    ``multi_context_decode`` decodes several conditions (default ``<LFV>`` and ``<SFV>``) from ONE set of encoder
    states: the contexts are stacked along the batch dimension (``[C * B * beam_size, t]`` decoder rows, all reading
    the same user's encoder states) and run as one batched decoder call per level (with ``grouped=True``, as
    ``[B, C * beam_size, t]`` row groups over the un-tiled encoder states). ``separate_decode`` is the baseline
    it replaces: one full encoder pass plus one beam search per context.

Constraints (``PrefixConstraint``)
    Only emit SID prefixes that exist in a scenario's catalogue, applied as vectorised table look-ups under jit (no
    Python trie walk). Level 0 is always a table ``first[K]`` (next node id, -1 = not allowed). Later levels, per
    ``representation``:

    - ``"dense"``: ``allowed_l: bool[K**l, K]`` indexed by the flattened prefix id of the codes so far
      (``code_0 * K**(l-1) + ... + code_{l-1}``); the beam state is that prefix id. 16 MiB for K=256 at l=2.
    - ``"sparse"``: a CSR trie. Level-l prefixes are the sorted distinct catalogue prefixes of length l+1 (equivalently
      the sorted array of their prefix ids); a beam's state is its prefix's rank in that sorted array.
      ``offsets_l[rank_{l-1}] : offsets_l[rank_{l-1} + 1]`` is the contiguous run of its children in the level-l array
      and ``child_codes_l`` holds their last codes (sorted). One window gather of K entries plus a scatter gives the
      ``[rows, K]`` allowed mask and the children's ranks. Memory is O(number of catalogue prefixes), any K and L.

    ``"auto"`` (default) picks dense when its tables fit in ``max_dense_bytes`` (32 MiB by default: K=256 with
    prefix_len <= 3), sparse otherwise. Sparse arrays are padded to a power of two so that catalogues of similar size
    share one compilation.

Pure JAX/NumPy: no Beam or TensorFlow imports.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tokenminds_model.vocabulary import LFV_ID, SFV_ID, VocabularyLayout

DEFAULT_BEAM_SIZE = 20
DEFAULT_TOP_N = 20
SENTINEL_CODE = -1
DEFAULT_MAX_DENSE_BYTES = 32 * 2 ** 20
REPRESENTATIONS = ("auto", "dense", "sparse")

# Incremented each time the jitted decoder is traced (i.e. compiled for a new signature); tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()

LogitsFn = Callable[..., jax.Array]
DecodeResult = Tuple[jax.Array, jax.Array]


# ---------------------------------------------------------------------------------------------------------------
# Constraints.
# ---------------------------------------------------------------------------------------------------------------
def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class PrefixConstraint:
    """The SID prefixes (first ``prefix_len`` codes) that exist in one scenario's catalogue.

    Build with ``from_codes``. Host-side (NumPy) data: ``prefixes`` (int32 ``[M, prefix_len]``, distinct, sorted
    lexicographically) and the per-level tables described in the module docstring; the device copies used by the
    decoder are made lazily and cached. Hashable by identity.
    """

    def __init__(self, prefixes: np.ndarray, codebook_size: int, representation: str = "auto",
                 max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES):
        prefixes = np.asarray(prefixes)
        if prefixes.ndim != 2 or prefixes.shape[1] < 1:
            raise ValueError(f"prefixes must have shape [M, prefix_len >= 1], got {prefixes.shape}")
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
        self.codebook_size = int(codebook_size)
        self.prefix_len = int(prefixes.shape[1])
        self.max_dense_bytes = int(max_dense_bytes)
        self.prefixes = np.unique(prefixes.astype(np.int32), axis=0).reshape(-1, self.prefix_len)
        dense_ids_fit = self.codebook_size ** self.prefix_len < 2 ** 31  # int32 prefix ids
        if representation == "auto":
            representation = ("dense" if dense_ids_fit and self.dense_bytes(self.prefix_len) <= max_dense_bytes
                              else "sparse")
        if representation == "dense" and not dense_ids_fit:
            raise ValueError(f"dense tables need prefix ids below 2**31; codebook_size {self.codebook_size} ** "
                             f"prefix_len {self.prefix_len} is too large: use representation='sparse'")
        if self.codebook_size ** self.prefix_len >= 2 ** 63:
            raise ValueError(f"codebook_size {self.codebook_size} ** prefix_len {self.prefix_len} overflows int64 "
                             f"prefix ids")
        self.representation = representation
        self._host_tables: Optional[Dict[str, Any]] = None

    @classmethod
    def from_codes(cls, sid_codes: Any, prefix_len: int, codebook_size: int, representation: str = "auto",
                   max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES) -> "PrefixConstraint":
        """The constraint allowing exactly the length-``prefix_len`` prefixes of ``sid_codes`` (int ``[M, levels]``,
        ``levels >= prefix_len``, codes in ``[0, codebook_size)``; duplicates are fine, M may be 0)."""
        codes = np.asarray(sid_codes)
        if codes.ndim != 2:
            raise ValueError(f"sid_codes must have shape [M, levels], got {codes.shape}")
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"sid_codes must be integers, got dtype {codes.dtype}")
        if not 1 <= prefix_len <= codes.shape[1]:
            raise ValueError(f"prefix_len {prefix_len} out of range [1, {codes.shape[1]}] for sid_codes of shape "
                             f"{codes.shape}")
        codes = codes[:, :prefix_len]
        if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
            raise ValueError(f"sid_codes out of range [0, {codebook_size}): min {codes.min()}, max {codes.max()}")
        return cls(codes, codebook_size, representation, max_dense_bytes)

    # Sizes --------------------------------------------------------------------------------------------------------
    def dense_bytes(self, levels: int) -> int:
        """Bytes of the dense tables for the first ``levels`` levels (one context)."""
        return sum(self.codebook_size ** (level + 1) for level in range(levels))

    @property
    def num_prefixes(self) -> int:
        return int(self.prefixes.shape[0])

    def num_prefixes_at(self, level: int) -> int:
        """Distinct catalogue prefixes of length ``level + 1``."""
        return int(np.unique(self.prefixes[:, :level + 1], axis=0).shape[0]) if self.num_prefixes else 0

    def with_representation(self, representation: str) -> "PrefixConstraint":
        if representation == self.representation:
            return self
        return PrefixConstraint(self.prefixes, self.codebook_size, representation, self.max_dense_bytes)

    def contains(self, codes: Any) -> np.ndarray:
        """Host-side check: bool ``[...]`` whether each ``codes[..., :prefix_len]`` row (length <= prefix_len is
        allowed: then it is a prefix of a catalogue prefix) exists in the catalogue."""
        codes = np.asarray(codes)
        length = codes.shape[-1]
        if not 1 <= length <= self.prefix_len:
            raise ValueError(f"codes must have 1..{self.prefix_len} levels, got {length}")
        known = {tuple(row) for row in self.prefixes[:, :length].tolist()}
        flat = codes.reshape(-1, length).tolist()
        return np.array([tuple(row) in known for row in flat], dtype=bool).reshape(codes.shape[:-1])

    # Host tables -------------------------------------------------------------------------------------------------
    def host_tables(self) -> Dict[str, Any]:
        """NumPy tables for all ``prefix_len`` levels (cached). Keys: ``first`` int32[K] (next state, -1 = not
        allowed); dense: ``allowed`` = [bool[K**l, K] for l in 1..prefix_len-1]; sparse: ``offsets`` = [int32 of
        length n_{l-1} + 1], ``child_codes`` = [int32 of length n_l], n_l = distinct prefixes of length l+1."""
        if self._host_tables is not None:
            return self._host_tables
        K = self.codebook_size
        levels = [np.unique(self.prefixes[:, :l + 1], axis=0).reshape(-1, l + 1) for l in range(self.prefix_len)]
        first = np.full(K, -1, np.int32)
        if self.representation == "dense":
            first[levels[0][:, 0]] = levels[0][:, 0]
            allowed = []
            for l in range(1, self.prefix_len):
                table = np.zeros((K ** l, K), dtype=bool)
                table[_prefix_ids(levels[l][:, :l], K), levels[l][:, l]] = True
                allowed.append(table)
            tables: Dict[str, Any] = {"first": first, "allowed": allowed}
        else:
            first[levels[0][:, 0]] = np.arange(levels[0].shape[0], dtype=np.int32)
            offsets, child_codes = [], []
            for l in range(1, self.prefix_len):
                # Rows of levels[l] are sorted, so each parent's children are one contiguous, code-sorted run and
                # the parents appear in the order of levels[l-1]. A parent's rank = its index in levels[l-1].
                parents = _rank_rows(levels[l - 1], levels[l][:, :l], K)
                counts = np.bincount(parents, minlength=levels[l - 1].shape[0])
                offsets.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
                child_codes.append(levels[l][:, l].astype(np.int32))
            tables = {"first": first, "offsets": offsets, "child_codes": child_codes}
        self._host_tables = tables
        return tables

    def __repr__(self) -> str:
        return (f"PrefixConstraint(prefixes={self.num_prefixes}, prefix_len={self.prefix_len}, "
                f"codebook_size={self.codebook_size}, representation={self.representation!r})")


def _prefix_ids(codes: np.ndarray, K: int) -> np.ndarray:
    ids = np.zeros(codes.shape[0], dtype=np.int64)
    for column in range(codes.shape[1]):
        ids = ids * K + codes[:, column]
    return ids


def _rank_rows(sorted_rows: np.ndarray, rows: np.ndarray, K: int) -> np.ndarray:
    """Index of each of ``rows`` in ``sorted_rows`` (lexicographically sorted, distinct, all present)."""
    return np.searchsorted(_prefix_ids(sorted_rows, K), _prefix_ids(rows, K))


@dataclasses.dataclass(frozen=True)
class _StackedTables:
    """Device tables of C contexts (leading axis C), for ``levels`` levels. A jit argument (a pytree)."""
    active: jax.Array                    # bool[C]: False = context unconstrained (its tables are ignored)
    first: jax.Array                     # int32[C, K]
    allowed: Tuple[jax.Array, ...]       # dense: bool[C, K**l, K], l = 1..levels-1
    offsets: Tuple[jax.Array, ...]       # sparse: int32[C, P_{l-1} + 1]
    child_codes: Tuple[jax.Array, ...]   # sparse: int32[C, P_l + K], padded with K
    representation: str
    levels: int


jax.tree_util.register_dataclass(_StackedTables, data_fields=["active", "first", "allowed", "offsets", "child_codes"],
                                 meta_fields=["representation", "levels"])


@functools.lru_cache(maxsize=8)
def _stack_constraints(constraints: Tuple[Optional[PrefixConstraint], ...], levels: int) -> _StackedTables:
    """Device tables for one constraint per context (None = unconstrained), first ``levels`` levels. Cached by the
    identity of the constraint objects (holds up to 8 stacks)."""
    present = [c for c in constraints if c is not None]
    K = present[0].codebook_size
    for c in present:
        if c.codebook_size != K:
            raise ValueError(f"constraints disagree on codebook_size: {[c.codebook_size for c in present]}")
        if c.prefix_len < levels:
            raise ValueError(f"constraint for prefix_len {c.prefix_len} cannot constrain {levels} levels")
    representation = "dense" if all(c.representation == "dense" for c in present) else "sparse"
    present_tables = {id(c): c.with_representation(representation).host_tables() for c in present}
    per_context = [present_tables[id(c)] if c is not None else None for c in constraints]
    active = np.array([c is not None for c in constraints], dtype=bool)
    first = np.stack([t["first"] if t is not None else np.full(K, -1, np.int32) for t in per_context])
    allowed, offsets, child_codes = [], [], []
    if representation == "dense":
        for l in range(1, levels):
            allowed.append(np.stack([t["allowed"][l - 1] if t is not None else np.zeros((K ** l, K), bool)
                                     for t in per_context]))
    else:
        for l in range(1, levels):
            empty = np.zeros(1, np.int32)
            offs = [t["offsets"][l - 1] if t is not None else empty for t in per_context]
            kids = [t["child_codes"][l - 1] if t is not None else np.zeros(0, np.int32) for t in per_context]
            parents_padded = _next_power_of_two(max(len(o) - 1 for o in offs) + 1)
            children_padded = _next_power_of_two(max(max(len(k) for k in kids), 1)) + K
            # Padded parents get empty child runs; padded children get code K, which matches no code.
            offsets.append(np.stack([np.pad(o, (0, parents_padded + 1 - len(o)), mode="edge") for o in offs]))
            child_codes.append(np.stack([np.pad(k, (0, children_padded - len(k)), constant_values=K) for k in kids]))
    return _StackedTables(active=jnp.asarray(active), first=jnp.asarray(first),
                          allowed=tuple(jnp.asarray(a) for a in allowed),
                          offsets=tuple(jnp.asarray(o) for o in offsets),
                          child_codes=tuple(jnp.asarray(c) for c in child_codes),
                          representation=representation, levels=levels)


def _level_mask(tables: _StackedTables, level: int, context: jax.Array, state: jax.Array,
                K: int) -> Tuple[jax.Array, jax.Array]:
    """For rows with context ``context`` int32[R] and constraint state ``state`` int32[R] (prefix id or rank of the
    codes chosen so far), the allowed next codes bool[R, K] and the state after each code int32[R, K]."""
    rows = context.shape[0]
    if level == 0:
        next_state = tables.first[context]                                      # [R, K]
        allowed = next_state >= 0
    elif tables.representation == "dense":
        table = tables.allowed[level - 1]                                       # [C, K**l, K]
        parent = jnp.clip(state, 0, table.shape[1] - 1)
        allowed = table[context, parent]                                        # [R, K]
        next_state = parent[:, None] * K + jnp.arange(K, dtype=jnp.int32)[None, :]
    else:
        offsets, child_codes = tables.offsets[level - 1], tables.child_codes[level - 1]
        parent = jnp.clip(state, 0, offsets.shape[1] - 2)
        lo = offsets[context, parent]                                           # [R]
        count = offsets[context, parent + 1] - lo
        j = jnp.arange(K, dtype=jnp.int32)[None, :]
        index = lo[:, None] + j                                                 # [R, K], < P_l + K: in bounds
        codes = child_codes[context[:, None], index]
        column = jnp.where(j < count[:, None], codes, K)                        # invalid -> dummy column K
        row = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], column.shape)
        allowed = jnp.zeros((rows, K + 1), bool).at[row, column].set(True)[:, :K]
        next_state = jnp.full((rows, K + 1), -1, jnp.int32).at[row, column].set(index)[:, :K]
    allowed = allowed | ~tables.active[context][:, None]
    return allowed, next_state


# ---------------------------------------------------------------------------------------------------------------
# Incremental decoders (KV cache).
# ---------------------------------------------------------------------------------------------------------------
class IncrementalDecoder:
    """A decoder that beam search drives one position at a time, with a per-row cache (the grouped layout).

    ``start(params, enc_states, enc_mask) -> memory``: what every step reads, computed once per user (e.g. each
    layer's cross-attention keys/values; any pytree). ``step(params, memory, cache, tokens int32[B, R], position)
    -> (logits float32[B, R, V], cache)``: the logits for the token after each row's ``tokens`` at decoder position
    ``position`` (a Python int: 0 = the condition token), given ``cache``, the rows' state of positions
    ``0..position-1`` (None at 0), a pytree whose leaves have leading dimensions ``[B, R]``. Between levels beam
    search reorders the cache's axis 1 so that each new beam row continues its parent's cache. Row r of user b is in
    the grouped order (context-major, then beam). Subclasses must be hashable (identity is fine) and should be
    reused: the decoder is a static argument of the jitted search.
    """

    def start(self, params: Any, enc_states: Any, enc_mask: Any) -> Any:
        raise NotImplementedError

    def step(self, params: Any, memory: Any, cache: Any, tokens: jax.Array, position: int) -> Tuple[jax.Array, Any]:
        raise NotImplementedError


def _reorder_cache(cache: Any, source: jax.Array) -> Any:
    """``cache`` leaves ``[B, R_old, ...]`` -> ``[B, R_new, ...]``: row r of user b becomes old row source[b, r]."""
    def take(leaf):
        index = source.reshape(source.shape + (1,) * (leaf.ndim - 2))
        return jnp.take_along_axis(leaf, index, axis=1)
    return jax.tree_util.tree_map(take, cache)


# ---------------------------------------------------------------------------------------------------------------
# The jitted decoder.
# ---------------------------------------------------------------------------------------------------------------
def _tile_batch(tree: Any, contexts: int, repeats: int) -> Any:
    """[B, ...] -> [contexts * B * repeats, ...], row order (context, user, repeat)."""
    def tile(x):
        x = jnp.asarray(x)
        x = jnp.broadcast_to(x[None], (contexts,) + x.shape).reshape((contexts * x.shape[0],) + x.shape[1:])
        return jnp.repeat(x, repeats, axis=0) if repeats > 1 else x
    return jax.tree_util.tree_map(tile, tree)


def _group_rows(x: jax.Array, contexts: int, users: int, repeats: int) -> jax.Array:
    """[contexts * users * repeats, ...] in row order (context, user, repeat) -> [users, contexts * repeats, ...]
    (per user: context-major, then repeat)."""
    x = x.reshape((contexts, users, repeats) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((users, contexts * repeats) + x.shape[3:])


def _ungroup_rows(x: jax.Array, contexts: int, users: int, repeats: int) -> jax.Array:
    """The inverse of ``_group_rows``: [users, contexts * repeats, ...] -> [contexts * users * repeats, ...]."""
    x = x.reshape((users, contexts, repeats) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((contexts * users * repeats,) + x.shape[3:])


@functools.partial(jax.jit, static_argnames=("logits_fn", "with_params", "grouped", "sid_start", "codebook_size",
                                             "prefix_len", "beam_size", "top_n"))
def _decode(params: Any, enc_states: Any, enc_mask: Any, condition_tokens: jax.Array,
            tables: Optional[_StackedTables], *, logits_fn: LogitsFn, with_params: bool, sid_start: int,
            codebook_size: int, prefix_len: int, beam_size: int, top_n: int, grouped: bool = False) -> DecodeResult:
    """Beam search for C contexts at once. Returns codes int32[C, B, top_n, L] and scores float32[C, B, top_n]."""
    TRACE_COUNTS["decode"] += 1
    K, N, L = codebook_size, beam_size, prefix_len
    C = condition_tokens.shape[0]
    B = jax.tree_util.tree_leaves(enc_states)[0].shape[0]
    CB = C * B
    incremental = isinstance(logits_fn, IncrementalDecoder)
    memory = cache = None
    if incremental:
        memory = logits_fn.start(params, enc_states, enc_mask)

    def step(tokens, position, repeats):
        """Incremental: the next-token logits float32[CB * repeats, V] of rows ``tokens`` int32[CB * repeats] at
        ``position`` (row order (context, user, repeat)), advancing ``cache``."""
        nonlocal cache
        logits, cache = logits_fn.step(params, memory, cache, _group_rows(tokens, C, B, repeats), position)
        if logits.ndim != 3 or logits.shape[:2] != (B, C * repeats):
            raise ValueError(f"an incremental decoder's step must return [B, R, V] logits for tokens "
                             f"{(B, C * repeats)}, got {logits.shape}")
        check_vocab(logits)
        return _ungroup_rows(logits, C, B, repeats).astype(jnp.float32)

    def apply(states, mask, inputs):
        return logits_fn(params, states, mask, inputs) if with_params else logits_fn(states, mask, inputs)

    def check_vocab(logits):
        if logits.shape[-1] < sid_start + L * K:
            raise ValueError(f"logits have {logits.shape[-1]} ids, fewer than the SID ranges need "
                             f"({sid_start + L * K})")

    tiled: Dict[int, Tuple[Any, Any]] = {}

    def call(inputs, repeats):
        """Last-position logits float32[rows, V] for decoder rows ``inputs`` int32[C * B * repeats, t] (row order
        (context, user, repeat))."""
        if grouped:
            rows = _group_rows(inputs, C, B, repeats)                           # [B, C * repeats, t]
            logits = apply(enc_states, enc_mask, rows)
            if logits.ndim != 4 or logits.shape[:3] != rows.shape:
                raise ValueError(f"a grouped logits_fn must return [B, R, t, V] for decoder inputs {rows.shape}, "
                                 f"got {logits.shape}")
            check_vocab(logits)
            return _ungroup_rows(logits[:, :, -1, :], C, B, repeats).astype(jnp.float32)
        if repeats not in tiled:
            tiled[repeats] = (_tile_batch(enc_states, C, repeats), _tile_batch(enc_mask, C, repeats))
        logits = apply(*tiled[repeats], inputs)
        if logits.ndim != 3 or logits.shape[:2] != inputs.shape:
            raise ValueError(f"logits_fn must return [N, t, V] for decoder inputs {inputs.shape}, got {logits.shape}")
        check_vocab(logits)
        return logits[:, -1, :].astype(jnp.float32)                            # [rows, V]

    def level_log_probs(logits, level):
        start = sid_start + level * K
        return jax.nn.log_softmax(logits[:, start:start + K], axis=-1)          # restricted to level `level`'s ids

    context_of_user = jnp.repeat(jnp.arange(C, dtype=jnp.int32), B)                        # [CB]
    condition_of_user = condition_tokens.astype(jnp.int32)[context_of_user]                # [CB]

    # Level 0: every beam has the empty prefix, so run the decoder once per (context, user).
    if incremental:
        log_probs = level_log_probs(step(condition_of_user, 0, 1), 0)                      # [CB, K]
    else:
        log_probs = level_log_probs(call(condition_of_user[:, None], 1), 0)                # [CB, K]
    log_probs = jnp.broadcast_to(log_probs[:, None, :], (CB, N, K))
    scores = jnp.concatenate([jnp.zeros((CB, 1), jnp.float32), jnp.full((CB, N - 1), -jnp.inf, jnp.float32)], 1)
    codes = jnp.zeros((CB, N, 0), jnp.int32)
    state = jnp.zeros((CB, N), jnp.int32)

    for level in range(L):
        if level > 0 and incremental:
            # Only each beam's newest token (the code chosen at level - 1) is fed; the cache holds the rest.
            newest = (sid_start + K * (level - 1) + codes[:, :, -1]).reshape(CB * N)
            log_probs = level_log_probs(step(newest, level, N), level).reshape(CB, N, K)
        elif level > 0:
            level_offsets = sid_start + K * jnp.arange(level, dtype=jnp.int32)
            inputs = jnp.concatenate([jnp.repeat(condition_of_user, N)[:, None],
                                      (codes + level_offsets).reshape(CB * N, level)], axis=1)
            log_probs = level_log_probs(call(inputs, N), level).reshape(CB, N, K)
        if tables is not None:
            allowed, next_state = _level_mask(tables, level, jnp.repeat(context_of_user, N), state.reshape(-1), K)
            log_probs = jnp.where(allowed.reshape(CB, N, K), log_probs, -jnp.inf)
        candidates = (scores[:, :, None] + log_probs).reshape(CB, N * K)
        scores, index = jax.lax.top_k(candidates, N)                                        # best first
        parent, code = index // K, (index % K).astype(jnp.int32)
        codes = jnp.concatenate([jnp.take_along_axis(codes, parent[:, :, None], axis=1), code[:, :, None]], axis=2)
        if incremental and level + 1 < L:
            # Each new beam continues its parent's cache. Grouped rows are (context, beam) per user; the cache of
            # level 0 has one row per context (all beams share the empty prefix).
            per_context = 1 if level == 0 else N
            source = (jnp.arange(C, dtype=jnp.int32)[:, None, None] * per_context
                      + (parent if level else jnp.zeros_like(parent)).reshape(C, B, N).astype(jnp.int32))
            cache = _reorder_cache(cache, jnp.swapaxes(source, 0, 1).reshape(B, C * N))
        if tables is not None and level + 1 < L:
            state = jnp.take_along_axis(next_state.reshape(CB, N * K), index, axis=1)

    scores, codes = scores[:, :top_n], codes[:, :top_n]
    codes = jnp.where(jnp.isneginf(scores)[:, :, None], SENTINEL_CODE, codes)
    return codes.reshape(C, B, top_n, L), scores.reshape(C, B, top_n)


def _check_args(layout: VocabularyLayout, prefix_len: int, beam_size: int, top_n: int) -> None:
    if not 1 <= prefix_len <= layout.sid_levels:
        raise ValueError(f"prefix_len {prefix_len} out of range [1, {layout.sid_levels}]")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= top_n <= beam_size:
        raise ValueError(f"top_n must be in [1, beam_size={beam_size}], got {top_n}")


def _run(logits_fn, enc_states, enc_mask, condition_tokens: Sequence[int], layout: VocabularyLayout,
         prefix_len: int, beam_size: int, top_n: int,
         constraints: Optional[Sequence[Optional[PrefixConstraint]]], params: Any,
         grouped: bool = False) -> DecodeResult:
    _check_args(layout, prefix_len, beam_size, top_n)
    tables = None
    if constraints is not None and any(c is not None for c in constraints):
        for c in constraints:
            if c is not None and c.codebook_size != layout.codebook_size:
                raise ValueError(f"constraint codebook_size {c.codebook_size} != layout's {layout.codebook_size}")
        tables = _stack_constraints(tuple(constraints), prefix_len)
    return _decode(params, enc_states, enc_mask, jnp.asarray(list(condition_tokens), jnp.int32), tables,
                   logits_fn=logits_fn, with_params=params is not None, sid_start=layout.sid_start,
                   codebook_size=layout.codebook_size, prefix_len=int(prefix_len), beam_size=int(beam_size),
                   top_n=int(top_n), grouped=bool(grouped))


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------
def beam_search(logits_fn: LogitsFn, enc_states: Any, enc_mask: Any, condition_token: int,
                layout: VocabularyLayout, prefix_len: int, beam_size: int = DEFAULT_BEAM_SIZE,
                top_n: int = DEFAULT_TOP_N, constraint: Optional[PrefixConstraint] = None, *,
                params: Any = None, grouped: bool = False) -> DecodeResult:
    """Top-``top_n`` SID prefixes of length ``prefix_len`` for each of B users under one condition token.

    Returns ``(sid_codes int32[B, top_n, prefix_len], scores float32[B, top_n])``, best first; scores are total
    log-probabilities (see the module docstring), ``-inf`` with codes ``-1`` in slots without a valid prefix.
    ``condition_token`` is traced, so LFV and SFV calls of the same shapes share one compilation. ``grouped=True``:
    ``logits_fn`` has the grouped contract (module docstring).
    """
    codes, scores = _run(logits_fn, enc_states, enc_mask, (int(condition_token),), layout, prefix_len, beam_size,
                         top_n, None if constraint is None else (constraint,), params, grouped)
    return codes[0], scores[0]


def multi_context_decode(logits_fn: LogitsFn, enc_states: Any, enc_mask: Any,
                         condition_tokens: Sequence[int] = (LFV_ID, SFV_ID), *, layout: VocabularyLayout,
                         prefix_len: int, beam_size: int = DEFAULT_BEAM_SIZE, top_n: int = DEFAULT_TOP_N,
                         constraints: Optional[Mapping[int, Optional[PrefixConstraint]]] = None,
                         params: Any = None, grouped: bool = False) -> Dict[int, DecodeResult]:
    """Beam search for every condition token from one set of encoder states, as one batched decoder run.

    The C contexts are stacked along the batch dimension: each level calls ``logits_fn`` once on
    ``[C * B * beam_size, t]`` decoder inputs (level 0: ``[C * B, 1]``) whose rows all read the same user's
    encoder states. ``constraints`` maps a condition token to its catalogue's ``PrefixConstraint`` (missing or None =
    unconstrained). Returns ``{condition_token: (codes int32[B, top_n, prefix_len], scores float32[B, top_n])}``,
    each equal to ``beam_search`` for that condition alone. ``grouped=True``: ``logits_fn`` has the grouped
    contract (module docstring) and is called once per level on ``[B, C * beam_size, t]`` rows (level 0:
    ``[B, C, 1]``) with the un-tiled encoder states.
    """
    condition_tokens = tuple(int(c) for c in condition_tokens)
    if not condition_tokens or len(set(condition_tokens)) != len(condition_tokens):
        raise ValueError(f"condition_tokens must be distinct and non-empty, got {condition_tokens}")
    per_context = None
    if constraints:
        unknown = set(constraints) - set(condition_tokens)
        if unknown:
            raise ValueError(f"constraints for conditions {sorted(unknown)} not in {condition_tokens}")
        per_context = [constraints.get(c) for c in condition_tokens]
    codes, scores = _run(logits_fn, enc_states, enc_mask, condition_tokens, layout, prefix_len, beam_size, top_n,
                         per_context, params, grouped)
    return {c: (codes[i], scores[i]) for i, c in enumerate(condition_tokens)}


@functools.lru_cache(maxsize=32)
def _jitted(function: Callable) -> Callable:
    return jax.jit(function)


def separate_decode(encode_fn: Callable, logits_fn: LogitsFn, encoder_inputs: Any,
                    condition_tokens: Sequence[int] = (LFV_ID, SFV_ID), *, layout: VocabularyLayout,
                    prefix_len: int, beam_size: int = DEFAULT_BEAM_SIZE, top_n: int = DEFAULT_TOP_N,
                    constraints: Optional[Mapping[int, Optional[PrefixConstraint]]] = None,
                    params: Any = None, grouped: bool = False) -> Dict[int, DecodeResult]:
    """The baseline ``multi_context_decode`` replaces: for each condition, a full encoder pass
    (``encode_fn(encoder_inputs)`` or ``encode_fn(params, encoder_inputs)`` -> ``(enc_states, enc_mask)``, jitted)
    followed by its own ``beam_search``. Same return value as ``multi_context_decode``."""
    encode = _jitted(encode_fn)
    constraints = constraints or {}
    results = {}
    for condition in condition_tokens:
        enc_states, enc_mask = encode(params, encoder_inputs) if params is not None else encode(encoder_inputs)
        results[int(condition)] = beam_search(logits_fn, enc_states, enc_mask, int(condition), layout, prefix_len,
                                              beam_size, top_n, constraints.get(int(condition)), params=params,
                                              grouped=grouped)
    return results
