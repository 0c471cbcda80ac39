"""Scaling of the daily example flow: update_histories and build_examples at three dataset sizes, and the I/O floor.

For each size (``--users``, over ``--days`` days; sample data from ``transforms.sample_data``, seed 0):

- setup, not part of the headline (in this process, timed only for information): generate and write the sample
  dataset, ``validate_inputs`` (all days), ``train_sid_model`` (``--sid-kind``, 3 x 256), ``assign_sids`` (all
  days), ``train_query_tokenizer``; after the first ``update_histories``, ``fit_feature_transform`` on day 1;
- timed, each as a measured subprocess (``bench.common.run_job``: ``python -m pipelines.X``, peak RSS and CPU of the
  whole process tree), with ``--runner=FnApiRunner`` in one process and then with ``--direct_num_workers=2
  --direct_running_mode=multi_processing``: ``update_histories`` over all days (``--backfill_days=1``: day 1 from
  raw events, then each day folded into the day before) and ``build_examples`` for day 2 (it reads the snapshots of
  days 1-3). Both runner modes must give the same number of examples;
- the floor, in this process: read the same validated Parquet input (``watch_events`` and ``search_events``, every
  day, ``pyarrow.parquet.read_table``) and write as many gzip TFRecord bytes as the examples took on disk (the same
  number of records, random bytes, so gzip cannot shrink them); best of ``--floor-repeats``.

"input events" are the validated watch + search rows over all days: what update_histories reads, and what the
snapshots build_examples reads were folded from. Seconds are the job's own run time (``python -m`` minus
interpreter start-up and imports, shown apart). Per-event cost ratio = (seconds per input event at the largest
size) / (at the smallest); ~1 is linear scaling, below 1 means fixed costs (worker start-up, artifact loading,
per-stage overhead) still weigh at the small size. The least-squares line seconds = fixed + per-event x events over
the sizes separates the two.

    python -m bench.examples_pipeline [--users=500,2000,8000] [--days=3] [--sid-kind=rq_kmeans] [--small]
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import FNAPI, RUNNERS, machine_line, print_table, result_line, run_job  # noqa: E402

EVENT_TABLES = ("watch_events", "search_events")
SMALL_USERS = "150,600"


def prepare(root: str, users: int, days: int, sid_kind: str) -> dict:
    """Sample data, validated, with a SID model, SIDs and a query tokenizer (in this process: setup, not timed)."""
    from pipelines import assign_sids, train_query_tokenizer, train_sid_model, validate_inputs
    from transforms.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset

    timings = {}
    started = time.perf_counter()
    config = SampleDataConfig(users=users, days=days, seed=0)
    write_sample_dataset(generate_sample_dataset(config), f"{root}/raw")
    timings["generate"] = time.perf_counter() - started
    dates = config.dates
    out = f"{root}/out"
    span = [f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--output_root={out}", *FNAPI]
    steps = [
        ("validate", lambda: validate_inputs.run(span + [f"--input_root={root}/raw"])),
        ("sid_model", lambda: train_sid_model.train(train_sid_model.parse_args(
            [f"--videos={out}/validated/videos", f"--date={dates[0]}", f"--output={out}/sid_model",
             f"--kind={sid_kind}", "--steps=300"]))),
        ("assign_sids", lambda: assign_sids.run(span)),
        ("query_tokenizer", lambda: train_query_tokenizer.run(span)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        step()
        timings[name] = time.perf_counter() - started
    return {"dates": dates, "out": out, "timings": timings}


def event_files(out: str, dates, tables=EVENT_TABLES):
    return sorted(path for table in tables for day in dates
                  for path in glob.glob(f"{out}/validated/{table}/date={day}/*.parquet"))


def count_rows(paths) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)


def floor_seconds(paths, out_dir: str, records: int, total_bytes: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds to read ``paths`` with pyarrow, and to write ``records`` gzip TFRecords of random
    bytes totalling ``total_bytes``."""
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    records = max(records, 1)
    size = max(total_bytes // records, 1)
    payload = rng.integers(0, 256, size * records + 1024, dtype=np.uint8).tobytes()
    reads, writes = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        rows = sum(pq.read_table(path).num_rows for path in paths)
        reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        path = f"{out_dir}/floor-{repeat}.tfrecord.gz"
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for index in range(records):
                offset = (index * 7919) % 1024  # records differ from each other
                writer.write(payload[index * size + offset:(index + 1) * size + offset])
        writes.append(time.perf_counter() - started)
        written = os.path.getsize(path)
        os.remove(path)
    return {"read_s": min(reads), "write_s": min(writes), "floor_s": min(reads) + min(writes), "rows_read": rows,
            "bytes_written": written}


def bench_size(users: int, days: int, sid_kind: str, floor_repeats: int, workdir: str) -> dict:
    from pipelines import fit_feature_transform

    root = tempfile.mkdtemp(prefix=f"bench_examples_{users}_", dir=workdir)
    print(f"\n[{users} users] setup in {root} ...", flush=True)
    prepared = prepare(root, users, days, sid_kind)
    dates, out = prepared["dates"], prepared["out"]
    build_day = dates[1]
    span = [f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--output_root={out}"]
    row = {"users": users, "days": days, "build_day": build_day, "setup_s": prepared["timings"],
           "events": count_rows(event_files(out, dates)),
           "watch_events": count_rows(event_files(out, dates, ("watch_events",))),
           "build_day_events": count_rows(event_files(out, [build_day]))}
    print(f"[{users} users] {row['events']:,} input events ({row['watch_events']:,} watches); setup "
          + ", ".join(f"{k} {v:.0f} s" for k, v in prepared["timings"].items()), flush=True)
    examples_by_mode = {}
    for label, runner in RUNNERS.items():
        key = "1p" if label == "1 process" else "2p"
        print(f"[{users} users] update_histories, {label} ...", flush=True)
        row[f"histories_{key}"] = strip_log(run_job("pipelines.update_histories", *span, "--backfill_days=1",
                                                    *runner))
        if not os.path.exists(f"{out}/feature_transform"):
            started = time.perf_counter()
            fit_feature_transform.run([f"--date={dates[0]}", f"--output_root={out}", *FNAPI])
            row["setup_s"]["feature_transform"] = time.perf_counter() - started
        print(f"[{users} users] build_examples {build_day}, {label} ...", flush=True)
        row[f"examples_{key}"] = strip_log(run_job("pipelines.build_examples", f"--date={build_day}",
                                                   f"--output_root={out}", *runner))
        examples_dir = f"{out}/examples/date={build_day}"
        with open(f"{examples_dir}/stats.json") as handle:
            examples_by_mode[key] = json.load(handle)["examples"]["examples"]
    if len(set(examples_by_mode.values())) != 1:
        raise RuntimeError(f"runner modes built different numbers of examples: {examples_by_mode}")
    row["examples"] = examples_by_mode["1p"]
    shards = glob.glob(f"{out}/examples/date={build_day}/part-*")
    row["example_bytes"] = sum(os.path.getsize(path) for path in shards)
    with open(f"{out}/histories/_runs/date={dates[-1]}/summary.json") as handle:
        row["histories_summary_totals"] = json.load(handle)["totals"]
    print(f"[{users} users] floor ...", flush=True)
    row["floor"] = floor_seconds(event_files(out, dates), f"{root}/floor", row["examples"], row["example_bytes"],
                                 floor_repeats)
    shutil.rmtree(root, ignore_errors=True)
    return row


def strip_log(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if k != "log"}


def linear_fit(events, seconds):
    """Least squares seconds = fixed + per_event * events; (fixed s, microseconds per event)."""
    if len(events) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.asarray(events, float), np.asarray(seconds, float), 1)
    return float(intercept), float(slope * 1e6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="500,2000,8000", help="comma-separated sizes (users), smallest first")
    parser.add_argument("--days", type=int, default=3, help="days of data (>= 3: day 2 needs days 1 and 3)")
    parser.add_argument("--sid-kind", choices=("rq_kmeans", "rqvae"), default="rq_kmeans",
                        help="SID model for the setup (rqvae: 300 steps)")
    parser.add_argument("--floor-repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="parent directory of the per-size work dirs (default: tmp)")
    parser.add_argument("--small", action="store_true", help=f"sizes {SMALL_USERS} (for bench.run_all)")
    args = parser.parse_args(argv)
    sizes = sorted(int(u) for u in (SMALL_USERS if args.small else args.users).split(","))
    if args.days < 3:
        parser.error("--days must be at least 3")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)

    # The setup runs Beam jobs in this process; their stage-level warnings are not news here.
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    started = time.perf_counter()
    print(f"{machine_line()}; sizes {sizes} users x {args.days} days; SID model {args.sid_kind} 3x256", flush=True)
    rows = [bench_size(users, args.days, args.sid_kind, args.floor_repeats, args.workdir) for users in sizes]
    total_s = time.perf_counter() - started

    for label in RUNNERS:
        key = "1p" if label == "1 process" else "2p"
        print(f"\n== {label} ({' '.join(RUNNERS[label])}) ==")
        table = []
        for r in rows:
            h, e = r[f"histories_{key}"], r[f"examples_{key}"]
            table.append([f"{r['users']:,}", f"{r['events']:,}", f"{h['run_s']:.1f}", f"{r['events'] / h['run_s']:,.0f}",
                          f"{h['cpu_s']:.0f}", f"{h['peak_tree_rss_mib']:,.0f}", f"{r['examples']:,}",
                          f"{e['run_s']:.1f}", f"{r['examples'] / e['run_s']:,.1f}", f"{r['events'] / e['run_s']:,.0f}",
                          f"{e['cpu_s']:.0f}", f"{e['peak_tree_rss_mib']:,.0f}",
                          f"{h['import_s']:.0f}/{e['import_s']:.0f}"])
        print_table(["users", "input events", "hist s", "hist events/s", "hist CPU s", "hist RSS MiB", "examples",
                     "build s", "examples/s", "build events/s", "build CPU s", "build RSS MiB", "imports s h/b"],
                    table)

    print("\n== floor: read the validated watch/search Parquet (pyarrow) + write the examples' bytes as gzip "
          "TFRecords ==")
    table = []
    for r in rows:
        f = r["floor"]
        table.append([f"{r['users']:,}", f"{f['rows_read']:,}", f"{r['examples']:,}",
                      f"{r['example_bytes'] / 2**20:,.2f}", f"{f['read_s']:.3f}", f"{f['write_s']:.3f}",
                      f"{f['floor_s']:.3f}", f"{r['examples_1p']['run_s'] / f['floor_s']:,.0f}x",
                      f"{r['examples_2p']['run_s'] / f['floor_s']:,.0f}x"])
    print_table(["users", "rows read", "records", "MiB written", "read s", "write s", "floor s",
                 "build 1p / floor", "build 2p / floor"], table)

    print(f"\n== scaling, {sizes[0]:,} -> {sizes[-1]:,} users ==")
    scaling, table = {}, []
    for pipeline in ("histories", "examples"):
        for key, label in (("1p", "1 process"), ("2p", "2 processes")):
            name = f"{pipeline}_{key}"
            small, large = rows[0], rows[-1]
            run_ratio = (large[name]["run_s"] / large["events"]) / (small[name]["run_s"] / small["events"])
            cpu_ratio = (large[name]["cpu_s"] / large["events"]) / (small[name]["cpu_s"] / small["events"])
            fixed, per_event = linear_fit([r["events"] for r in rows], [r[name]["run_s"] for r in rows])
            fixed_cpu, per_event_cpu = linear_fit([r["events"] for r in rows], [r[name]["cpu_s"] for r in rows])
            scaling[name] = {"cost_per_event_ratio": run_ratio, "cpu_per_event_ratio": cpu_ratio,
                             "fit_fixed_s": fixed, "fit_us_per_event": per_event, "fit_fixed_cpu_s": fixed_cpu,
                             "fit_cpu_us_per_event": per_event_cpu}
            marginal = {"run_s": "", "cpu_s": ""}
            if len(rows) >= 3:
                a, b, c = rows[-3], rows[-2], rows[-1]
                for measure, suffix in (("run_s", ""), ("cpu_s", "_cpu")):
                    first = (b[name][measure] - a[name][measure]) / (b["events"] - a["events"])
                    last = (c[name][measure] - b[name][measure]) / (c["events"] - b["events"])
                    ratio = last / first if first > 0 else float("nan")
                    scaling[name][f"marginal{suffix}_cost_ratio"] = ratio
                    marginal[measure] = f"{ratio:.2f}"
            table.append([f"{'update_histories' if pipeline == 'histories' else 'build_examples'}, {label}",
                          f"{run_ratio:.2f}", f"{cpu_ratio:.2f}", marginal["run_s"], marginal["cpu_s"],
                          f"{fixed:.1f}", f"{per_event:.0f}",
                          f"{fixed_cpu:.1f}", f"{per_event_cpu:.0f}"])
    print_table(["pipeline", "cost/event L/S", "CPU/event L/S", "marginal L/M", "CPU marginal L/M", "fit fixed s",
                 "fit us/event",
                 "fit fixed CPU s", "fit CPU us/event"], table)
    print("cost/event L/S: (run s per input event at the largest size) / (at the smallest), and the same in CPU s "
          "of the process tree; 1 = linear. marginal L/M: seconds (CPU s) per extra event between the two largest "
          "sizes / between the two before them; ~1 = linear once fixed costs are paid. fit: least squares over all "
          "sizes, run s (and CPU s) = fixed + per-event x input events.")
    processes = {f"{p}_{k}": rows[-1][f"{p}_{k}"]["process_commands"] for p in ("histories", "examples")
                 for k in ("1p", "2p")}
    print(f"processes seen per job at {rows[-1]['users']:,} users: {processes}")
    print(f"total benchmark time {total_s / 60:.1f} min")
    print(result_line("examples_pipeline", {"sizes": sizes, "days": args.days, "rows": rows, "scaling": scaling,
                                            "total_s": total_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
