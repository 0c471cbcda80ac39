"""Multi-head dot-product attention and dropout for the user model, with one implementation per platform.

``attention(q, k, v, key_mask=..., mask=..., dropout_rng=..., dropout_rate=...)`` takes ``q [B, Tq, H, D]``,
``k, v [B, Tk, H, D]`` (the layout of ``jax.nn.dot_product_attention``), a key padding mask ``bool[B, Tk]`` and/or a
mask broadcastable to ``[B, 1, Tq, Tk]`` (causal, block-diagonal), and optionally dropout on the attention weights
(a key and a rate, or an explicit keep mask). Logits, softmax and the row sums are float32 whatever the input dtype
(bfloat16 under mixed precision). Implementations:

- ``"xla"``: ``jax.nn.dot_product_attention`` (XLA's fused attention; on accelerators, where it is the fast path).
  It has no attention-weight dropout, so it is used without dropout.
- ``"chunked"``: a flash-attention-style ``custom_vjp`` for CPUs: a ``lax.scan`` over (head, query block) chunks
  whose ``[B, q_block, Tk]`` logits stay in cache (about 2 MiB), the softmax is normalised on the ``[Tq, D]`` output
  instead of the ``[Tq, Tk]`` weights, the backward pass recomputes each chunk's weights from the saved
  log-sum-exp instead of storing ``[B, H, Tq, Tk]`` probabilities (and works in the transposed orientation, where
  three of its four products are plain matrix products), and dropout masks are drawn chunk by chunk inside the loop
  (the same ones again in the backward pass). On 2 CPU cores it trains the ``base`` encoder's attention about 2x
  faster than XLA's materialised softmax (``bench/model_training.py --attention auto,reference``). Batch stays a
  vector dimension of every chunk, so a data-sharded batch partitions across devices. Key padding only.
- ``"reference"``: the materialised softmax (what flax's ``MultiHeadDotProductAttention`` computes), used for
  attention-weight dropout on accelerators and for short sequences.

``"auto"`` (default): ``chunked`` on CPU for encoder-sized attention (``Tq >= 64``, ``Tq * Tk >= 2**14``, no ``mask``),
otherwise ``xla`` without dropout and ``reference`` with it. Every implementation gives the same outputs and
gradients up to float rounding (``tests/test_model.py``).

Dropout keep masks are drawn 8 bits per element from a counter-based hash (:func:`random_words`: two MurmurHash3
finalisers of each element's index, seeded by the dropout key; about a fortieth of the work of
``jax.random.bernoulli``'s threefry per element, which made dropout cost as much as the model's matmuls on CPU): the
keep probability is ``round(256 * (1 - rate)) / 256`` (0.8984 for rate 0.1) and kept values are scaled by its
inverse, so the expectation is exact. The bits depend only on the key and
the shape (and, for attention weights, the implementation: :func:`chunked_keep_mask` rebuilds the chunked kernel's
mask), never on how the batch is sharded.

Pure JAX: no Flax, Beam or TensorFlow.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "chunked", "reference")
# Additive bias of a masked logit (finite, so a fully masked row gives a uniform distribution, as flax's and
# jax.nn's attention do, instead of NaN).
MASKED = -1e30
# Elements of one chunk's [B, q_block, Tk] logits that the chunked implementation aims at (2 MiB in float32).
CHUNK_ELEMENTS = 2 ** 19
MIN_QUERY_BLOCK = 64
# The chunked implementation is used on CPU from this many (query, key) pairs per head and queries on.
CHUNKED_MIN_PAIRS = 2 ** 14
CHUNKED_MIN_QUERIES = 64


# ---------------------------------------------------------------------------------------------------------------
# Dropout.
# ---------------------------------------------------------------------------------------------------------------
def keep_threshold(rate: float) -> int:
    """Bytes below this are kept: ``round(256 * (1 - rate))``, clipped to [1, 256]."""
    return int(min(256, max(1, round(256 * (1.0 - float(rate))))))


def keep_probability(rate: float) -> float:
    """The effective keep probability of :func:`dropout_keep` for ``rate``."""
    return keep_threshold(rate) / 256.0


def _key_data(rng: jax.Array) -> jax.Array:
    """uint32 key data of a typed or raw PRNG key."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> jnp.uint32(16))
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> jnp.uint32(13))
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> jnp.uint32(16))


