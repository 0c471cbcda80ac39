"""SID-prefix decoding throughput, and what multi-context decoding saves over separate per-context passes.

The TokenMinds model itself (``tokenminds_model.model``, random weights; width, heads, layers and history length
configurable) encodes a batch of ``--users`` histories of ``--history-len`` tokens, and ``tokenminds_model.decoding``
beam-searches ``--prefix-len`` SID levels (codebook ``--codebook-size``, beam ``--beam-size``, top ``--top-n``).
Measured side by side in one run (every measure of every decoder round-robin, best of ``--repeats`` after
compilation):

- encode: one jitted encoder pass over the batch;
- decode, 1 context: ``beam_search`` for <LFV> on given encoder states;
- decode, 2 contexts: ``multi_context_decode`` for <LFV> and <SFV> (one batched decoder run);
- multi total: one encoder pass + ``multi_context_decode`` (what serving both scenarios costs);
- separate total: ``separate_decode``: per context, a full encoder pass + ``beam_search`` (the baseline);
- constrained decoding (1 context) against a random catalogue, dense and sparse tables.

Three decoders (``--feeds``), the same model and weights:

- ``aligned``: ``ModelFunctions.decode`` under the batch-aligned contract: the encoder states are tiled to one row per
  beam, and every row re-projects its user's memory to cross-attention keys/values at every level;
- ``grouped``: ``decode_grouped`` (``grouped=True``): the memory's keys/values once per user per level, the whole
  decoder input recomputed at every level and logits projected at every position;
- ``cached``: ``ModelFunctions.incremental_decoder`` (what ``UserInference`` serves with): the memory's keys/values
  once per user for all levels, decoder self-attention keys/values cached across levels and reordered with the
  beams, logits only at each beam's newest position.

The default configuration is encoder-dominant, as serving the paper's model is (a deep encoder over long histories,
a shallower decoder over at most ``prefix_len`` tokens): width 256, 8 heads, 6 encoder and 2 decoder layers, MLP
1024, 1,024-token histories, 16 users, codebook 256, 3 levels, beam 20. The encoder share printed is encode /
(encode + 1-context decode). With C contexts sharing one encoder pass the ratio multi / separate is
(E + D_C) / (C (E + D_1)), which tends to 1/C as the encoder share tends to 1; the paper's serving saving was
481 vs 698 chips (0.69).

    .venv/bin/python bench/decoding.py [--users 16] [--history-len 1024] [--width 256] [--enc-layers 6]
        [--dec-layers 2] [--beam-size 20] [--catalogue 100000] [--feeds grouped,cached]

Ends with one ``RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from typing import Any, Callable, Dict

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tokenminds_model.decoding import (PrefixConstraint, beam_search, multi_context_decode,  # noqa: E402
                                       separate_decode)
from tokenminds_model.model import ModelConfig, count_params, model_functions  # noqa: E402
from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SFV_ID, VocabularyLayout  # noqa: E402

FEEDS = ("aligned", "grouped", "cached")


def feed_functions(fns, feed: str):
    """(logits_fn, grouped) of a feed."""
    return {"aligned": (fns.decode, False), "grouped": (fns.decode_grouped, True),
            "cached": (fns.incremental_decoder, False)}[feed]


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


def feed_benchmarks(feed: str, fns, params, tokens, layout, args, constraints) -> Dict[str, Callable[[], Any]]:
    """The functions timed for one decoder, keyed by measure."""
    logits_fn, grouped = feed_functions(fns, feed)
    options = dict(layout=layout, prefix_len=args.prefix_len, beam_size=args.beam_size, top_n=args.top_n,
                   params=params, grouped=grouped)
    jitted_encode = jax.jit(fns.encode)
    enc_states, enc_mask = jitted_encode(params, tokens)

    def multi_total():
        states, mask = jitted_encode(params, tokens)
        return multi_context_decode(logits_fn, states, mask, (LFV_ID, SFV_ID), **options)

    functions = {
        "encode": lambda: jitted_encode(params, tokens),
        "decode_1ctx": lambda: beam_search(logits_fn, enc_states, enc_mask, LFV_ID, layout, args.prefix_len,
                                           args.beam_size, args.top_n, params=params, grouped=grouped),
        "decode_2ctx": lambda: multi_context_decode(logits_fn, enc_states, enc_mask, (LFV_ID, SFV_ID), **options),
        "multi_total": multi_total,
        "separate_total": lambda: separate_decode(fns.encode, logits_fn, tokens, (LFV_ID, SFV_ID), **options),
    }
    for representation, constraint in constraints.items():
        functions[f"decode_1ctx_{representation}_constraint"] = functools.partial(
            beam_search, logits_fn, enc_states, enc_mask, SFV_ID, layout, args.prefix_len, args.beam_size,
            args.top_n, constraint, params=params, grouped=grouped)
    return functions


def feed_figures(seconds: Dict[str, float], users: int, constraints) -> Dict[str, float]:
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16, help="users per batch (encoder batch B)")
    parser.add_argument("--history-len", type=int, default=1024, help="encoder tokens per user (T)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--enc-layers", type=int, default=6)
    parser.add_argument("--dec-layers", type=int, default=2)
    parser.add_argument("--mlp-ratio", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--sid-levels", type=int, default=3)
    parser.add_argument("--prefix-len", type=int, default=3)
    parser.add_argument("--beam-size", type=int, default=20)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--query-vocab-size", type=int, default=1000)
    parser.add_argument("--catalogue", type=int, default=100_000,
                        help="items in the random catalogue for constrained decoding (0: skip)")
    parser.add_argument("--feeds", default="grouped,cached",
                        help=f"decoders to measure, of {FEEDS} (aligned re-projects the memory for every beam row: "
                             "slow at the default size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    feeds = [f.strip() for f in args.feeds.split(",") if f.strip()]
    unknown = set(feeds) - set(FEEDS)
    if unknown:
        parser.error(f"unknown feeds {sorted(unknown)}; expected some of {FEEDS}")

    layout = VocabularyLayout(sid_levels=args.sid_levels, codebook_size=args.codebook_size,
                              query_vocab_size=args.query_vocab_size)
    config = ModelConfig(vocab_size=layout.vocab_size, max_tokens=args.history_len, num_targets=1,
                         target_len=1 + args.prefix_len, d_model=args.width, num_heads=args.heads,
                         encoder_layers=args.enc_layers, decoder_layers=args.dec_layers,
                         mlp_dim=args.mlp_ratio * args.width, embedding_dim=args.width, pooling="mean_last",
                         dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
    fns = model_functions(config)
    params = fns.init(jax.random.key(args.seed))
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(layout.sid_start, layout.vocab_size, size=(args.users, args.history_len))
    lengths = rng.integers(args.history_len // 2, args.history_len + 1, size=args.users)
    tokens[np.arange(args.history_len)[None, :] >= lengths[:, None]] = PAD_ID
    tokens = jnp.asarray(tokens, jnp.int32)

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

    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); TokenMinds model: "
          f"width {args.width}, heads {args.heads}, {args.enc_layers} encoder + {args.dec_layers} decoder layers, "
          f"MLP {config.mlp_dim}, vocab {layout.vocab_size}, {count_params(params):,} params, {config.dtype}; "
          f"{args.users} users x {args.history_len} history tokens; L={args.prefix_len}, K={args.codebook_size}, "
          f"beam {args.beam_size}, top {args.top_n}", flush=True)

    # Every measure of every decoder in one round-robin: load from other processes hits them all alike.
    functions = {}
    for feed in feeds:
        for name, function in feed_benchmarks(feed, fns, params, tokens, layout, args, constraints).items():
            functions[(feed, name)] = function
    started = time.perf_counter()
    seconds = interleaved_best_of(functions, args.repeats)
    print(f"  timed in {time.perf_counter() - started:.0f} s (compilation included)", flush=True)
    results = {feed: feed_figures({name: s for (f, name), s in seconds.items() if f == feed}, args.users,
                                  constraints) for feed in feeds}

    # Every decoder must decode the same codes (scores to float rounding).
    enc_states, enc_mask = jax.jit(fns.encode)(params, tokens)
    decoded = {}
    for feed in feeds:
        logits_fn, grouped = feed_functions(fns, feed)
        decoded[feed] = multi_context_decode(logits_fn, enc_states, enc_mask, (LFV_ID, SFV_ID), layout=layout,
                                             prefix_len=args.prefix_len, beam_size=args.beam_size, top_n=args.top_n,
                                             params=params, grouped=grouped)
    reference = feeds[0]
    for feed in feeds[1:]:
        codes_equal = all(np.array_equal(decoded[reference][c][0], decoded[feed][c][0]) for c in (LFV_ID, SFV_ID))
        score_diff = max(float(np.max(np.abs(np.asarray(decoded[reference][c][1]) - np.asarray(decoded[feed][c][1]))))
                         for c in (LFV_ID, SFV_ID))
        print(f"{feed} vs {reference} (2 contexts): codes equal {codes_equal}, max |score diff| {score_diff:.2e}")
        results[feed][f"codes_equal_{reference}"] = float(codes_equal)
        results[feed][f"max_score_diff_{reference}"] = score_diff

    header = f"{'measure (seconds per batch of ' + str(args.users) + ' users)':<48}" + "".join(
        f"{feed:>14}" for feed in feeds)
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
        print(f"{label:<48}" + "".join(f"{fmt.format(results[feed][key]):>14}" for feed in feeds))
    print(f"\npaper: 481 / 698 chips = {481 / 698:.2f}; two contexts sharing one encoder pass give "
          f"(E + D2) / (2E + 2D1) -> 0.5 as the encoder share -> 1")

    summary = {"config": {k: v for k, v in vars(args).items()}, "num_params": int(count_params(params)),
               "device": jax.devices()[0].platform, "dtype": config.dtype,
               "results": {feed: {k: round(v, 6) for k, v in r.items()} for feed, r in results.items()}}
    print("RESULT " + json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
