"""validate_inputs: rows per CPU-second at two sizes, and peak memory over a long range of days.

Setup (not timed): the sample dataset (``data_sources.sample_data``) for each size and for the range.

Timed, each as a measured subprocess (``bench.common.run_job``: CPU seconds and peak RSS of the process tree,
interpreter start-up excluded from run seconds), one process, ``--runner=FnApiRunner``:
- daily: ``python -m pipelines.validate_inputs`` over ``--days`` days of the sample at each of ``--users`` (smallest
  first). Input rows: every row of watch_events, search_events and videos in the range. Marginal rows per CPU-second
  = (rows of the largest size - rows of the smallest) / (CPU of the largest - CPU of the smallest): the cost per
  extra row, fixed costs (imports, Beam start-up) cancelled; the whole run's rows per CPU-second beside it.
- range: the same job over ``--range-days`` days (default 150) of a sample of ``--range-users`` users (about 200,000
  interactions at the defaults): one job, every date's partitions; its peak RSS and rows per CPU-second.

    python -m bench.validate_inputs [--users 2000,8000] [--days 2] [--range-days 150] [--range-users 100]

The issue's figures: marginal rows per CPU-second >= 50,000 (daily), and the 150-day range under 2 GB peak RSS.
"""
from __future__ import annotations

import argparse
import glob
import shutil
import tempfile

import pyarrow.parquet as pq

from bench.common import machine_line, print_table, result_line, run_job

FNAPI = "--runner=FnApiRunner"
TABLES = ("watch_events", "search_events", "videos")
BARS = {"marginal_rows_per_cpu_s": 50_000, "range_peak_rss_mib": 2048.0}


def make_sample(root: str, users: int, days: int):
    from data_sources.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset

    config = SampleDataConfig(users=users, days=days, seed=0)
    write_sample_dataset(generate_sample_dataset(config), f"{root}/raw")
    rows = sum(pq.ParquetFile(path).metadata.num_rows
               for table in TABLES for path in glob.glob(f"{root}/raw/{table}/date=*/*.parquet"))
    return config.dates, rows


def validate(root: str, dates) -> dict:
    measured = run_job("pipelines.validate_inputs", f"--start_date={dates[0]}", f"--end_date={dates[-1]}",
                       f"--input_root={root}/raw", f"--output_root={root}/out", FNAPI)
    measured.pop("log")
    return measured


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="2000,8000", help="two comma-separated sizes (users), smallest first")
    parser.add_argument("--days", type=int, default=2, help="days of each daily size")
    parser.add_argument("--range-days", type=int, default=150, help="days of the range run (0: skip it)")
    parser.add_argument("--range-users", type=int, default=100)
    parser.add_argument("--workdir", default=None, help="parent of the work dirs (default: tmp)")
    args = parser.parse_args(argv)
    sizes = [int(u) for u in args.users.split(",")]
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        parser.error("--users takes two sizes, smallest first")
    print(machine_line(), flush=True)

    runs, table = [], []
    work = tempfile.mkdtemp(prefix="bench_validate_", dir=args.workdir)
    try:
        cases = [(f"{users} users x {args.days} days", users, args.days) for users in sizes]
        if args.range_days:
            cases.append((f"range: {args.range_users} users x {args.range_days} days", args.range_users,
                          args.range_days))
        for label, users, days in cases:
            root = f"{work}/{users}x{days}"
            dates, rows = make_sample(root, users, days)
            print(f"[{label}] {rows:,} input rows; validating ...", flush=True)
            measured = validate(root, dates)
            runs.append({"label": label, "rows": rows, **measured})
            table.append([label, f"{rows:,}", f"{measured['cpu_s']:.1f}", f"{rows / measured['cpu_s']:,.0f}",
                          f"{measured['peak_tree_rss_mib']:,.0f}", f"{measured['wall_s']:.1f}"])
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(["run", "input rows", "CPU s", "rows/CPU-s (whole run)", "peak RSS MiB", "wall s"], table)
    small, large = runs[0], runs[1]
    figures = {"marginal_rows_per_cpu_s": (large["rows"] - small["rows"]) / max(large["cpu_s"] - small["cpu_s"], 1e-9)}
    if args.range_days:
        figures["range_peak_rss_mib"] = runs[2]["peak_tree_rss_mib"]
        figures["range_rows_per_cpu_s"] = runs[2]["rows"] / runs[2]["cpu_s"]
    print()
    print(f"marginal rows per CPU-second ({small['label']} -> {large['label']}): "
          f"{figures['marginal_rows_per_cpu_s']:,.0f} (bar >= {BARS['marginal_rows_per_cpu_s']:,}: "
          f"{'met' if figures['marginal_rows_per_cpu_s'] >= BARS['marginal_rows_per_cpu_s'] else 'NOT met'})")
    if args.range_days:
        print(f"range peak RSS: {figures['range_peak_rss_mib']:,.0f} MiB (bar <= {BARS['range_peak_rss_mib']:,.0f}: "
              f"{'met' if figures['range_peak_rss_mib'] <= BARS['range_peak_rss_mib'] else 'NOT met'}); "
              f"{figures['range_rows_per_cpu_s']:,.0f} rows/CPU-s")
    result = {"runs": runs, "figures": figures, "bars": BARS}
    print(result_line("validate_inputs", result))
    return result


if __name__ == "__main__":
    main()
