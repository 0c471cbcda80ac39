"""Tests of SID-prefix beam search, multi-context decoding and catalogue-constrained decoding.

Everything is checked against exhaustive search on settings small enough to enumerate every prefix (codebook 2..16,
2..3 levels): the reference below scores all K**L prefixes (or all catalogue prefixes) by calling the same logits
function level by level, then sorts. Decoders are hand-made JAX functions with random tables and a tiny random Flax
encoder-decoder (one self-attention encoder layer, one causal self-attention + cross-attention decoder layer).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tokenminds_model import decoding
from tokenminds_model.decoding import (SENTINEL_CODE, PrefixConstraint, beam_search, multi_context_decode,
                                       separate_decode)
from tokenminds_model.model import ModelConfig, model_functions
from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SFV_ID, VocabularyLayout

D_MODEL = 16
ENC_LEN = 6
USERS = 3


def make_layout(codebook_size: int, sid_levels: int = 3) -> VocabularyLayout:
    return VocabularyLayout(sid_levels=sid_levels, codebook_size=codebook_size, query_vocab_size=8,
                            disambiguation_size=2, feature_sizes=(("watch_ratio", 2),))


def make_logits_fn(vocab_size: int, seed: int):
    """A causal decoder-like function of the whole prefix and the (masked) encoder states, with random tables."""
    rng = np.random.default_rng(seed)
    embed = jnp.asarray(rng.normal(size=(vocab_size, D_MODEL)), jnp.float32)
    out = jnp.asarray(rng.normal(size=(D_MODEL, vocab_size)) * 3.0, jnp.float32)

    def logits_fn(enc_states, enc_mask, decoder_inputs):
        positions = 1.0 + jnp.arange(decoder_inputs.shape[1], dtype=jnp.float32)
        hidden = jnp.cumsum(embed[decoder_inputs] * positions[None, :, None], axis=1)
        context = (enc_states * enc_mask[..., None]).sum(axis=1)[:, None, :]
        # Multiply-and-sum rather than a matmul: every row's logits are then bitwise independent of the batch size,
        # so batched and per-context decoding can be compared exactly.
        return (jnp.tanh(hidden + context)[..., :, None] * out).sum(axis=-2)

    return logits_fn


def make_grouped(logits_fn):
    """The grouped-contract version of a batch-aligned ``logits_fn`` (decoder_inputs [B, R, t] -> [B, R, t, V]).
    It tiles the states itself, so (with the batch-invariant ``make_logits_fn``) its logits are bitwise those of the
    batch-aligned path: tests of the grouped plumbing (row order, reshapes) can then compare exactly."""
    def grouped(enc_states, enc_mask, decoder_inputs):
        users, rows, length = decoder_inputs.shape
        logits = logits_fn(jnp.repeat(enc_states, rows, axis=0), jnp.repeat(enc_mask, rows, axis=0),
                           decoder_inputs.reshape(users * rows, length))
        return logits.reshape(users, rows, length, -1)
    return grouped


def encoder_states(seed: int, users: int = USERS):
    rng = np.random.default_rng(seed)
    states = jnp.asarray(rng.normal(size=(users, ENC_LEN, D_MODEL)), jnp.float32)
    mask = jnp.asarray(rng.random((users, ENC_LEN)) < 0.8).at[:, 0].set(True)
    return states, mask


def exhaustive_scores(logits_fn, enc_states, enc_mask, condition, layout, prefix_len, params=None):
    """All K**L prefixes [K**L, L] and their total restricted log-probabilities [B, K**L], level by level."""
    K = layout.codebook_size
    prefixes = np.array(list(itertools.product(range(K), repeat=prefix_len)), dtype=np.int64).reshape(-1, prefix_len)
    users = enc_states.shape[0]
    total = np.zeros((users, len(prefixes)), np.float64)
    states = jnp.repeat(enc_states, len(prefixes), axis=0)
    mask = jnp.repeat(enc_mask, len(prefixes), axis=0)
    for level in range(prefix_len):
        tokens = layout.sid_tokens(prefixes, prefix_len)[:, :level] if level else np.zeros((len(prefixes), 0))
        inputs = np.concatenate([np.full((len(prefixes), 1), condition), tokens], axis=1).astype(np.int32)
        inputs = jnp.asarray(np.tile(inputs, (users, 1)))
        logits = logits_fn(params, states, mask, inputs) if params is not None else logits_fn(states, mask, inputs)
        start = layout.sid_start + level * K
        log_probs = np.asarray(jax.nn.log_softmax(logits[:, -1, start:start + K], axis=-1))
        chosen = log_probs[np.arange(len(inputs)), np.tile(prefixes[:, level], users)]
        total += chosen.reshape(users, len(prefixes))
    return prefixes, total


def exhaustive_top_n(prefixes, scores, top_n, catalogue=None):
    """Reference top-N per user: codes [B, top_n, L] (-1 padded), scores [B, top_n] (-inf padded)."""
    if catalogue is not None:
        known = {tuple(row) for row in catalogue.tolist()}
        keep = np.array([tuple(row) in known for row in prefixes.tolist()])
        scores = np.where(keep[None, :], scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_n]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_codes = np.where(np.isneginf(top_scores)[..., None], SENTINEL_CODE, prefixes[order])
    if top_n > prefixes.shape[0]:  # fewer prefixes in total than slots
        pad = top_n - prefixes.shape[0]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_codes = np.pad(top_codes, ((0, 0), (0, pad), (0, 0)), constant_values=SENTINEL_CODE)
    return top_codes, top_scores


def assert_same_top_n(codes, scores, reference_codes, reference_scores):
    codes, scores = np.asarray(codes), np.asarray(scores)
    assert codes.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(codes, reference_codes)
    np.testing.assert_array_equal(np.isneginf(scores), np.isneginf(reference_scores))
    finite = np.isfinite(reference_scores)
    np.testing.assert_allclose(scores[finite], reference_scores[finite], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# A tiny random Flax encoder-decoder.
# ---------------------------------------------------------------------------------------------------------------
class TinyEncoderDecoder(nn.Module):
    vocab_size: int
    width: int = D_MODEL
    heads: int = 2

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.width)
        self.positions = nn.Embed(16, self.width)
        self.encoder_attention = nn.SelfAttention(num_heads=self.heads)
        self.encoder_mlp = nn.Dense(self.width)
        self.decoder_attention = nn.SelfAttention(num_heads=self.heads)
        self.cross_attention = nn.MultiHeadDotProductAttention(num_heads=self.heads)
        self.output = nn.Dense(self.vocab_size)

    def encode(self, tokens):
        mask = tokens != PAD_ID
        x = self.embed(tokens) + self.positions(jnp.arange(tokens.shape[1]))[None]
        x = x + self.encoder_attention(x, mask=nn.make_attention_mask(mask, mask))
        return x + jnp.tanh(self.encoder_mlp(x)), mask

    def decode(self, enc_states, enc_mask, decoder_inputs):
        y = self.embed(decoder_inputs) + self.positions(jnp.arange(decoder_inputs.shape[1]))[None]
        y = y + self.decoder_attention(y, mask=nn.make_causal_mask(decoder_inputs))
        query_mask = jnp.ones(decoder_inputs.shape, bool)
        y = y + self.cross_attention(y, enc_states, mask=nn.make_attention_mask(query_mask, enc_mask))
        return self.output(y) * 4.0

    def __call__(self, tokens, decoder_inputs):
        return self.decode(*self.encode(tokens), decoder_inputs)


FLAX_LAYOUT = make_layout(codebook_size=4)
FLAX_MODEL = TinyEncoderDecoder(vocab_size=FLAX_LAYOUT.vocab_size)


def flax_encode(params, tokens):
    return FLAX_MODEL.apply(params, tokens, method=TinyEncoderDecoder.encode)


def flax_logits(params, enc_states, enc_mask, decoder_inputs):
    return FLAX_MODEL.apply(params, enc_states, enc_mask, decoder_inputs, method=TinyEncoderDecoder.decode)


@pytest.fixture(scope="module")
def flax_setup():
    rng = np.random.default_rng(5)
    tokens = rng.integers(16, FLAX_LAYOUT.vocab_size, size=(USERS, ENC_LEN)).astype(np.int32)
    tokens[0, 4:] = PAD_ID  # padded history
    tokens = jnp.asarray(tokens)
    params = FLAX_MODEL.init(jax.random.PRNGKey(0), tokens, jnp.full((USERS, 2), LFV_ID, jnp.int32))
    return params, tokens


# ---------------------------------------------------------------------------------------------------------------
# Beam search against exhaustive search.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codebook_size, prefix_len, beam_size, top_n", [
    (4, 2, 4, 4),      # beam = K**(L-1): exact
    (4, 3, 16, 16),    # beam = K**(L-1): exact
    (4, 3, 20, 7),     # beam > K**(L-1), top_n < beam
    (3, 3, 9, 9),
])
def test_beam_search_is_exact_with_a_wide_beam(codebook_size, prefix_len, beam_size, top_n):
    layout = make_layout(codebook_size)
    logits_fn = make_logits_fn(layout.vocab_size, seed=codebook_size * 10 + prefix_len)
    enc_states, enc_mask = encoder_states(seed=1)
    for condition in (LFV_ID, SFV_ID):
        codes, scores = beam_search(logits_fn, enc_states, enc_mask, condition, layout, prefix_len,
                                    beam_size=beam_size, top_n=top_n)
        assert codes.shape == (USERS, top_n, prefix_len) and scores.shape == (USERS, top_n)
        prefixes, all_scores = exhaustive_scores(logits_fn, enc_states, enc_mask, condition, layout, prefix_len)
        assert_same_top_n(codes, scores, *exhaustive_top_n(prefixes, all_scores, top_n))


def test_flax_decoder_beam_search_is_exact(flax_setup):
    params, tokens = flax_setup
    enc_states, enc_mask = flax_encode(params, tokens)
    codes, scores = beam_search(flax_logits, enc_states, enc_mask, SFV_ID, FLAX_LAYOUT, 3, beam_size=16, top_n=16,
                                params=params)
    prefixes, all_scores = exhaustive_scores(jax.jit(flax_logits), enc_states, enc_mask, SFV_ID, FLAX_LAYOUT, 3,
                                             params=params)
    assert_same_top_n(codes, scores, *exhaustive_top_n(prefixes, all_scores, 16))


def test_narrow_beam_is_best_first_and_scores_its_own_codes():
    """Beam 3 over 4**3 prefixes is approximate, but every result is a real prefix scored correctly, best first,
    distinct, and no better than the exhaustive optimum."""
    layout = make_layout(4)
    logits_fn = make_logits_fn(layout.vocab_size, seed=7)
    enc_states, enc_mask = encoder_states(seed=2)
    codes, scores = beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3, beam_size=3, top_n=3)
    codes, scores = np.asarray(codes), np.asarray(scores)
    prefixes, all_scores = exhaustive_scores(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3)
    index = {tuple(p): i for i, p in enumerate(prefixes.tolist())}
    assert np.all(np.diff(scores, axis=1) <= 0)
    for user in range(USERS):
        rows = [index[tuple(c)] for c in codes[user].tolist()]
        assert len(set(rows)) == 3
        np.testing.assert_allclose(scores[user], all_scores[user, rows], rtol=1e-5, atol=1e-5)
        assert scores[user, 0] <= all_scores[user].max() + 1e-5


def test_fewer_prefixes_than_slots_gives_inf_tails():
    layout = make_layout(2, sid_levels=2)
    logits_fn = make_logits_fn(layout.vocab_size, seed=3)
    enc_states, enc_mask = encoder_states(seed=3)
    codes, scores = beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 2, beam_size=6, top_n=6)
    prefixes, all_scores = exhaustive_scores(logits_fn, enc_states, enc_mask, LFV_ID, layout, 2)
    reference_codes, reference_scores = exhaustive_top_n(prefixes, all_scores, 6)
    assert_same_top_n(codes, scores, reference_codes, reference_scores)
    assert np.isfinite(np.asarray(scores)[:, :4]).all() and np.isneginf(np.asarray(scores)[:, 4:]).all()
    assert (np.asarray(codes)[:, 4:] == SENTINEL_CODE).all()


# ---------------------------------------------------------------------------------------------------------------
# Constrained decoding.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("representation", ["dense", "sparse"])
@pytest.mark.parametrize("codebook_size, catalogue_size, seed", [(4, 9, 0), (16, 40, 1), (16, 500, 2)])
def test_constrained_equals_exhaustive_search_over_the_catalogue(representation, codebook_size, catalogue_size,
                                                                 seed):
    rng = np.random.default_rng(seed)
    layout = make_layout(codebook_size, sid_levels=4)
    # A full 4-level catalogue; the constraint is on its 3-level prefixes (duplicates included on purpose).
    catalogue = rng.integers(0, codebook_size, size=(catalogue_size, 4))
    constraint = PrefixConstraint.from_codes(catalogue, 3, codebook_size, representation=representation)
    assert constraint.representation == representation
    logits_fn = make_logits_fn(layout.vocab_size, seed=seed + 100)
    enc_states, enc_mask = encoder_states(seed=seed)
    beam = constraint.num_prefixes_at(1)  # >= distinct length-2 prefixes: exact
    top_n = min(beam, 12)
    codes, scores = beam_search(logits_fn, enc_states, enc_mask, SFV_ID, layout, 3, beam_size=beam, top_n=top_n,
                                constraint=constraint)
    codes_np = np.asarray(codes)
    emitted = codes_np[np.isfinite(np.asarray(scores))]
    assert constraint.contains(emitted).all()
    assert {tuple(c) for c in emitted.tolist()} <= {tuple(c) for c in catalogue[:, :3].tolist()}
    prefixes, all_scores = exhaustive_scores(logits_fn, enc_states, enc_mask, SFV_ID, layout, 3)
    assert_same_top_n(codes, scores, *exhaustive_top_n(prefixes, all_scores, top_n, catalogue=catalogue[:, :3]))


@pytest.mark.parametrize("representation", ["dense", "sparse"])
def test_constrained_narrow_beam_never_emits_an_unknown_prefix(representation):
    rng = np.random.default_rng(11)
    layout = make_layout(16)
    catalogue = rng.integers(0, 16, size=(300, 3))
    constraint = PrefixConstraint.from_codes(catalogue, 3, 16, representation=representation)
    logits_fn = make_logits_fn(layout.vocab_size, seed=12)
    enc_states, enc_mask = encoder_states(seed=12, users=8)
    codes, scores = beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3, beam_size=5, top_n=5,
                                constraint=constraint)
    assert np.isfinite(np.asarray(scores)).all()  # 300 catalogue prefixes: every slot is filled
    assert constraint.contains(np.asarray(codes)).all()
    # Shorter decodes use the first levels of the same constraint.
    codes2, _ = beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 2, beam_size=5, top_n=5,
                            constraint=constraint)
    assert constraint.contains(np.asarray(codes2)).all()


@pytest.mark.parametrize("representation", ["dense", "sparse"])
def test_small_catalogue_fills_the_tail_with_sentinels(representation):
    layout = make_layout(4)
    catalogue = np.array([[0, 1, 2], [0, 1, 2], [3, 3, 0], [0, 2, 1]])  # 3 distinct prefixes
    constraint = PrefixConstraint.from_codes(catalogue, 3, 4, representation=representation)
    logits_fn = make_logits_fn(layout.vocab_size, seed=4)
    enc_states, enc_mask = encoder_states(seed=4)
    codes, scores = beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3, beam_size=8, top_n=8,
                                constraint=constraint)
    codes, scores = np.asarray(codes), np.asarray(scores)
    assert np.isfinite(scores[:, :3]).all() and np.isneginf(scores[:, 3:]).all()
    assert (codes[:, 3:] == SENTINEL_CODE).all()
    for user in range(USERS):
        assert {tuple(c) for c in codes[user, :3].tolist()} == {(0, 1, 2), (3, 3, 0), (0, 2, 1)}
    prefixes, all_scores = exhaustive_scores(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3)
    assert_same_top_n(codes, scores, *exhaustive_top_n(prefixes, all_scores, 8, catalogue=catalogue))


def test_empty_catalogue_gives_only_sentinels():
    layout = make_layout(4)
    constraint = PrefixConstraint.from_codes(np.zeros((0, 3), np.int64), 3, 4, representation="sparse")
    enc_states, enc_mask = encoder_states(seed=0)
    codes, scores = beam_search(make_logits_fn(layout.vocab_size, 0), enc_states, enc_mask, LFV_ID, layout, 3,
                                beam_size=4, top_n=4, constraint=constraint)
    assert np.isneginf(np.asarray(scores)).all() and (np.asarray(codes) == SENTINEL_CODE).all()


def test_dense_and_sparse_tables_describe_the_same_prefixes():
    rng = np.random.default_rng(21)
    catalogue = rng.integers(0, 8, size=(60, 3))
    dense = PrefixConstraint.from_codes(catalogue, 3, 8, representation="dense").host_tables()
    sparse_constraint = PrefixConstraint.from_codes(catalogue, 3, 8, representation="sparse")
    sparse = sparse_constraint.host_tables()
    np.testing.assert_array_equal(dense["first"] >= 0, sparse["first"] >= 0)
    prefixes = {tuple(p) for p in catalogue.tolist()}
    level1 = sorted({p[:2] for p in prefixes})
    for (a, b, c) in itertools.product(range(8), repeat=3):
        assert dense["allowed"][1][a * 8 + b, c] == ((a, b, c) in prefixes)
    for (a, b) in itertools.product(range(8), repeat=2):
        assert dense["allowed"][0][a, b] == ((a, b) in set(level1))
    # CSR: the children of level-0 node `rank` are child_codes[offsets[rank]:offsets[rank + 1]].
    firsts = sorted({p[0] for p in prefixes})
    for rank, a in enumerate(firsts):
        assert sparse["first"][a] == rank
        run = sparse["child_codes"][0][sparse["offsets"][0][rank]:sparse["offsets"][0][rank + 1]]
        assert run.tolist() == sorted({p[1] for p in level1 if p[0] == a})
    assert sparse_constraint.contains(catalogue).all()


def test_auto_representation_and_validation():
    assert PrefixConstraint.from_codes([[1, 2, 3]], 3, 256).representation == "dense"   # 16.8 MB of tables
    assert PrefixConstraint.from_codes([[1, 2, 3, 4]], 4, 256).representation == "sparse"
    assert PrefixConstraint.from_codes([[1, 2, 3]], 3, 256, max_dense_bytes=1000).representation == "sparse"
    with pytest.raises(ValueError):
        PrefixConstraint.from_codes([[1, 2, 3, 4]], 4, 256, representation="dense")  # prefix ids overflow int32
    with pytest.raises(ValueError):
        PrefixConstraint.from_codes([[1, 9]], 2, 8)  # code out of range
    with pytest.raises(ValueError):
        PrefixConstraint.from_codes([[1, 2]], 3, 8)  # prefix_len > levels
    layout = make_layout(4)
    enc_states, enc_mask = encoder_states(seed=0)
    logits_fn = make_logits_fn(layout.vocab_size, 0)
    with pytest.raises(ValueError):
        beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3, beam_size=4, top_n=5)
    with pytest.raises(ValueError):
        beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3, beam_size=4, top_n=4,
                    constraint=PrefixConstraint.from_codes([[1, 2]], 2, 4))


# ---------------------------------------------------------------------------------------------------------------
# Multi-context decoding.
# ---------------------------------------------------------------------------------------------------------------
def test_multi_context_equals_separate_decoding_flax(flax_setup):
    params, tokens = flax_setup
    rng = np.random.default_rng(8)
    constraints = {SFV_ID: PrefixConstraint.from_codes(rng.integers(0, 4, size=(10, 3)), 3, 4)}
    # SFV constrained to a small catalogue, LFV unconstrained: one batched run mixes both.
    enc_states, enc_mask = jax.jit(flax_encode)(params, tokens)  # ONE encoder pass for both contexts
    multi = multi_context_decode(flax_logits, enc_states, enc_mask, layout=FLAX_LAYOUT, prefix_len=3, beam_size=5,
                                 top_n=4, params=params, constraints=constraints)
    separate = separate_decode(flax_encode, flax_logits, tokens, layout=FLAX_LAYOUT, prefix_len=3, beam_size=5,
                               top_n=4, params=params, constraints=constraints)
    assert set(multi) == set(separate) == {LFV_ID, SFV_ID}
    for condition in (LFV_ID, SFV_ID):
        np.testing.assert_array_equal(multi[condition][0], separate[condition][0])
        # XLA's CPU matmul is not bitwise invariant to the number of rows (measured: ~1e-6 on these logits), and
        # the batched run has C times more rows; bit-exact equality is checked with the batch-invariant decoder
        # in test_multi_context_is_one_batched_decoder_call_per_level.
        np.testing.assert_allclose(multi[condition][1], separate[condition][1], rtol=2e-6, atol=1e-6)
    # The two contexts really are decoded under different conditions.
    assert not np.array_equal(multi[LFV_ID][1], multi[SFV_ID][1])
    sfv_codes = np.asarray(multi[SFV_ID][0])
    assert constraints[SFV_ID].contains(sfv_codes[np.asarray(np.isfinite(multi[SFV_ID][1]))]).all()


def test_multi_context_is_one_batched_decoder_call_per_level():
    layout = make_layout(4)
    base = make_logits_fn(layout.vocab_size, seed=9)
    batch_sizes = []

    def logits_fn(enc_states, enc_mask, decoder_inputs):
        batch_sizes.append((enc_states.shape[0], decoder_inputs.shape))
        return base(enc_states, enc_mask, decoder_inputs)

    enc_states, enc_mask = encoder_states(seed=9)
    rng = np.random.default_rng(9)
    constraint = PrefixConstraint.from_codes(rng.integers(0, 4, size=(12, 3)), 3, 4, representation="sparse")
    conditions = (LFV_ID, SFV_ID)
    multi = multi_context_decode(logits_fn, enc_states, enc_mask, conditions, layout=layout, prefix_len=3,
                                 beam_size=6, top_n=6, constraints={LFV_ID: constraint})
    # One trace: level 0 on [C*B, 1], then [C*B*beam, 2] and [C*B*beam, 3].
    assert batch_sizes == [(2 * USERS, (2 * USERS, 1)), (2 * USERS * 6, (2 * USERS * 6, 2)),
                           (2 * USERS * 6, (2 * USERS * 6, 3))]
    for condition in conditions:
        codes, scores = beam_search(base, enc_states, enc_mask, condition, layout, 3, beam_size=6, top_n=6,
                                    constraint=constraint if condition == LFV_ID else None)
        np.testing.assert_array_equal(multi[condition][0], codes)
        np.testing.assert_array_equal(multi[condition][1], scores)


# ---------------------------------------------------------------------------------------------------------------
# Grouped logits functions (grouped=True).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("representation", [None, "dense", "sparse"])
def test_grouped_multi_context_equals_batch_aligned_and_separate(representation):
    layout = make_layout(4)
    base = make_logits_fn(layout.vocab_size, seed=31)
    calls = []

    def grouped_fn(enc_states, enc_mask, decoder_inputs):
        calls.append((enc_states.shape, enc_mask.shape, decoder_inputs.shape))
        return make_grouped(base)(enc_states, enc_mask, decoder_inputs)

    enc_states, enc_mask = encoder_states(seed=31)
    rng = np.random.default_rng(31)
    constraints = None
    if representation is not None:  # LFV constrained, SFV unconstrained: one run mixes both
        constraints = {LFV_ID: PrefixConstraint.from_codes(rng.integers(0, 4, size=(12, 3)), 3, 4,
                                                           representation=representation)}
    conditions = (LFV_ID, SFV_ID)
    options = dict(layout=layout, prefix_len=3, beam_size=6, top_n=5, constraints=constraints)
    grouped = multi_context_decode(grouped_fn, enc_states, enc_mask, conditions, grouped=True, **options)
    aligned = multi_context_decode(base, enc_states, enc_mask, conditions, **options)
    # One trace; per level ONE call on un-tiled states [B, ...] with [B, C * beam, t] rows (level 0: [B, C, 1]).
    assert calls == [((USERS, ENC_LEN, D_MODEL), (USERS, ENC_LEN), (USERS, 2, 1)),
                     ((USERS, ENC_LEN, D_MODEL), (USERS, ENC_LEN), (USERS, 2 * 6, 2)),
                     ((USERS, ENC_LEN, D_MODEL), (USERS, ENC_LEN), (USERS, 2 * 6, 3))]
    for condition in conditions:
        constraint = (constraints or {}).get(condition)
        separate = beam_search(make_grouped(base), enc_states, enc_mask, condition, layout, 3, beam_size=6, top_n=5,
                               constraint=constraint, grouped=True)
        reference = beam_search(base, enc_states, enc_mask, condition, layout, 3, beam_size=6, top_n=5,
                                constraint=constraint)
        for result in (grouped[condition], aligned[condition], separate):
            np.testing.assert_array_equal(result[0], reference[0])
            np.testing.assert_array_equal(result[1], reference[1])
        if constraint is not None:
            assert constraint.contains(np.asarray(grouped[condition][0])).all()
    assert not np.array_equal(grouped[LFV_ID][1], grouped[SFV_ID][1])


@pytest.mark.parametrize("constrained", [False, True])
def test_grouped_beam_search_is_exact_with_a_wide_beam(constrained):
    layout = make_layout(4)
    base = make_logits_fn(layout.vocab_size, seed=32)
    enc_states, enc_mask = encoder_states(seed=32)
    catalogue = np.random.default_rng(32).integers(0, 4, size=(20, 3)) if constrained else None
    constraint = PrefixConstraint.from_codes(catalogue, 3, 4) if constrained else None
    multi = multi_context_decode(make_grouped(base), enc_states, enc_mask, layout=layout, prefix_len=3,
                                 beam_size=16, top_n=10, grouped=True,
                                 constraints={SFV_ID: constraint} if constrained else None)
    for condition in (LFV_ID, SFV_ID):
        prefixes, all_scores = exhaustive_scores(base, enc_states, enc_mask, condition, layout, 3)
        reference = exhaustive_top_n(prefixes, all_scores, 10, catalogue=catalogue if condition == SFV_ID else None)
        assert_same_top_n(*multi[condition], *reference)


GROUPED_MODEL_CONFIG = ModelConfig(vocab_size=FLAX_LAYOUT.vocab_size, max_tokens=ENC_LEN, num_targets=2, target_len=4,
                                   d_model=16, num_heads=2, encoder_layers=1, decoder_layers=2, mlp_dim=32,
                                   embedding_dim=8)


@pytest.mark.parametrize("constrained", [False, True])
def test_token_minds_decode_grouped_equals_batch_aligned_decode(flax_setup, constrained):
    """The real model: ``decode_grouped`` (memory once per user) with ``grouped=True`` gives the codes of
    ``decode`` on tiled states, and of separate per-context decoding, scores to float tolerance; with a wide beam
    both equal exhaustive search."""
    _, tokens = flax_setup
    fns = model_functions(GROUPED_MODEL_CONFIG)
    params = fns.init(jax.random.key(3))
    enc_states, enc_mask = jax.jit(fns.encode)(params, tokens)
    rng = np.random.default_rng(33)
    catalogue = rng.integers(0, 4, size=(12, 3)) if constrained else None
    constraints = {SFV_ID: PrefixConstraint.from_codes(catalogue, 3, 4)} if constrained else None
    for beam_size, top_n in ((5, 4),):  # a narrow beam: pruning and cache reordering at every level
        options = dict(layout=FLAX_LAYOUT, prefix_len=3, beam_size=beam_size, top_n=top_n, params=params,
                       constraints=constraints)
        grouped = multi_context_decode(fns.decode_grouped, enc_states, enc_mask, grouped=True, **options)
        aligned = multi_context_decode(fns.decode, enc_states, enc_mask, **options)
        separate = separate_decode(fns.encode, fns.decode_grouped, tokens, grouped=True, **options)
        for condition in (LFV_ID, SFV_ID):
            for other in (aligned, separate):
                np.testing.assert_array_equal(grouped[condition][0], other[condition][0])
                np.testing.assert_array_equal(np.isneginf(grouped[condition][1]), np.isneginf(other[condition][1]))
                np.testing.assert_allclose(grouped[condition][1], other[condition][1], rtol=1e-5, atol=1e-5)
            if beam_size == 16:  # >= K**(L-1): exact
                prefixes, all_scores = exhaustive_scores(jax.jit(fns.decode), enc_states, enc_mask, condition,
                                                         FLAX_LAYOUT, 3, params=params)
                reference = exhaustive_top_n(prefixes, all_scores, top_n,
                                             catalogue=catalogue if condition == SFV_ID else None)
                assert_same_top_n(*grouped[condition], *reference)


@pytest.mark.parametrize("constrained", [False, True])
def test_incremental_kv_cache_decoding_equals_grouped_decoding(flax_setup, constrained):
    """The model's incremental decoder (memory and cross-attention keys/values once per user, self-attention
    keys/values cached across levels and reordered with the beams, logits for each row's newest position only)
    decodes the codes of ``decode_grouped`` (the full recompute, itself checked against exhaustive search above),
    scores to float rounding."""
    from tokenminds_model import model as model_lib

    _, tokens = flax_setup
    fns = model_functions(GROUPED_MODEL_CONFIG)
    params = fns.init(jax.random.key(5))
    enc_states, enc_mask = jax.jit(fns.encode)(params, tokens)
    catalogue = np.random.default_rng(34).integers(0, 4, size=(12, 3)) if constrained else None
    constraints = {SFV_ID: PrefixConstraint.from_codes(catalogue, 3, 4)} if constrained else None
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, model_lib.Decoder) and context.method_name in ("start", "step"):
            calls.append((context.method_name, tuple(np.shape(args[0]))))
        if isinstance(context.module, nn.Dense) and context.module.name == "logits":
            calls.append(("logits", tuple(np.shape(args[0]))))
        return next_fun(*args, **kwargs)

    for beam_size, top_n in ((5, 4),):  # a narrow beam: pruning and cache reordering at every level
        options = dict(layout=FLAX_LAYOUT, prefix_len=3, beam_size=beam_size, top_n=top_n, params=params,
                       constraints=constraints)
        calls.clear()
        with nn.intercept_methods(record):
            cached = multi_context_decode(fns.incremental_decoder, enc_states, enc_mask, **options)
        # One start (memory K/V once per user), one step per level, each on one token per row: [B, C * beam].
        rows = [(USERS, 2), (USERS, 2 * beam_size), (USERS, 2 * beam_size)]
        assert [c for c in calls if c[0] != "logits"] == [("start", (USERS, ENC_LEN + 1, D_MODEL))] + [
            ("step", r) for r in rows]
        assert [c[1] for c in calls if c[0] == "logits"] == [r + (D_MODEL,) for r in rows]  # newest position only
        full = multi_context_decode(fns.decode_grouped, enc_states, enc_mask, grouped=True, **options)
        for condition in (LFV_ID, SFV_ID):
            np.testing.assert_array_equal(cached[condition][0], full[condition][0])
            np.testing.assert_array_equal(np.isneginf(cached[condition][1]), np.isneginf(full[condition][1]))
            np.testing.assert_allclose(cached[condition][1], full[condition][1], rtol=1e-5, atol=1e-5)
    if not constrained:  # single-context beam search takes the incremental decoder too
        single = beam_search(fns.incremental_decoder, enc_states, enc_mask, LFV_ID, FLAX_LAYOUT, 2, beam_size=4,
                             top_n=3, params=params)
        np.testing.assert_array_equal(single[0], beam_search(fns.decode_grouped, enc_states, enc_mask, LFV_ID,
                                                             FLAX_LAYOUT, 2, beam_size=4, top_n=3, params=params,
                                                             grouped=True)[0])


# ---------------------------------------------------------------------------------------------------------------
# Compilation.
# ---------------------------------------------------------------------------------------------------------------
def test_jit_compiles_once_for_repeated_calls_of_the_same_shape():
    layout = make_layout(4)
    base = make_logits_fn(layout.vocab_size, seed=13)
    python_calls = []

    def logits_fn(enc_states, enc_mask, decoder_inputs):  # a fresh static argument: its own cache entries
        python_calls.append(decoder_inputs.shape)
        return base(enc_states, enc_mask, decoder_inputs)

    rng = np.random.default_rng(13)
    before = decoding.TRACE_COUNTS["decode"]
    for seed, condition in [(0, LFV_ID), (1, SFV_ID), (2, LFV_ID), (3, SFV_ID)]:
        enc_states, enc_mask = encoder_states(seed=seed)
        beam_search(logits_fn, enc_states, enc_mask, condition, layout, 3, beam_size=4, top_n=4)
    assert decoding.TRACE_COUNTS["decode"] - before == 1
    assert len(python_calls) == 3  # one trace, one decoder call per level

    # Sparse catalogues of different sizes within one power-of-two bucket share a compilation.
    every_prefix = np.array(list(itertools.product(range(4), repeat=3)))[rng.permutation(64)]
    constraints = [PrefixConstraint.from_codes(every_prefix[:m], 3, 4, representation="sparse") for m in (40, 50)]
    assert [c.num_prefixes for c in constraints] == [40, 50]
    shapes = [jax.tree_util.tree_map(jnp.shape, decoding._stack_constraints((c,), 3)) for c in constraints]
    assert shapes[0] == shapes[1]
    before = decoding.TRACE_COUNTS["decode"]
    for constraint in constraints:
        enc_states, enc_mask = encoder_states(seed=5)
        beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3, beam_size=4, top_n=4, constraint=constraint)
    assert decoding.TRACE_COUNTS["decode"] - before == 1

    # A new shape (more users) traces again.
    before = decoding.TRACE_COUNTS["decode"]
    enc_states, enc_mask = encoder_states(seed=6, users=USERS + 1)
    beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, 3, beam_size=4, top_n=4)
    assert decoding.TRACE_COUNTS["decode"] - before == 1


def test_encoder_states_may_be_a_pytree():
    layout = make_layout(4)
    base = make_logits_fn(layout.vocab_size, seed=14)

    def logits_fn(enc_states, enc_mask, decoder_inputs):
        return base(enc_states["a"] + enc_states["b"], enc_mask, decoder_inputs)

    enc_states, enc_mask = encoder_states(seed=14)
    codes, scores = beam_search(logits_fn, {"a": enc_states, "b": enc_states * 0.5}, enc_mask, LFV_ID, layout, 3,
                                beam_size=4, top_n=4)
    expected = beam_search(base, enc_states * 1.5, enc_mask, LFV_ID, layout, 3, beam_size=4, top_n=4)
    np.testing.assert_array_equal(codes, expected[0])
    np.testing.assert_allclose(scores, expected[1], rtol=1e-6)
