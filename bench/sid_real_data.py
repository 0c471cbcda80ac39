"""Real-data check of the item tokenizer on MovieLens-1M: RQ-VAE vs RQ-KMeans, side by side.

Reads ``../shared/data/movielens-1m/items.parquet`` (relative to the repository root; columns item_id, title,
genres '|'-separated, content_embedding float[384]) and prints, per model: per-level codebook utilisation and
normalized entropy, unique SIDs and full-SID collision rate, reconstruction MSE, and genre agreement -- how often
two items sharing a first-level code (or a first-two-level prefix) share at least one genre, against all item
pairs (the random-pair baseline). With only 3,416 items, 3 x 256 codes is a loose fit, so 3 x 64 is reported too.

    .venv/bin/python bench/sid_real_data.py [--items PATH] [--steps 2000] [--seed 0] [--small]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tokenminds_model.rqvae import RQVAEConfig, rq_kmeans, train_rqvae  # noqa: E402
from tokenminds_model.sid_metrics import label_agreement  # noqa: E402

DEFAULT_ITEMS = REPO_ROOT / ".." / "shared" / "data" / "movielens-1m" / "items.parquet"


def load_items(path: pathlib.Path):
    table = pq.read_table(path, columns=["item_id", "genres", "content_embedding"])
    embeddings = np.stack(table["content_embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    genre_lists = [genres.split("|") if genres else [] for genres in table["genres"].to_pylist()]
    genre_names = sorted({genre for genres in genre_lists for genre in genres})
    genre_matrix = np.array([[name in genres for name in genre_names] for genres in genre_lists], dtype=bool)
    return embeddings, genre_matrix, len(genre_names)


def evaluate(model, embeddings, genre_matrix, seconds):
    metrics = model.metrics(embeddings)
    codes = model.encode_batched(embeddings)
    first = label_agreement(codes, genre_matrix, prefix_length=1)
    first_two = label_agreement(codes, genre_matrix, prefix_length=2)
    return {"metrics": metrics, "first": first, "first_two": first_two, "seconds": seconds}


def print_table(columns):
    names = list(columns)
    levels = columns[names[0]]["metrics"]["levels"]
    rows = [("fit seconds", lambda r: f"{r['seconds']:.1f}")]
    for level in range(levels):
        rows.append((f"L{level + 1} utilisation", lambda r, l=level: f"{r['metrics']['utilisation_per_level'][l]:.3f}"))
    for level in range(levels):
        rows.append((f"L{level + 1} norm. entropy",
                     lambda r, l=level: f"{r['metrics']['normalized_entropy_per_level'][l]:.3f}"))
    rows += [
        ("unique SIDs", lambda r: f"{r['metrics']['unique_sids']}"),
        ("full-SID collision rate", lambda r: f"{r['metrics']['full_sid_collision_rate']:.4f}"),
        ("max items per SID", lambda r: f"{r['metrics']['max_items_per_sid']}"),
        ("L1-prefix collision rate", lambda r: f"{r['metrics']['prefix_collision_rate'][0]:.4f}"),
        ("L1+L2-prefix collision rate", lambda r: f"{r['metrics']['prefix_collision_rate'][1]:.4f}"),
        ("reconstruction MSE", lambda r: f"{r['metrics']['reconstruction_mse']:.6f}"),
        ("genre agree, same L1 code", lambda r: f"{r['first']['same_prefix_agreement']:.3f}"),
        ("  (pairs)", lambda r: f"{r['first']['same_prefix_pairs']}"),
        ("genre agree, same L1+L2", lambda r: f"{r['first_two']['same_prefix_agreement']:.3f}"),
        ("  (pairs)", lambda r: f"{r['first_two']['same_prefix_pairs']}"),
        ("genre agree, random pairs", lambda r: f"{r['first']['all_pairs_agreement']:.3f}"),
    ]
    label_width = max(len(label) for label, _ in rows) + 2
    column_width = max(max(len(name) for name in names) + 2, 12)
    print("".ljust(label_width) + "".join(name.rjust(column_width) for name in names))
    for label, cell in rows:
        print(label.ljust(label_width) + "".join(cell(columns[name]).rjust(column_width) for name in names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=pathlib.Path, default=DEFAULT_ITEMS)
    parser.add_argument("--steps", type=int, default=2000, help="RQ-VAE training steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="300 RQ-VAE steps (for bench.run_all)")
    args = parser.parse_args()
    if args.small:
        args.steps = 300

    if not args.items.exists():
        print(f"SKIP: MovieLens items not found at {args.items.resolve()} (../shared/data is not mounted); "
              f"nothing to benchmark.")
        return 0
    embeddings, genre_matrix, num_genres = load_items(args.items)
    print(f"MovieLens-1M items: {embeddings.shape[0]} items, {embeddings.shape[1]}-d content embeddings, "
          f"{num_genres} genres; RQ-VAE: {args.steps} steps, batch {args.batch_size}, seed {args.seed}\n")

    columns = {}
    for codebook_size in (256, 64):
        config = RQVAEConfig(input_dim=embeddings.shape[1], levels=3, codebook_size=codebook_size,
                             batch_size=args.batch_size, steps=args.steps, seed=args.seed)
        started = time.perf_counter()
        model, history = train_rqvae(embeddings, config)
        columns[f"RQ-VAE 3x{codebook_size}"] = evaluate(model, embeddings, genre_matrix,
                                                         time.perf_counter() - started)
        print(f"RQ-VAE 3x{codebook_size}: version {model.version}, re-seeded {history['total_reseeded_codes']} "
              f"dead codes during training")

        started = time.perf_counter()
        baseline = rq_kmeans(embeddings, levels=3, codebook_size=codebook_size, seed=args.seed)
        columns[f"RQ-KMeans 3x{codebook_size}"] = evaluate(baseline, embeddings, genre_matrix,
                                                            time.perf_counter() - started)
    print()
    print_table(columns)
    print("RESULT " + json.dumps({"bench": "sid_real_data", "items": int(embeddings.shape[0]), "columns": columns},
                                 default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
