"""Scaling of the daily example flow: update_histories and build_examples at three dataset sizes.

    python -m bench.examples_pipeline [--users=500,2000,8000] [--days=3] [--small]

For each size: generate the sample dataset, prepare it (validate, SID model, SIDs, tokenizer, feature transform: not
timed), then time update_histories (all days) and build_examples (day 2), each with --runner=FnApiRunner in one
process and with 2 worker processes, as subprocesses whose process tree is polled for peak RSS. Prints input
events/s, examples/s, peak RSS, and the per-event cost ratio largest/smallest (~1 = linear scaling). In the same run,
the floor: reading the same validated Parquet input and writing as many gzip TFRecord bytes as the examples took.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SINGLE = ["--runner=FnApiRunner"]
MULTI = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def run_measured(module: str, *args: str):
    """Runs ``python -m module args`` and returns (seconds, peak RSS of its process tree in MiB)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{module} failed: {process.stderr.read()[-2000:]}")
    return seconds, peak / 2**20


def prepare(root: str, users: int, days: int):
    from transforms.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset

    config = SampleDataConfig(users=users, days=days, seed=0)
    write_sample_dataset(generate_sample_dataset(config), f"{root}/raw")
    dates = config.dates
    span = [f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--output_root={root}/out"]
    run_measured("pipelines.validate_inputs", *span, f"--input_root={root}/raw", *SINGLE)
    run_measured("pipelines.train_sid_model", f"--videos={root}/out/validated/videos", f"--date={dates[0]}",
                 f"--output={root}/out/sid_model", "--kind=rq_kmeans")
    run_measured("pipelines.assign_sids", *span, *SINGLE)
    run_measured("pipelines.train_query_tokenizer", *span, *SINGLE)
    return dates, span


def events_in(root: str, dates) -> int:
    total = 0
    for table in ("watch_events", "search_events"):
        for day in dates:
            for path in glob.glob(f"{root}/out/validated/{table}/date={day}/*.parquet"):
                total += pq.ParquetFile(path).metadata.num_rows
    return total


def floor_seconds(root: str, dates, example_bytes: int) -> float:
    """Read the validated events (pyarrow) and write ``example_bytes`` of gzip TFRecords: the I/O floor."""
    import tensorflow as tf

    started = time.perf_counter()
    for table in ("watch_events", "search_events"):
        for day in dates:
            for path in glob.glob(f"{root}/out/validated/{table}/date={day}/*.parquet"):
                pq.read_table(path).to_pylist()
    rng = np.random.default_rng(0)
    record = rng.integers(0, 256, 8192, dtype=np.uint8).tobytes()
    with tf.io.TFRecordWriter(f"{root}/floor.tfrecord.gz", options="GZIP") as writer:
        for _ in range(max(1, example_bytes // len(record))):
            writer.write(record)
    return time.perf_counter() - started


def bench_size(users: int, days: int):
    root = tempfile.mkdtemp(prefix=f"bench_examples_{users}_")
    dates, span = prepare(root, users, days)
    build_day = dates[1]
    row = {"users": users, "events": events_in(root, dates)}
    for mode, runner in (("single", SINGLE), ("2proc", MULTI)):
        seconds, rss = run_measured("pipelines.update_histories", *span, "--backfill_days=1", *runner)
        row[f"histories_{mode}_s"], row[f"histories_{mode}_rss_mib"] = seconds, rss
        if mode == "single":
            run_measured("pipelines.fit_feature_transform", f"--date={dates[0]}", f"--output_root={root}/out",
                         *SINGLE)
        seconds, rss = run_measured("pipelines.build_examples", f"--date={build_day}", f"--output_root={root}/out",
                                    *runner)
        row[f"examples_{mode}_s"], row[f"examples_{mode}_rss_mib"] = seconds, rss
    stats = json.load(open(f"{root}/out/examples/date={build_day}/stats.json"))
    row["examples"] = stats["examples"]["examples"]
    example_bytes = sum(os.path.getsize(p) for p in glob.glob(f"{root}/out/examples/date={build_day}/part-*"))
    row["example_bytes"] = example_bytes
    row["floor_s"] = floor_seconds(root, dates, example_bytes)
    day_events = sum(pq.ParquetFile(p).metadata.num_rows for t in ("watch_events", "search_events")
                     for p in glob.glob(f"{root}/out/validated/{t}/date={build_day}/*.parquet"))
    row["build_day_events"] = day_events
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", default="500,2000,8000")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="sizes 200,800 (for bench.run_all)")
    args = parser.parse_args(argv)
    sizes = [200, 800] if args.small else [int(u) for u in args.users.split(",")]
    rows = [bench_size(users, args.days) for users in sizes]

    print(f"{'users':>7}{'events':>9}{'hist ev/s 1p':>14}{'hist ev/s 2p':>14}{'examples':>10}{'ex/s 1p':>9}"
          f"{'ex/s 2p':>9}{'RSS 1p MiB':>12}{'RSS 2p MiB':>12}{'build/floor':>13}")
    for r in rows:
        print(f"{r['users']:>7}{r['events']:>9}{r['events'] / r['histories_single_s']:>14,.0f}"
              f"{r['events'] / r['histories_2proc_s']:>14,.0f}{r['examples']:>10}"
              f"{r['examples'] / r['examples_single_s']:>9,.1f}{r['examples'] / r['examples_2proc_s']:>9,.1f}"
              f"{max(r['histories_single_rss_mib'], r['examples_single_rss_mib']):>12,.0f}"
              f"{max(r['histories_2proc_rss_mib'], r['examples_2proc_rss_mib']):>12,.0f}"
              f"{r['examples_single_s'] / r['floor_s']:>13.1f}")
    small, large = rows[0], rows[-1]
    ratios = {
        "histories_cost_per_event_ratio": (large["histories_single_s"] / large["events"])
        / (small["histories_single_s"] / small["events"]),
        "examples_cost_per_event_ratio": (large["examples_single_s"] / large["build_day_events"])
        / (small["examples_single_s"] / small["build_day_events"]),
    }
    print(f"per-event cost, largest/smallest size: update_histories {ratios['histories_cost_per_event_ratio']:.2f}, "
          f"build_examples {ratios['examples_cost_per_event_ratio']:.2f} (1 = linear; fixed start-up costs "
          "weigh more at small sizes, so values below 1 are expected)")
    print("RESULT " + json.dumps({"bench": "examples_pipeline", "rows": rows, **ratios}))


if __name__ == "__main__":
    main()
