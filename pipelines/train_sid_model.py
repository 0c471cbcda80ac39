"""Train the item tokenizer (RQ-VAE, or the RQ-KMeans baseline) on the catalog's content embeddings.

    python -m pipelines.train_sid_model --videos=workdir/out/validated/videos --date=2026-01-01 \
        --output=workdir/out/sid_model

Reads   <videos>/date=*/*.parquet      the videos table (validated), every partition up to --date; LFV and SFV
                                       together, since both scenarios share one SID vocabulary
Writes  <output>/config.json, params/  the checkpoint (orbax arrays + JSON config; no pickle)
        <output>/metrics.json          per-level codebook utilisation and entropy, full-SID collision rate,
                                       reconstruction error, training time
        <output>/_MANIFEST.json        every file's size and sha256 (``tokenminds_model.manifest``)

The whole directory is written into a staging directory beside <output> and swapped in at the end, so a failed run
keeps the previous model. <output> must be absent, empty or a SID model (replaced only with --overwrite): a folder
holding anything else is refused (exit 2) before any work.

Training is a single-machine JAX job (the catalog fits in memory), so this is a plain program, not a Beam pipeline.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import time
from typing import List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.cli import run_main
from tokenminds_model.checkpoints import check_sid_model_output, sid_model_writer, write_sid_model_files
from tokenminds_model.rqvae import RQVAEConfig, rq_kmeans, train_rqvae
from transforms import outputs, schemas

METRICS_FILE = "metrics.json"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", required=True, help="Root of the date-partitioned videos table.")
    parser.add_argument("--date", default=None, help="Use partitions up to this day (default: all).")
    parser.add_argument("--output", required=True, help="Checkpoint directory to write.")
    parser.add_argument("--kind", choices=("rqvae", "rq_kmeans"), default="rqvae")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook_size", type=int, default=256)
    parser.add_argument("--latent_dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing checkpoint.")
    return parser.parse_args(argv)


def catalog_files(videos_root: str, up_to: Optional[dt.date]) -> List[str]:
    matches = FileSystems.match([outputs.join(videos_root, "date=*", "*.parquet")])[0].metadata_list
    files = []
    for metadata in matches:
        found = re.search(r"date=(\d{4}-\d{2}-\d{2})", metadata.path)
        if found and (up_to is None or schemas.parse_date(found.group(1)) <= up_to):
            files.append(metadata.path)
    if not files:
        raise FileNotFoundError(f"no videos partitions under {videos_root}" + (f" up to {up_to}" if up_to else ""))
    return sorted(files)


def read_catalog(files: List[str]) -> pa.Table:
    tables = []
    for path in files:
        with FileSystems.open(path) as handle:
            tables.append(pq.read_table(handle, columns=["video_id", "scenario", "content_embedding"]))
    catalog = pa.concat_tables(tables)
    # A video republished on a later day appears twice; it is one item for the tokenizer (its first, earliest
    # copy). Items are ordered by video id, not by where they sit in the files, so the model (trained in batches
    # of this order) does not depend on how validate_inputs happened to shard and order the rows.
    _, first = np.unique(np.asarray(catalog["video_id"].to_pylist(), dtype=object), return_index=True)
    return catalog.take(pa.array(first))


def embeddings_of(catalog: pa.Table) -> np.ndarray:
    column = catalog["content_embedding"].combine_chunks()
    width = len(column[0]) if len(column) else 0
    flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    if flat.size != width * len(column):
        raise ValueError("content embeddings have unequal lengths; train on the validated videos table")
    return flat.reshape(len(column), width)


def train(args: argparse.Namespace) -> dict:
    check_sid_model_output(args.output, overwrite=args.overwrite)  # someone else's folder: refuse before any work
    files = catalog_files(args.videos, schemas.parse_date(args.date) if args.date else None)
    catalog = read_catalog(files)
    embeddings = embeddings_of(catalog)
    started = time.perf_counter()
    if args.kind == "rqvae":
        config = RQVAEConfig(input_dim=embeddings.shape[1], latent_dim=args.latent_dim, levels=args.levels,
                             codebook_size=args.codebook_size, steps=args.steps, batch_size=args.batch_size,
                             seed=args.seed)
        model, history = train_rqvae(embeddings, config)
        final_loss = history["loss"][-1] if history["loss"] else None
    else:
        model = rq_kmeans(embeddings, levels=args.levels, codebook_size=args.codebook_size, seed=args.seed)
        final_loss = None
    seconds = time.perf_counter() - started
    scenarios = np.asarray(catalog["scenario"].to_pylist())
    metrics = {
        "sid_model_version": model.version,
        "kind": model.kind,
        "items": int(embeddings.shape[0]),
        "items_per_scenario": {s: int(np.sum(scenarios == s)) for s in schemas.SCENARIOS},
        "embedding_dim": int(embeddings.shape[1]),
        "train_seconds": round(seconds, 3),
        "final_loss": final_loss,
        "catalog_files": len(files),
        **model.metrics(embeddings),
    }
    # Staged: the checkpoint and its metrics replace the old model together, with their manifest, or not at all.
    with sid_model_writer(args.output, overwrite=args.overwrite) as staged:
        write_sid_model_files(model, staged.path)
        outputs.write_text_file(outputs.join(staged.path, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
        staged.extra["version"] = model.version
    return metrics


def main(argv=None):
    metrics = train(parse_args(argv))
    print(json.dumps({k: metrics[k] for k in ("sid_model_version", "items", "train_seconds")}))
    for key in ("utilisation_per_level", "normalized_entropy_per_level", "full_sid_collision_rate",
                "max_items_per_sid", "reconstruction_mse"):
        if key in metrics:
            print(f"{key}: {metrics[key]}")


if __name__ == "__main__":
    run_main(main)