def random_words(rng: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
    """uint32 pseudo-random words of ``shape`` for dropout masks: a counter-based hash (two MurmurHash3 finalisers)
    of each element's flat index, seeded by the key's data. A tenth of threefry's work per word; the words depend
    only on the key and the shape (index iotas partition with any sharding). Indices wrap at 2**32 elements."""
    shape = tuple(int(s) for s in shape)
    seed = _key_data(rng).reshape(-1).astype(jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2 ** 32)
        stride *= shape[axis]
    mixed = _fmix32(index * jnp.uint32(0x9E3779B9) + seed[0])
    return _fmix32(mixed ^ seed[1])


def random_bytes(rng: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
    """uint8 random bytes of ``shape``: :func:`random_words` split into 4 bytes each."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return (random_words(rng, ()) & jnp.uint32(0xFF)).astype(jnp.uint8)
    last = shape[-1]
    words = random_words(rng, shape[:-1] + (-(-last // 4),))
    # Byte j of word i is element j * words + i of the last axis (any fixed assignment will do).
    data = jnp.concatenate([(words >> jnp.uint32(8 * j)).astype(jnp.uint8) for j in range(4)], axis=-1)
    return data[..., :last]


def dropout_keep(rng: jax.Array, shape: Tuple[int, ...], rate: float) -> jax.Array:
    """``bool[shape]``: True where a value is kept (probability :func:`keep_probability`)."""
    threshold = keep_threshold(rate)
    data = random_bytes(rng, shape)
    if threshold >= 256:
        return jnp.ones(shape, bool)
    return data < jnp.uint8(threshold)


def dropout(rng: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout of ``x`` with 8-bit keep masks (see the module docstring)."""
    if rate <= 0.0:
        return x
    keep = dropout_keep(rng, x.shape, rate)
    return jnp.where(keep, x * jnp.asarray(1.0 / keep_probability(rate), x.dtype), jnp.zeros((), x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------------------------
def _bias(key_mask: Optional[jax.Array], mask: Optional[jax.Array], batch: int, tk: int) -> jax.Array:
    """float32 additive bias broadcastable to [B, 1, Tq, Tk] (0 where attended, MASKED elsewhere)."""
    bias = jnp.zeros((1, 1, 1, tk), jnp.float32)
    if key_mask is not None:
        bias = bias + jnp.where(key_mask.astype(bool), 0.0, MASKED).astype(jnp.float32)[:, None, None, :]
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        bias = bias + jnp.where(mask, 0.0, MASKED).astype(jnp.float32)
    return bias


_FORCED: list = []


@contextlib.contextmanager
def use_implementation(implementation: str):
    """Within the block, calls with ``implementation="auto"`` use ``implementation`` (while tracing: wrap the
    ``jax.jit`` call or ``make_jaxpr`` that traces the model). For benchmarks and FLOP counting."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _FORCED.append(implementation)
    try:
        yield
    finally:
        _FORCED.pop()


def choose_implementation(implementation: str, q_len: int, k_len: int, has_mask: bool, has_dropout: bool,
                          platform: Optional[str] = None) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto" and _FORCED and _FORCED[-1] != "auto":
        forced = _FORCED[-1]
        if not ((forced == "chunked" and has_mask) or (forced == "xla" and has_dropout)):
            return forced
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "cpu" and not has_mask and q_len >= CHUNKED_MIN_QUERIES and q_len * k_len >= CHUNKED_MIN_PAIRS:
        return "chunked"
    return "reference" if has_dropout else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: Optional[jax.Array] = None,
              mask: Optional[jax.Array] = None, keep: Optional[jax.Array] = None, keep_prob: float = 1.0,
              dropout_rng: Optional[jax.Array] = None, dropout_rate: float = 0.0,
              implementation: str = "auto") -> jax.Array:
    """Softmax attention ``[B, Tq, H, D]`` (dtype of ``v``); see the module docstring.

    Attention-weight dropout, either ``keep``: an explicit ``bool[B, H, Tq, Tk]`` mask, kept weights scaled by
    ``1 / keep_prob``; or ``dropout_rng`` and ``dropout_rate``: masks drawn from the key (:func:`dropout_keep`
    statistics). The chunked implementation draws them chunk by chunk inside its loop, never materialising
    ``[B, H, Tq, Tk]`` (:func:`chunked_keep_mask` rebuilds that mask); the others draw the whole mask at once.
    """
    batch, q_len, heads, depth = q.shape
    k_len = k.shape[1]
    if keep is not None and dropout_rng is not None:
        raise ValueError("give either keep or dropout_rng, not both")
    if dropout_rng is not None and dropout_rate <= 0.0:
        dropout_rng = None
    has_dropout = keep is not None or dropout_rng is not None
    impl = choose_implementation(implementation, q_len, k_len, mask is not None, has_dropout)
    if dropout_rng is not None:
        if impl == "chunked":
            if mask is not None:
                raise ValueError("the chunked attention implementation takes a key padding mask only")
            bias = (jnp.zeros((batch, 1, k_len), jnp.float32) if key_mask is None
                    else jnp.where(key_mask.astype(bool), 0.0, MASKED).astype(jnp.float32)[:, None, :])
            return _chunked(q, k, v, bias, None, keep_probability(dropout_rate), seed=_key_data(dropout_rng),
                            threshold=keep_threshold(dropout_rate))
        keep = dropout_keep(dropout_rng, (batch, heads, q_len, k_len), dropout_rate)
        keep_prob = keep_probability(dropout_rate)
    if impl == "xla":
        if keep is not None:
            raise ValueError("the xla attention implementation has no attention-weight dropout")
        full = None
        if key_mask is not None or mask is not None:
            full = jnp.ones((1, 1, 1, k_len), bool)
            if key_mask is not None:
                full = full & key_mask.astype(bool)[:, None, None, :]
            if mask is not None:
                m = jnp.asarray(mask).astype(bool)
                full = full & m.reshape((1,) * (4 - m.ndim) + m.shape)
        dtype = v.dtype
        return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v, mask=full).astype(dtype)
    if impl == "chunked":
        if mask is not None:
            raise ValueError("the chunked attention implementation takes a key padding mask only")
        bias = (jnp.zeros((batch, 1, k_len), jnp.float32) if key_mask is None
                else jnp.where(key_mask.astype(bool), 0.0, MASKED).astype(jnp.float32)[:, None, :])
        return _chunked(q, k, v, bias, keep, float(keep_prob))
    return _reference(q, k, v, _bias(key_mask, mask, batch, k_len), keep, float(keep_prob))


def _reference(q, k, v, bias, keep, keep_prob):
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale + bias
    weights = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        weights = jnp.where(keep, weights * (1.0 / keep_prob), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
                      ).astype(v.dtype)


# The chunked (flash-style) implementation ----------------------------------------------------------------------
def query_block(batch: int, q_len: int, k_len: int) -> int:
    """The largest divisor of ``q_len`` with ``batch * block * k_len`` at most CHUNK_ELEMENTS, or at most
    MIN_QUERY_BLOCK if that is larger (smaller blocks make matrix products too small to run well)."""
    target = max(MIN_QUERY_BLOCK, CHUNK_ELEMENTS // max(1, batch * k_len))
    best = 1
    for block in range(1, q_len + 1):
        if q_len % block == 0 and block <= target:
            best = block
    return best


def _chunk_keep(seed: jax.Array, index: jax.Array, shape: Tuple[int, ...], threshold: int) -> jax.Array:
    """The chunked kernel's keep mask of chunk ``index`` (``[B, block, Tk]``)."""
    index = jnp.asarray(index).astype(jnp.uint32)
    chunk_seed = jnp.stack([_fmix32(seed[0] ^ _fmix32(index + jnp.uint32(0x632BE5AB))), seed[1]])
    data = random_bytes(chunk_seed, shape)
    return jnp.ones(shape, bool) if threshold >= 256 else data < jnp.uint8(threshold)


def chunked_keep_mask(rng: jax.Array, shape: Tuple[int, int, int, int], rate: float) -> jax.Array:
    """``bool[B, H, Tq, Tk]``: the attention-weight dropout mask that the chunked implementation draws from
    ``rng`` for attention of that shape (for tests: the other implementations given it as ``keep`` agree)."""
    batch, heads, q_len, k_len = shape
    block = query_block(batch, q_len, k_len)
    blocks = q_len // block
    seed = _key_data(rng)
    chunks = jnp.stack([_chunk_keep(seed, jnp.asarray(index), (batch, block, k_len), keep_threshold(rate))
                        for index in range(heads * blocks)])                       # [H * blocks, B, block, Tk]
    return (chunks.reshape(heads, blocks, batch, block, k_len).transpose(2, 0, 1, 3, 4)
            .reshape(batch, heads, q_len, k_len))


def _chunked(q, k, v, bias, keep, keep_prob, seed=None, threshold=256):
    batch, q_len, heads, depth = q.shape
    k_len = k.shape[1]
    block = query_block(batch, q_len, k_len)
    blocks = q_len // block
    # The softmax scale is applied to q here (autodiff carries it to dq), not to every chunk's logits.
    q = q * jnp.asarray(1.0 / math.sqrt(depth), q.dtype)
    # [B, Tq, H, D] -> [H * blocks, B, block, D]; keys/values [H, B, Tk, D]; keep [H * blocks, B, block, Tk].
    qs = (q.reshape(batch, blocks, block, heads, depth).transpose(3, 1, 0, 2, 4)
          .reshape(heads * blocks, batch, block, depth))
    kh, vh = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)
    ks = None
    if keep is not None:
        chunks = keep.reshape(batch, heads, blocks, block, k_len).transpose(1, 2, 0, 3, 4)
        # Both orientations: the forward reads [block, Tk] chunks, the backward [Tk, block] (a strided read of a
        # bool chunk inside the loop is several times slower than one transpose here).
        ks = (chunks.reshape(heads * blocks, batch, block, k_len),
              jnp.swapaxes(chunks, -1, -2).reshape(heads * blocks, batch, k_len, block))
    if seed is not None:
        ks = seed                                                                # masks drawn per chunk
    out = _flash(qs, kh, vh, bias, ks, keep_prob, blocks, int(threshold))
    return (out.reshape(heads, blocks, batch, block, depth).transpose(2, 1, 3, 0, 4)
            .reshape(batch, q_len, heads, depth))


def _chunk_logits(q, k, bias):
    return jnp.einsum("bqd,bkd->bqk", q, k, preferred_element_type=jnp.float32) + bias


def _forward_keep(keep, index, shape, threshold):
    """Chunk ``index``'s keep mask in [B, block, Tk] orientation: ``keep`` is None, a pair of pre-cut chunk arrays
    (both orientations) or the uint32 seed of per-chunk masks."""
    if keep is None:
        return None
    if isinstance(keep, tuple):
        return keep[0][index]
    return _chunk_keep(keep, index, shape, threshold)


def _backward_keep(keep, index, shape, threshold):
    if keep is None:
        return None
    if isinstance(keep, tuple):
        return keep[1][index]
    return jnp.swapaxes(_chunk_keep(keep, index, shape, threshold), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(qs, kh, vh, bias, keep, keep_prob, blocks, threshold):
    """Attention of pre-scaled query chunks ``qs`` against keys/values per head (see ``_chunked``)."""
    return _flash_fwd(qs, kh, vh, bias, keep, keep_prob, blocks, threshold)[0]


def _flash_fwd(qs, kh, vh, bias, keep, keep_prob, blocks, threshold):
    chunk_shape = qs.shape[1:3] + (kh.shape[2],)                                # [B, block, Tk]

    def body(_, index):
        head = index // blocks
        logits = _chunk_logits(qs[index], kh[head], bias)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        weights = jnp.exp(logits - peak)                                    # unnormalised
        total = jnp.sum(weights, axis=-1, keepdims=True)
        chunk_keep = _forward_keep(keep, index, chunk_shape, threshold)
        if chunk_keep is not None:
            weights = jnp.where(chunk_keep, weights * (1.0 / keep_prob), 0.0)
        out = jnp.einsum("bqk,bkd->bqd", weights.astype(vh.dtype), vh[head], preferred_element_type=jnp.float32)
        return None, ((out / total).astype(vh.dtype), peak + jnp.log(total))
    _, (out, lse) = jax.lax.scan(body, None, jnp.arange(qs.shape[0]))
    return out, (qs, kh, vh, bias, keep, out, lse)


def _flash_bwd(keep_prob, blocks, threshold, residuals, d_out):
    qs, kh, vh, bias, keep, out, lse = residuals
    chunk_shape = qs.shape[1:3] + (kh.shape[2],)
    # Worked in the transposed [B, Tk, q_block] orientation, so that three of the four products are plain
    # (non-transposed) matrix products on CPU: dv = p^T do, dp^T = v do^T, dk = ds^T q; only dq = (ds^T)^T k is not.
    bias_t = jnp.swapaxes(bias, 1, 2)                                           # [B, Tk, 1]

    def body(carry, index):
        dk, dv = carry
        head = index // blocks
        q, k, v = qs[index], kh[head], vh[head]
        logits_t = jnp.einsum("bkd,bqd->bkq", k, q, preferred_element_type=jnp.float32) + bias_t
        probs_t = jnp.exp(logits_t - jnp.swapaxes(lse[index], 1, 2))            # normalised weights, recomputed
        d_o = d_out[index].astype(jnp.float32)
        keep_t = _backward_keep(keep, index, chunk_shape, threshold)
        dropped_t = probs_t if keep_t is None else jnp.where(keep_t, probs_t * (1.0 / keep_prob), 0.0)
        dv_head = jnp.einsum("bkq,bqd->bkd", dropped_t, d_o)
        d_dropped_t = jnp.einsum("bkd,bqd->bkq", v.astype(jnp.float32), d_o)
        d_probs_t = d_dropped_t if keep_t is None else jnp.where(keep_t, d_dropped_t * (1.0 / keep_prob), 0.0)
        # softmax backward: d logits = p * (dp - sum_k p dp), and sum_k p dp = sum_d o * do.
        delta_t = jnp.swapaxes(jnp.sum(d_o * out[index].astype(jnp.float32), axis=-1, keepdims=True), 1, 2)
        d_logits_t = probs_t * (d_probs_t - delta_t)
        dk_head = jnp.einsum("bkq,bqd->bkd", d_logits_t, q.astype(jnp.float32))
        dq = jnp.einsum("bkq,bkd->bqd", d_logits_t, k.astype(jnp.float32))
        return (dk.at[head].add(dk_head), dv.at[head].add(dv_head)), dq

    zeros = (jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(body, zeros, jnp.arange(qs.shape[0]))
    return dq.astype(qs.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), jnp.zeros_like(bias), None


_flash.defvjp(_flash_fwd, _flash_bwd)


__all__ = ["IMPLEMENTATIONS", "attention", "choose_implementation", "dropout", "dropout_keep", "keep_probability",
           "keep_threshold", "chunked_keep_mask", "query_block", "random_bytes", "random_words", "use_implementation"]
