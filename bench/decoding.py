"""SID-prefix decoding throughput, and what multi-context decoding saves over separate per-context passes.

A small random Flax encoder-decoder (pre-LN Transformer; width, heads and layers configurable) stands in for the
TokenMinds model: the encoder reads a user history of ``--history-len`` tokens, the decoder runs
``tokenminds_model.decoding`` beam search over ``--prefix-len`` SID levels (codebook ``--codebook-size``, beam
``--beam-size``, top ``--top-n``). Measured side by side in one run (round-robin, best of ``--repeats`` after
compilation):

- encode: one jitted encoder pass over the batch of users;
- decode, 1 context: ``beam_search`` for <LFV> on given encoder states;
- decode, 2 contexts: ``multi_context_decode`` for <LFV> and <SFV> (one batched decoder run);
- multi total: one encoder pass + ``multi_context_decode`` (what serving both scenarios costs);
- separate total: ``separate_decode``: per context, a full encoder pass + ``beam_search`` (the baseline);
- constrained decoding (1 context) against a random catalogue, dense and sparse tables.

Three ways to feed the decoder are measured side by side (``--cross-kv``): ``in-decoder`` (the decoder projects
encoder states to cross-attention keys/values itself, so every beam row re-projects its user's T states at every
level), ``precomputed`` (the encoder side projects them once per user and passes the per-layer keys/values as the
``enc_states`` pytree; the batch-aligned contract still tiles them to one row per beam) and ``grouped`` (the
decoding module's ``grouped=True`` contract: the decoder gets the un-tiled encoder states and ``[B, C * beam, t]``
rows, folds each user's rows into its sequence axis with a block-diagonal causal mask, as training folds the K
targets, and projects the keys/values once per user and level, as ``TokenMindsModel.decode_grouped`` does). The encoder share is encode / (encode + 1-context decode). The paper's serving saving was
481 vs 698 chips (ratio 0.69); with two contexts the ratio tends to 0.5 as the encoder share tends to 1.

    .venv/bin/python bench/decoding.py [--users 16] [--history-len 256] [--width 128] [--enc-layers 4]
        [--dec-layers 2] [--beam-size 20] [--catalogue 100000] [--cross-kv all]

Ends with one ``RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Dict

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from tokenminds_model.decoding import (PrefixConstraint, beam_search, multi_context_decode,  # noqa: E402
                                       separate_decode)
from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SFV_ID, VocabularyLayout  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# A tiny random encoder-decoder.
# ---------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    width: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width)(nn.gelu(nn.Dense(self.hidden)(x)))


class EncoderBlock(nn.Module):
    width: int
    heads: int
    hidden: int

    @nn.compact
    def __call__(self, x, mask):
        x = x + nn.SelfAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=nn.make_attention_mask(mask, mask))
        return x + MLP(self.width, self.hidden)(nn.LayerNorm()(x))


class CrossKeysValues(nn.Module):
    """One decoder layer's cross-attention keys and values of the encoder states: 2 x [B, T, heads, head_dim]."""
    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, enc_states):
        return (nn.DenseGeneral((self.heads, self.head_dim), name="key")(enc_states),
                nn.DenseGeneral((self.heads, self.head_dim), name="value")(enc_states))


class DecoderBlock(nn.Module):
    width: int
    heads: int
    hidden: int

    @nn.compact
    def __call__(self, y, keys, values, enc_mask, self_mask=None):
        if self_mask is None:
            self_mask = nn.make_causal_mask(y[..., 0])
        y = y + nn.SelfAttention(num_heads=self.heads)(nn.LayerNorm()(y), mask=self_mask)
        head_dim = self.width // self.heads
        query = nn.DenseGeneral((self.heads, head_dim), name="query")(nn.LayerNorm()(y))
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, keys) / math.sqrt(head_dim)
        logits = jnp.where(enc_mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), values)
        y = y + nn.DenseGeneral(self.width, axis=(-2, -1), name="out")(attended)
        return y + MLP(self.width, self.hidden)(nn.LayerNorm()(y))


