"""RQ-VAE training time and bare-JAX encode throughput on synthetic items (default: 100k items, 64-d, 3 x 256).

The synthetic catalogue is hierarchical (top clusters, sub-clusters, isotropic noise) so that every SID level has
structure to find. Prints items, steps, seconds and items/s for training, then the encode throughput of
``jax.jit(model.encode)`` on the whole catalogue in one call and of ``model.encode_batched`` (8,192-row batches).

    .venv/bin/python bench/rqvae_training.py [--items 100000] [--dim 64] [--steps 3000] [--batch-size 1024] [--small]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import synthetic_items  # noqa: E402
from tokenminds_model.rqvae import RQVAEConfig, train_rqvae  # noqa: E402


def time_best_of(function, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="20,000 items, 300 steps (for bench.run_all)")
    args = parser.parse_args()
    if args.small:
        args.items, args.steps = 20_000, 300

    embeddings = synthetic_items(args.items, args.dim, args.seed)
    config = RQVAEConfig(input_dim=args.dim, levels=args.levels, codebook_size=args.codebook_size,
                         batch_size=args.batch_size, steps=args.steps, seed=args.seed)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); config: "
          f"{config.to_json()}")

    started = time.perf_counter()
    model, history = train_rqvae(embeddings, config)
    total_seconds = time.perf_counter() - started
    examples = args.steps * min(args.batch_size, args.items)
    print("\n== RQ-VAE training ==")
    print(f"items                 {args.items}")
    print(f"steps                 {args.steps} (batch {args.batch_size}, {examples / args.items:.1f} epochs)")
    print(f"seconds (total)       {total_seconds:.1f} (k-means init {history['kmeans_init_seconds']:.1f} s, "
          f"training loop incl. compilation {history['train_seconds']:.1f} s)")
    print(f"items/s               {examples / total_seconds:,.0f} training examples/s end to end, "
          f"{examples / history['train_seconds']:,.0f} in the training loop")
    print(f"re-seeded dead codes  {history['total_reseeded_codes']}")

    metrics = model.metrics(embeddings)
    print(f"utilisation/level     {[round(u, 3) for u in metrics['utilisation_per_level']]}")
    print(f"norm. entropy/level   {[round(e, 3) for e in metrics['normalized_entropy_per_level']]}")
    print(f"unique SIDs           {metrics['unique_sids']} (full-SID collision rate "
          f"{metrics['full_sid_collision_rate']:.4f})")
    print(f"reconstruction MSE    {metrics['reconstruction_mse']:.4f} (data variance per element "
          f"{float(embeddings.var(axis=0).mean()):.4f})")

    # Bare JAX: one jitted call over the whole catalogue, device-resident inputs, compilation excluded.
    encode = jax.jit(model.encode)
    device_params = jax.device_put(model.params)
    device_embeddings = jnp.asarray(embeddings)
    encode(device_params, device_embeddings).block_until_ready()
    whole_seconds = time_best_of(lambda: encode(device_params, device_embeddings).block_until_ready(), 5)
    model.encode_batched(embeddings)  # compile the batched path
    batched_seconds = time_best_of(lambda: model.encode_batched(embeddings), 3)
    print("\n== Encode throughput ==")
    print(f"jax.jit(model.encode), one call on {args.items} items: {whole_seconds * 1e3:.1f} ms, "
          f"{args.items / whole_seconds:,.0f} items/s")
    print(f"model.encode_batched (host numpy in/out, 8192-row batches): {batched_seconds * 1e3:.1f} ms, "
          f"{args.items / batched_seconds:,.0f} items/s")
    print("RESULT " + json.dumps({"bench": "rqvae_training", "items": args.items, "steps": args.steps,
                                  "train_seconds": round(total_seconds, 2),
                                  "train_examples_per_s": round(examples / total_seconds),
                                  "encode_items_per_s": round(args.items / batched_seconds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
