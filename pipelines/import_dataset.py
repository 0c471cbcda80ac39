"""Import a real dataset (MovieLens and the like) as the project's input tables, so every pipeline runs on real data.

    python -m pipelines.import_dataset --dataset=../shared/data/movielens-1m --output_root=workdir/ml1m
    python -m pipelines.import_dataset --dataset=../shared/data/movielens-latest-small --output_root=workdir/mlsmall
    python -m pipelines.import_dataset --dataset=../shared/data/movielens-1m --output_root=workdir/ml1m_last30 \
        --last_days=30

A plain bulk conversion, not a Beam pipeline: the source files are read and converted in memory with pyarrow and
NumPy (see ``data_sources/dataset_import.py`` for the mapping) and written as
``<output_root>/{watch_events,search_events,videos}/date=YYYY-MM-DD/part-00000.parquet`` and its landing marker
``_SUCCESS`` (every day of the range, empty days included; the daily DAG's first sensor waits for the markers), ``<output_root>/_catalog/items.parquet`` and ``<output_root>/_dataset.json``. Rerunning with the same
options gives identical files, replacing the old ones. Run the pipelines on it with ``--input_root=<output_root>
--embedding_dim=<embedding_dim from _dataset.json>`` and a ``--date`` in the range (the manifest lists the densest).
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

from data_sources.dataset_import import ImportConfig, import_dataset, write_imported_dataset
from transforms import schemas


def _date(value: str) -> str:
    return schemas.parse_date(value).isoformat()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help="directory with interactions.parquet (or ratings.parquet) and items.parquet")
    parser.add_argument("--output_root", required=True, help="local directory to write the input tables under")
    parser.add_argument("--tags_dataset", default=None,
                        help="directory whose tags.parquet becomes search_events (default: the dataset's own "
                             "tags.parquet, if any); another dataset's users are prefixed 't'")
    parser.add_argument("--no_tags", action="store_true", help="import no tags, even the dataset's own")
    parser.add_argument("--start_date", type=_date, default=None, help="first UTC day to import, YYYY-MM-DD")
    parser.add_argument("--end_date", type=_date, default=None, help="last UTC day to import (inclusive)")
    parser.add_argument("--last_days", type=int, default=None,
                        help="import only this many days, ending on the last day (instead of --start_date)")
    parser.add_argument("--shift_tags_days", type=int, default=0,
                        help="whole days added to every tag timestamp, to move a foreign tag set into the window")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    config = ImportConfig(dataset=args.dataset, tags_dataset=args.tags_dataset, use_tags=not args.no_tags,
                          start_date=args.start_date, end_date=args.end_date, last_days=args.last_days,
                          shift_tags_days=args.shift_tags_days)

    started = time.perf_counter()
    dataset = import_dataset(config)
    manifest = write_imported_dataset(dataset, args.output_root)
    seconds = time.perf_counter() - started

    rows = ", ".join(f"{table}={count}" for table, count in manifest["totals"].items())
    dropped = ", ".join(f"{reason}={count}" for reason, count in manifest["dropped"].items() if count) or "nothing"
    densest = ", ".join(f"{d['date']} ({d['watch_events']})" for d in manifest["densest_dates"][:3])
    print(f"wrote {args.output_root}: {rows} over {len(manifest['dates'])} days "
          f"{manifest['first_date']}..{manifest['last_date']} in {seconds:.1f} s")
    print(f"dropped: {dropped}")
    if manifest["dropped"].get("tags_outside_window") and not manifest["totals"]["search_events"]:
        print(f"warning: no tag falls in {manifest['first_date']}..{manifest['last_date']} (tags span "
              f"{'..'.join(manifest['source']['tags_span'])}); --shift_tags_days moves them in time")
    print(f"densest days (watches): {densest}")
    print(f"run pipelines with --input_root={args.output_root} --embedding_dim={manifest['embedding_dim']} "
          f"--date={manifest['densest_dates'][0]['date'] if manifest['densest_dates'] else manifest['last_date']}")
    return manifest


if __name__ == "__main__":
    main()
