"""Write the synthetic sample dataset: videos, watch events and search events, plus the truth they came from.

    python -m pipelines.make_sample_data --output_root=/tmp/tokenminds_sample --users=2000 --days=8 --seed=0

A plain generator, not a Beam pipeline: the data is drawn in memory with NumPy (see ``data_sources/sample_data.py``)
and written as ``<output_root>/<table>/date=YYYY-MM-DD/part-00000.parquet`` followed by that partition's landing
marker ``_SUCCESS`` (what the daily DAG's first sensor waits for), ``<output_root>/_truth/`` and
``<output_root>/_dataset.json``. Rerunning with the same options gives identical files, replacing the old ones.
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

from data_sources.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset
from transforms import schemas

_DEFAULTS = SampleDataConfig()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_root", required=True, help="local directory to write the dataset under")
    parser.add_argument("--users", type=int, default=_DEFAULTS.users)
    parser.add_argument("--days", type=int, default=_DEFAULTS.days)
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--start_date", type=schemas.parse_date, default=_DEFAULTS.start_date,
                        help="first partition date, YYYY-MM-DD")
    parser.add_argument("--bad_row_rate", type=float, default=_DEFAULTS.bad_row_rate,
                        help="share of rows deliberately broken so validation has dead letters")
    parser.add_argument("--lfv_videos", type=int, default=_DEFAULTS.lfv_videos,
                        help="LFV catalog on the start date (at least one video per sub-topic)")
    parser.add_argument("--sfv_videos", type=int, default=_DEFAULTS.sfv_videos, help="SFV catalog on the start date")
    parser.add_argument("--history_watches", type=int, default=_DEFAULTS.history_watches,
                        help="a prior history of about this many watches per user on the start date (0: none; "
                             "1200 puts every user near the history cap)")
    parser.add_argument("--lfv_search_session_prob", type=float, default=_DEFAULTS.lfv_search_session_prob,
                        help="chance that an LFV session opens with a search (a search-heavy sample: e.g. 0.8)")
    parser.add_argument("--sfv_search_session_prob", type=float, default=_DEFAULTS.sfv_search_session_prob,
                        help="chance that an SFV session opens with a search")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    config = SampleDataConfig(users=args.users, days=args.days, seed=args.seed,
                              start_date=args.start_date.isoformat(),  # argparse parses the default too
                              bad_row_rate=args.bad_row_rate, lfv_videos=args.lfv_videos,
                              sfv_videos=args.sfv_videos, history_watches=args.history_watches,
                              lfv_search_session_prob=args.lfv_search_session_prob,
                              sfv_search_session_prob=args.sfv_search_session_prob)

    started = time.perf_counter()
    dataset = generate_sample_dataset(config)
    manifest = write_sample_dataset(dataset, args.output_root)
    seconds = time.perf_counter() - started

    rows = ", ".join(f"{table}={sum(counts.values())}" for table, counts in manifest["row_counts"].items())
    planted = sum(manifest["planted_bad_rows"].values())
    print(f"wrote {args.output_root}: {rows} over {config.days} days from {config.start_date}, "
          f"{planted} planted bad rows, in {seconds:.1f} s")
    return manifest


if __name__ == "__main__":
    main()