class EncoderDecoder(nn.Module):
    vocab_size: int
    history_len: int
    width: int = 128
    heads: int = 4
    enc_layers: int = 4
    dec_layers: int = 2
    mlp_ratio: int = 4

    def setup(self):
        hidden = self.width * self.mlp_ratio
        self.embed = nn.Embed(self.vocab_size, self.width)
        self.enc_positions = nn.Embed(self.history_len, self.width)
        self.dec_positions = nn.Embed(16, self.width)
        self.encoder = [EncoderBlock(self.width, self.heads, hidden) for _ in range(self.enc_layers)]
        self.enc_norm = nn.LayerNorm()
        self.cross = [CrossKeysValues(self.heads, self.width // self.heads) for _ in range(self.dec_layers)]
        self.decoder = [DecoderBlock(self.width, self.heads, hidden) for _ in range(self.dec_layers)]
        self.dec_norm = nn.LayerNorm()
        self.output = nn.Dense(self.vocab_size)

    def encode(self, tokens):
        mask = tokens != PAD_ID
        x = self.embed(tokens) + self.enc_positions(jnp.arange(tokens.shape[1]))[None]
        for block in self.encoder:
            x = block(x, mask)
        return self.enc_norm(x), mask

    def cross_keys_values(self, enc_states):
        return tuple(layer(enc_states) for layer in self.cross)

    def decode_from_keys_values(self, keys_values, enc_mask, decoder_inputs, positions=None, self_mask=None):
        if positions is None:
            positions = jnp.arange(decoder_inputs.shape[1])
        y = self.embed(decoder_inputs) + self.dec_positions(positions)[None]
        for block, (keys, values) in zip(self.decoder, keys_values):
            y = block(y, keys, values, enc_mask, self_mask)
        return self.output(self.dec_norm(y))

    def decode(self, enc_states, enc_mask, decoder_inputs):
        return self.decode_from_keys_values(self.cross_keys_values(enc_states), enc_mask, decoder_inputs)

    def decode_grouped(self, enc_states, enc_mask, decoder_inputs):
        """Grouped contract: ``decoder_inputs [B, R, t]`` -> logits ``[B, R, t, V]``; the R rows of a user share one
        projection of its keys/values (block-diagonal causal mask, positions 0..t-1 repeated per row)."""
        users, rows, length = decoder_inputs.shape
        block = jnp.arange(rows * length) // length
        positions = jnp.arange(rows * length) % length
        self_mask = ((block[:, None] == block[None, :]) & (positions[:, None] >= positions[None, :]))[None, None]
        logits = self.decode_from_keys_values(self.cross_keys_values(enc_states), enc_mask,
                                              decoder_inputs.reshape(users, rows * length), positions, self_mask)
        return logits.reshape(users, rows, length, -1)

    def __call__(self, tokens, decoder_inputs):
        return self.decode(*self.encode(tokens), decoder_inputs)


MODEL: EncoderDecoder = None  # set in main(); the functions below are stable objects (jit static arguments)


def encode(params, tokens):
    """Encoder states as the model's decode() reads them: the decoder projects cross-attention K/V itself."""
    return MODEL.apply(params, tokens, method=EncoderDecoder.encode)


def decode(params, enc_states, enc_mask, decoder_inputs):
    return MODEL.apply(params, enc_states, enc_mask, decoder_inputs, method=EncoderDecoder.decode)


def encode_to_keys_values(params, tokens):
    """Encoder pass plus each decoder layer's cross-attention keys/values, once per user (a pytree of states)."""
    enc_states, enc_mask = MODEL.apply(params, tokens, method=EncoderDecoder.encode)
    return MODEL.apply(params, enc_states, method=EncoderDecoder.cross_keys_values), enc_mask


def decode_from_keys_values(params, keys_values, enc_mask, decoder_inputs):
    return MODEL.apply(params, keys_values, enc_mask, decoder_inputs, method=EncoderDecoder.decode_from_keys_values)


def decode_grouped(params, enc_states, enc_mask, decoder_inputs):
    return MODEL.apply(params, enc_states, enc_mask, decoder_inputs, method=EncoderDecoder.decode_grouped)


# feed -> (encode_fn, logits_fn, grouped)
FEEDS: Dict[str, tuple] = {
    "in-decoder": (encode, decode, False),
    "precomputed": (encode_to_keys_values, decode_from_keys_values, False),
    "grouped": (encode, decode_grouped, True),
}


# ---------------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------------
def interleaved_best_of(functions: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Best-of-``repeats`` seconds per function, after one warm-up (compilation) call each. The functions are timed
    round-robin, so that load from other processes on a shared machine hits all of them alike."""
    for function in functions.values():
        jax.block_until_ready(function())
    timings: Dict[str, list] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            jax.block_until_ready(function())
            timings[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in timings.items()}


def synthetic_catalogue(items: int, levels: int, codebook_size: int, seed: int) -> np.ndarray:
    """Skewed codes (a Zipf-like level-0 distribution), like a trained RQ codebook's uneven usage."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, codebook_size + 1) ** 0.8
    first = rng.choice(codebook_size, size=items, p=weights / weights.sum())
    rest = rng.integers(0, codebook_size, size=(items, levels - 1))
    return np.concatenate([first[:, None], rest], axis=1)


def run_feed(name: str, params, tokens, layout, args, constraints) -> Dict[str, Any]:
    encode_fn, logits_fn, grouped = FEEDS[name]
    options = dict(layout=layout, prefix_len=args.prefix_len, beam_size=args.beam_size, top_n=args.top_n,
                   params=params, grouped=grouped)
    jitted_encode = jax.jit(encode_fn)
    enc_states, enc_mask = jitted_encode(params, tokens)
    users = tokens.shape[0]

    def multi_total():
        states, mask = jitted_encode(params, tokens)
        return multi_context_decode(logits_fn, states, mask, (LFV_ID, SFV_ID), **options)

    functions = {
        "encode": lambda: jitted_encode(params, tokens),
        "decode_1ctx": lambda: beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, args.prefix_len,
                                           args.beam_size, args.top_n, params=params, grouped=grouped),
        "decode_2ctx": lambda: multi_context_decode(logits_fn, enc_states, enc_mask, (LFV_ID, SFV_ID), **options),
        "multi_total": multi_total,
        "separate_total": lambda: separate_decode(encode_fn, logits_fn, tokens, (LFV_ID, SFV_ID), **options),
    }
    for representation, constraint in constraints.items():
        functions[f"decode_1ctx_{representation}_constraint"] = functools.partial(
            beam_search, logits_fn, enc_states, enc_mask, SFV_ID, layout, args.prefix_len, args.beam_size,
            args.top_n, constraint, params=params, grouped=grouped)
    seconds = interleaved_best_of(functions, args.repeats)
    encode_s, decode1_s, decode2_s = seconds["encode"], seconds["decode_1ctx"], seconds["decode_2ctx"]
    multi_s, separate_s = seconds["multi_total"], seconds["separate_total"]
    result = {
        "encode_s": encode_s, "decode_1ctx_s": decode1_s, "decode_2ctx_s": decode2_s,
        "multi_total_s": multi_s, "separate_total_s": separate_s,
        "ratio_multi_over_separate": multi_s / separate_s,
        "encoder_share": encode_s / (encode_s + decode1_s),
        "decode_2ctx_over_1ctx": decode2_s / decode1_s,
        "users_per_s_decode_1ctx": users / decode1_s,
        "users_per_s_multi_2ctx": users / multi_s,
        "users_per_s_separate_2ctx": users / separate_s,
    }
    for representation in constraints:
        key = f"decode_1ctx_{representation}_constraint"
        result[f"{key}_s"] = seconds[key]
        result[f"users_per_s_{key}"] = users / seconds[key]
    return result


def main() -> int:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16, help="users per batch (encoder batch B)")
    parser.add_argument("--history-len", type=int, default=256, help="encoder tokens per user (T)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--enc-layers", type=int, default=4)
    parser.add_argument("--dec-layers", type=int, default=2)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--sid-levels", type=int, default=3)
    parser.add_argument("--prefix-len", type=int, default=3)
    parser.add_argument("--beam-size", type=int, default=20)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--query-vocab-size", type=int, default=1000)
    parser.add_argument("--catalogue", type=int, default=100_000,
                        help="items in the random catalogue for constrained decoding (0: skip)")
    parser.add_argument("--cross-kv", choices=("in-decoder", "precomputed", "grouped", "both", "all"), default="all",
                        help="decoder feeds to measure: one, both (in-decoder + precomputed) or all three")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    layout = VocabularyLayout(sid_levels=args.sid_levels, codebook_size=args.codebook_size,
                              query_vocab_size=args.query_vocab_size)
    MODEL = EncoderDecoder(vocab_size=layout.vocab_size, history_len=args.history_len, width=args.width,
                           heads=args.heads, enc_layers=args.enc_layers, dec_layers=args.dec_layers)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(layout.sid_start, layout.vocab_size, size=(args.users, args.history_len))
    lengths = rng.integers(args.history_len // 2, args.history_len + 1, size=args.users)
    tokens[np.arange(args.history_len)[None, :] >= lengths[:, None]] = PAD_ID
    tokens = jnp.asarray(tokens, jnp.int32)
    params = jax.jit(MODEL.init)(jax.random.PRNGKey(args.seed), tokens[:1], jnp.full((1, 2), LFV_ID, jnp.int32))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    constraints: Dict[str, PrefixConstraint] = {}
    if args.catalogue:
        catalogue = synthetic_catalogue(args.catalogue, args.sid_levels, args.codebook_size, args.seed)
        for representation in ("dense", "sparse"):
            try:
                constraint = PrefixConstraint.from_codes(catalogue, args.prefix_len, args.codebook_size,
                                                         representation=representation)
                constraint.host_tables()
                constraints[representation] = constraint
            except ValueError as error:
                print(f"skipping {representation} constraint: {error}")
        some = next(iter(constraints.values()), None)
        if some is not None:
            print(f"catalogue: {args.catalogue} items, {some.num_prefixes} distinct {args.prefix_len}-level "
                  f"prefixes, {[some.num_prefixes_at(l) for l in range(args.prefix_len)]} per level")

    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); model: width "
          f"{args.width}, heads {args.heads}, {args.enc_layers} encoder + {args.dec_layers} decoder layers, vocab "
          f"{layout.vocab_size}, {num_params:,} params; {args.users} users x {args.history_len} history tokens; "
          f"L={args.prefix_len}, K={args.codebook_size}, beam {args.beam_size}, top {args.top_n}")

    feeds = {"both": ["in-decoder", "precomputed"], "all": list(FEEDS)}.get(args.cross_kv, [args.cross_kv])
    results = {}
    for feed in feeds:
        started = time.perf_counter()
        results[feed] = run_feed(feed, params, tokens, layout, args, constraints)
        results[feed]["wall_s_incl_compile"] = time.perf_counter() - started

    if "grouped" in feeds:
        # The grouped path must decode exactly what the batch-aligned in-decoder path decodes.
        enc_states, enc_mask = jax.jit(encode)(params, tokens)
        options = dict(layout=layout, prefix_len=args.prefix_len, beam_size=args.beam_size, top_n=args.top_n,
                       params=params)
        aligned = multi_context_decode(decode, enc_states, enc_mask, (LFV_ID, SFV_ID), **options)
        grouped = multi_context_decode(decode_grouped, enc_states, enc_mask, (LFV_ID, SFV_ID), grouped=True,
                                       **options)
        codes_equal = all(np.array_equal(aligned[c][0], grouped[c][0]) for c in (LFV_ID, SFV_ID))
        score_diff = max(float(np.max(np.abs(np.asarray(aligned[c][1]) - np.asarray(grouped[c][1]))))
                         for c in (LFV_ID, SFV_ID))
        print(f"grouped vs in-decoder (2 contexts): codes equal {codes_equal}, max |score diff| {score_diff:.2e}")
        results["grouped"]["codes_equal_in_decoder"] = float(codes_equal)
        results["grouped"]["max_score_diff_in_decoder"] = score_diff

    header = f"{'measure (seconds per batch of ' + str(args.users) + ' users)':<48}" + "".join(
        f"{feed:>16}" for feed in feeds)
    print("\n" + header + "\n" + "-" * len(header))
    rows = [("encode (1 encoder pass)", "encode_s", "{:.4f}"),
            ("decode, 1 context (beam_search)", "decode_1ctx_s", "{:.4f}"),
            ("decode, 2 contexts (multi_context_decode)", "decode_2ctx_s", "{:.4f}"),
            ("multi: 1 encode + 2-context decode", "multi_total_s", "{:.4f}"),
            ("separate: 2 x (encode + decode)", "separate_total_s", "{:.4f}"),
            ("ratio multi / separate", "ratio_multi_over_separate", "{:.3f}"),
            ("encoder share encode/(encode+decode 1ctx)", "encoder_share", "{:.3f}"),
            ("decode 2 ctx / 1 ctx", "decode_2ctx_over_1ctx", "{:.3f}"),
            ("users/s decode 1 context", "users_per_s_decode_1ctx", "{:.1f}"),
            ("users/s serving 2 contexts, multi", "users_per_s_multi_2ctx", "{:.1f}"),
            ("users/s serving 2 contexts, separate", "users_per_s_separate_2ctx", "{:.1f}")]
    for representation in constraints:
        rows.append((f"decode 1 ctx, {representation} constraint", f"decode_1ctx_{representation}_constraint_s",
                     "{:.4f}"))
        rows.append((f"users/s decode 1 ctx, {representation} constraint",
                     f"users_per_s_decode_1ctx_{representation}_constraint", "{:.1f}"))
    for label, key, fmt in rows:
        print(f"{label:<48}" + "".join(f"{fmt.format(results[feed][key]):>16}" for feed in feeds))
    print(f"\npaper: 481 / 698 chips = {481 / 698:.2f}; two contexts sharing one encoder pass give "
          f"(E + D2) / (2E + 2D1) -> 0.5 as the encoder share -> 1")

    summary = {"config": {k: v for k, v in vars(args).items()}, "num_params": int(num_params),
               "device": jax.devices()[0].platform,
               "results": {feed: {k: round(v, 6) for k, v in r.items()} for feed, r in results.items()}}
    print("RESULT " + json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
