"""Scaling of the daily example flow: update_histories and build_examples at several dataset sizes, a long-history
size, the I/O floor, and (optionally) the same jobs of an older checkout side by side.

For each size (``--users``, over ``--days`` days; sample data from ``data_sources.sample_data``, seed 0):

- setup, not part of the headline (in this process, timed only for information): generate and write the sample
  dataset, ``validate_inputs`` (all days), ``train_sid_model`` (``--sid-kind``, 3 x 256), ``assign_sids`` (all
  days), ``train_query_tokenizer``; after the first ``update_histories``, ``fit_feature_transform`` on day 1;
- timed, each as a measured subprocess (``bench.common.run_job``: the job module run as ``python -m`` would, peak RSS
  and CPU of the whole process tree, under ``bench/_gc_probe.py``, which also measures its GC time), for each runner
  mode of ``--modes`` (``1p``: ``--runner=FnApiRunner`` in one process; ``2p``: ``--direct_num_workers=2
  --direct_running_mode=multi_processing``): ``update_histories`` over all days (``--backfill_days=1``: day 1 from
  raw events, then each day folded into the day before) and ``build_examples`` for day 2 (it reads the snapshots of
  days 1-3). All runner modes should give the same number of examples (a difference is reported);
- the floor, in this process: read the same validated Parquet input (``watch_events`` and ``search_events``, every
  day, ``pyarrow.parquet.read_table``) and write as many gzip TFRecord bytes as the examples took on disk (the same
  number of records, random bytes, so gzip cannot shrink them); best of ``--floor-repeats``, CPU seconds of this
  process (pyarrow's reader threads included) and wall seconds.

The long-history size (``--long-history-users``: 4,000 by default, 0 with ``--small``, 0 to skip; 1 process only):
the sample generator's ``history_watches=--history-watches`` gives every user 0.9-1.0 x N watches on day 1, so from day 1 on every snapshot
holds about N watches per user (N = 1,200: the history cap). Timed: ``update_histories`` day 1 from raw events,
the fold of day 2 into the day-1 snapshot (the daily case: a small day into a full snapshot), the fold of day 3
(which build_examples needs), and ``build_examples`` for day 2. Its yardsticks: the I/O floor as above, and a bare
pyarrow read + rewrite of the day-1 snapshot (``pq.read_table`` of each part + ``pq.write_table`` of it, same
compression, to a temporary directory; best of ``--floor-repeats``, CPU seconds) for the fold of day 2.

``--baseline-tree=DIR`` (a checkout of older code, e.g. ``git worktree add /tmp/baseline_tree 8ce9ba5``): every
timed job runs twice, once with ``DIR`` as working directory and ``PYTHONPATH`` ("baseline") and once with this
checkout ("current"), on the same prepared data (the setup runs once, with this checkout's code; each code then gets
its own output root holding hard links of the prepared inputs, and its own chain of snapshots). Runs alternate
baseline, current, baseline, current ... (``--repeats`` rounds; per job the run with the least CPU is reported, and
the largest peak RSS), so load on the machine hits both.

Definitions. "input events" are validated watch + search rows: over all days for the all-days update_histories and
for build_examples (what the snapshots it reads were folded from); for a fold, the day's rows plus the watches and
searches held in the snapshot it folds into. "tree CPU s": user + system seconds of the job's whole process tree,
interpreter start-up and imports included; "run CPU s": tree CPU minus the CPU the job's main process had used when
it entered ``pipelines.cli.run_main`` (start-up and imports): the job's own work, the figure the ratios use (the
floor, too, is measured without imports). "marginal": between the two largest (short-history) sizes, (CPU_L - CPU_M)
/ (events_L - events_M), so fixed costs cancel. Floor ratios divide by the floor's CPU per input event at the same
size. GC share: GC CPU seconds / CPU seconds of the job's main process (1 process: all of the job).

    python -m bench.examples_pipeline [--users=500,2000,8000] [--modes=1p,2p] [--long-history-users=4000]
        [--history-watches=1200] [--baseline-tree=DIR] [--repeats=1] [--profile] [--small]

The issue-12 figures (1 process, before/after in one run; about an hour on 2 idle cores, most of it the baseline
at the long-history size, whose jobs may take ~10 GB of memory: ``--no-baseline-long`` leaves them out). The short
sizes 1,000 and 4,000 users: the marginal between them spans ~110k input events, and 4,000 short-history users are
the long-history size's RSS reference:

    git worktree add /tmp/baseline_tree 8ce9ba5
    python -m bench.examples_pipeline --users=1000,4000 --modes=1p --long-history-users=4000 \\
        --baseline-tree=/tmp/baseline_tree --profile
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

from bench._gc_probe import parse_result  # noqa: E402
from bench.common import FNAPI, RUNNERS, JobFailed, machine_line, print_table, result_line, run_job  # noqa: E402

EVENT_TABLES = ("watch_events", "search_events")
SMALL_USERS = "150,600"
PROBE = str(REPO / "bench" / "_gc_probe.py")
MODES = {"1p": RUNNERS["1 process"], "2p": RUNNERS["2 processes"]}
MODE_LABELS = {"1p": "1 process", "2p": "2 processes"}
# The issue's targets (issue 12), printed next to the figures.
TARGETS = {"build_marginal_floor_x": 30.0, "build_job_floor_x": 60.0, "hist_marginal_events_per_cpu_s": 100_000.0,
           "fold_over_bare_rewrite": 1.5, "peak_rss_mib": 2048.0, "rss_long_over_short": 1.3}


class Code:
    """One checkout whose jobs are timed: ``current`` (this one) or ``baseline`` (``--baseline-tree``)."""

    def __init__(self, name: str, tree: Path):
        self.name, self.tree = name, tree


def prepare(root: str, users: int, days: int, sid_kind: str, history_watches: int = 0) -> dict:
    """Sample data, validated, with a SID model, SIDs and a query tokenizer (in this process: setup, not timed)."""
    from data_sources.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset
    from pipelines import assign_sids, train_query_tokenizer, train_sid_model, validate_inputs

    timings = {}
    started = time.perf_counter()
    config = SampleDataConfig(users=users, days=days, seed=0, **({"history_watches": history_watches}
                                                                 if history_watches else {}))
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


def snapshot_parts(out: str, day: str):
    return sorted(glob.glob(f"{out}/histories/date={day}/*.parquet"))


def snapshot_events(out: str, day: str) -> dict:
    """Users, and watches and searches held, in a history snapshot."""
    import pyarrow.compute as pc

    users = watches = searches = 0
    for path in snapshot_parts(out, day):
        table = pq.read_table(path, columns=["watches", "searches"])
        users += table.num_rows
        watches += int(pc.sum(pc.list_value_length(table["watches"])).as_py() or 0)
        searches += int(pc.sum(pc.list_value_length(table["searches"])).as_py() or 0)
    return {"users": users, "watches": watches, "searches": searches, "events": watches + searches}


def floor_seconds(paths, out_dir: str, records: int, total_bytes: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds (wall, and CPU of this process) to read ``paths`` with pyarrow, and to write
    ``records`` gzip TFRecords of random bytes totalling ``total_bytes``."""
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    records = max(records, 1)
    size = max(total_bytes // records, 1)
    payload = rng.integers(0, 256, size * records + 1024, dtype=np.uint8).tobytes()
    reads, writes, read_cpus, write_cpus = [], [], [], []
    for repeat in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        rows = sum(pq.read_table(path).num_rows for path in paths)
        reads.append(time.perf_counter() - started)
        read_cpus.append(time.process_time() - cpu)
        started, cpu = time.perf_counter(), time.process_time()
        path = f"{out_dir}/floor-{repeat}.tfrecord.gz"
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for index in range(records):
                offset = (index * 7919) % 1024  # records differ from each other
                writer.write(payload[index * size + offset:(index + 1) * size + offset])
        writes.append(time.perf_counter() - started)
        write_cpus.append(time.process_time() - cpu)
        written = os.path.getsize(path)
        os.remove(path)
    return {"read_s": min(reads), "write_s": min(writes), "floor_s": min(reads) + min(writes),
            "read_cpu_s": min(read_cpus), "write_cpu_s": min(write_cpus),
            "floor_cpu_s": min(read_cpus) + min(write_cpus), "rows_read": rows, "bytes_written": written}


def bare_rewrite_seconds(parts, out_dir: str, repeats: int) -> dict:
    """Best-of-``repeats`` CPU (and wall) seconds of ``pq.read_table`` + ``pq.write_table`` (same compression and
    dictionary encoding) of each of ``parts``: what a fold that only read and rewrote the snapshot would cost."""
    os.makedirs(out_dir, exist_ok=True)
    cpus, walls, rows = [], [], 0
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        rows = 0
        for index, path in enumerate(parts):
            metadata = pq.ParquetFile(path).metadata
            first = (metadata.row_group(0).column(0)
                     if metadata.num_row_groups and metadata.num_columns else None)
            compression = first.compression.lower() if first is not None else "snappy"
            # The snapshot's own encoding: a plain-encoded snapshot is rewritten plain (cheaper than dictionaries).
            dictionary = first.has_dictionary_page if first is not None else True
            table = pq.read_table(path)
            rows += table.num_rows
            pq.write_table(table, f"{out_dir}/part-{index:05d}.parquet",
                           compression=None if compression == "uncompressed" else compression,
                           use_dictionary=dictionary)
            del table
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - started)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)
    return {"cpu_s": min(cpus), "wall_s": min(walls), "rows": rows, "parts": len(parts),
            "bytes": sum(os.path.getsize(p) for p in parts)}


# ----------------------------------------------------------------------------------------------- running the jobs


JOB_TIMEOUT_S = None  # --job-timeout-s


def run_timed(code: Code, module: str, args, profile_path: str | None = None) -> dict:
    """One measured run of ``module`` of ``code`` under the GC probe; ``{"error": ...}`` if it fails."""
    probe_args = ([f"--profile={profile_path}"] if profile_path else []) + [module, *args]
    try:
        measured = run_job(PROBE, *probe_args, tree=str(code.tree), timeout_s=JOB_TIMEOUT_S)
    except JobFailed as failed:
        message = str(failed)
        print(f"    {code.name}: FAILED\n" + "\n".join("      " + line for line in message.splitlines()[-25:]),
              flush=True)
        return {"error": message[-4000:]}
    probe = parse_result(measured.pop("log")) or {}
    measured["gc"] = {k: probe[k] for k in ("gc_cpu_s", "gc_wall_s", "gc_share", "collections",
                                            "gc_cpu_s_by_generation", "process_cpu_s", "main_cpu_s",
                                            "longest_collection_s")
                      if k in probe}
    measured["import_cpu_s"] = probe.get("import_cpu_s", 0.0)
    measured["run_cpu_s"] = measured["cpu_s"] - measured["import_cpu_s"]
    return measured


def measure(codes, roots, module: str, args_for, repeats: int, label: str) -> dict:
    """``module`` with ``args_for(root)`` for every code, alternating codes for ``repeats`` rounds (ABAB...); per
    code the run with the least run CPU, the largest peak RSS, and every run's CPU."""
    runs = {code.name: [] for code in codes}
    for round_ in range(repeats):
        for code in codes:
            print(f"  {label} [{code.name}{f', round {round_ + 1}' if repeats > 1 else ''}] ...", flush=True)
            runs[code.name].append(run_timed(code, module, args_for(roots[code.name])))
    merged = {}
    for name, measured in runs.items():
        ok = [m for m in measured if "error" not in m]
        if not ok:
            merged[name] = measured[-1]
            continue
        best = dict(min(ok, key=lambda m: m["run_cpu_s"]))
        best["peak_tree_rss_mib"] = max(m["peak_tree_rss_mib"] for m in ok)
        best["max_process_rss_mib"] = max(m["max_process_rss_mib"] for m in ok)
        best["run_cpu_s_all"] = [m["run_cpu_s"] for m in ok]
        merged[name] = best
        print(f"    {name}: run CPU {best['run_cpu_s']:.1f} s (tree {best['cpu_s']:.1f} s), "
              f"peak RSS {best['peak_tree_rss_mib']:,.0f} MiB, GC {best['gc'].get('gc_share', float('nan')):.1%}",
              flush=True)
    return merged


def code_roots(out: str, codes) -> dict:
    """Each code's output root: ``out`` itself for a single code, else a copy of it (hard links) per code."""
    if len(codes) == 1:
        return {codes[0].name: out}
    roots = {}
    for code in codes:
        root = f"{os.path.dirname(out)}/out_{code.name}"
        shutil.copytree(out, root, copy_function=_link_or_copy)
        roots[code.name] = root
    return roots


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def ensure_feature_transform(codes, roots, day: str, timings: dict, max_parts: int = 0) -> None:
    """Fit the feature transform (this checkout's code, in this process: setup) on the day-1 snapshot of the first
    code that has one (current preferred), and give every code's root the same artifact. ``max_parts`` > 0: fit on
    that many of the snapshot's part files only (the fit is per-watch Python: at the long-history size the whole
    snapshot would take minutes of setup, and a quarter of the users is plenty for its quantiles)."""
    from pipelines import fit_feature_transform

    if all(os.path.exists(f"{root}/feature_transform") for root in roots.values()):
        return
    order = sorted(codes, key=lambda c: c.name != "current")
    source = next((roots[c.name] for c in order if os.path.exists(f"{roots[c.name]}/histories/date={day}/_SUCCESS")),
                  None)
    if source is None:
        print("  (no day-1 snapshot: no feature transform, build_examples will fail)", flush=True)
        return
    started = time.perf_counter()
    fitted = source
    parts = snapshot_parts(source, day)
    if max_parts and len(parts) > max_parts:
        fitted = f"{os.path.dirname(source)}/feature_transform_fit"
        snapshot = f"{fitted}/histories/date={day}"
        os.makedirs(snapshot, exist_ok=True)
        for path in parts[:max_parts] + [f"{source}/histories/date={day}/_SUCCESS"]:
            _link_or_copy(path, f"{snapshot}/{os.path.basename(path)}")
    fit_feature_transform.run([f"--date={day}", f"--output_root={fitted}", *FNAPI])
    timings["feature_transform"] = time.perf_counter() - started
    for root in roots.values():
        if root != fitted and not os.path.exists(f"{root}/feature_transform"):
            shutil.copytree(f"{fitted}/feature_transform", f"{root}/feature_transform", copy_function=_link_or_copy)


def examples_built(root: str, day: str):
    try:
        with open(f"{root}/examples/date={day}/stats.json") as handle:
            return json.load(handle)["examples"]["examples"]
    except (OSError, KeyError, ValueError):
        return None


def example_bytes(root: str, day: str) -> int:
    return sum(os.path.getsize(path) for path in glob.glob(f"{root}/examples/date={day}/part-*"))


def first_ok_root(codes, roots, predicate):
    for code in sorted(codes, key=lambda c: c.name != "current"):
        if predicate(roots[code.name]):
            return roots[code.name]
    return None


def run_profiles(codes, roots, jobs, profile_codes, workdir: str) -> dict:
    """Each of ``jobs`` ((name, module, args_for)) of each code in ``profile_codes`` once under cProfile (1 process),
    split by category."""
    result = {}
    for code in codes:
        if code.name not in profile_codes:
            continue
        for name, module, args_for in jobs:
            path = f"{workdir}/profile-{code.name}-{name}.pstats"
            print(f"  profile {name} [{code.name}] ...", flush=True)
            measured = run_timed(code, module, args_for(roots[code.name]), profile_path=path)
            if "error" in measured or not os.path.exists(path):
                result[f"{name}/{code.name}"] = {"error": measured.get("error", "no profile written")}
                continue
            split = profile_split(path, code.tree)
            split["main_cpu_s"] = measured["gc"].get("main_cpu_s", 0.0)
            result[f"{name}/{code.name}"] = split
    return result


# ------------------------------------------------------------------------------------------------------- sizes


def bench_size(users: int, days: int, sid_kind: str, floor_repeats: int, workdir: str, codes, modes, repeats: int,
               profile_codes=()) -> dict:
    root = tempfile.mkdtemp(prefix=f"bench_examples_{users}_", dir=workdir)
    print(f"\n[{users} users] setup in {root} ...", flush=True)
    prepared = prepare(root, users, days, sid_kind)
    dates, out = prepared["dates"], prepared["out"]
    build_day = dates[1]
    roots = code_roots(out, codes)
    row = {"users": users, "days": days, "build_day": build_day, "setup_s": prepared["timings"],
           "events": count_rows(event_files(out, dates)),
           "watch_events": count_rows(event_files(out, dates, ("watch_events",))),
           "build_day_events": count_rows(event_files(out, [build_day])), "by_code": {c.name: {} for c in codes}}
    print(f"[{users} users] {row['events']:,} input events ({row['watch_events']:,} watches); setup "
          + ", ".join(f"{k} {v:.0f} s" for k, v in prepared["timings"].items()), flush=True)

    def hist_args(runner):
        return lambda r: [f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--output_root={r}",
                          "--backfill_days=1", *runner]

    def build_args(runner):
        return lambda r: [f"--date={build_day}", f"--output_root={r}", *runner]

    examples = {c.name: {} for c in codes}
    for key in modes:
        runner = MODES[key]
        label = f"[{users} users] update_histories, all days, {MODE_LABELS[key]}"
        for name, m in measure(codes, roots, "pipelines.update_histories", hist_args(runner), repeats,
                               label).items():
            row["by_code"][name][f"histories_{key}"] = m
        ensure_feature_transform(codes, roots, dates[0], row["setup_s"])
        label = f"[{users} users] build_examples {build_day}, {MODE_LABELS[key]}"
        for name, m in measure(codes, roots, "pipelines.build_examples", build_args(runner), repeats,
                               label).items():
            row["by_code"][name][f"examples_{key}"] = m
            examples[name][key] = examples_built(roots[name], build_day) if "error" not in m else None
    for name, by_mode in examples.items():
        if len(set(by_mode.values())) != 1:
            print(f"[{users} users] WARNING: {name}: runner modes built different numbers of examples: {by_mode}",
                  flush=True)
        row["by_code"][name]["examples"] = next(iter(by_mode.values()), None)
    if len({row["by_code"][c.name]["examples"] for c in codes}) > 1:
        print(f"[{users} users] NOTE: codes built different numbers of examples: "
              f"{ {c.name: row['by_code'][c.name]['examples'] for c in codes} }", flush=True)
    # The headline keys (bench.run_all) are the current code's.
    current = row["by_code"]["current"]
    for key in modes:
        row[f"histories_{key}"], row[f"examples_{key}"] = current[f"histories_{key}"], current[f"examples_{key}"]
    source = first_ok_root(codes, roots, lambda r: examples_built(r, build_day) is not None)
    row["examples"] = examples_built(source, build_day) if source else None
    row["example_bytes"] = example_bytes(source, build_day) if source else 0
    try:
        with open(f"{roots['current']}/histories/_runs/date={dates[-1]}/summary.json") as handle:
            row["histories_summary_totals"] = json.load(handle)["totals"]
    except (OSError, KeyError, ValueError):
        pass
    print(f"[{users} users] floor ...", flush=True)
    row["floor"] = floor_seconds(event_files(out, dates), f"{root}/floor", row["examples"] or 1,
                                 row["example_bytes"], floor_repeats)
    if profile_codes:
        row["profile"] = run_profiles(codes, roots, [
            ("update_histories", "pipelines.update_histories", hist_args(FNAPI)),
            ("build_examples", "pipelines.build_examples", build_args(FNAPI))], profile_codes, root)
    shutil.rmtree(root, ignore_errors=True)
    return row


def bench_long(users: int, history_watches: int, days: int, sid_kind: str, floor_repeats: int, workdir: str, codes,
               repeats: int, profile_codes=()) -> dict:
    root = tempfile.mkdtemp(prefix=f"bench_examples_long_{users}_", dir=workdir)
    print(f"\n[{users} users x {history_watches} watches] setup in {root} ...", flush=True)
    prepared = prepare(root, users, days, sid_kind, history_watches=history_watches)
    dates, out = prepared["dates"], prepared["out"]
    build_day = dates[1]
    roots = code_roots(out, codes)
    row = {"users": users, "history_watches": history_watches, "days": days, "build_day": build_day,
           "setup_s": prepared["timings"], "events": count_rows(event_files(out, dates)),
           "day_events": {day: count_rows(event_files(out, [day])) for day in dates[:3]},
           "by_code": {c.name: {} for c in codes}}
    print(f"[long] {row['events']:,} input events; per day {row['day_events']}; setup "
          + ", ".join(f"{k} {v:.0f} s" for k, v in prepared["timings"].items()), flush=True)

    def hist_args(day, backfill=True):
        return lambda r: [f"--start_date={day}", f"--end_date={day}", f"--output_root={r}",
                          *(["--backfill_days=1"] if backfill else []), *FNAPI]

    def build_args(r):
        return [f"--date={build_day}", f"--output_root={r}", *FNAPI]

    steps = [("hist_day1_raw", "update_histories, day 1 from raw", dates[0]),
             ("hist_fold_day2", "update_histories, fold day 2 into day 1", dates[1]),
             ("hist_fold_day3", "update_histories, fold day 3 into day 2", dates[2])]
    for key, label, day in steps:
        for name, m in measure(codes, roots, "pipelines.update_histories", hist_args(day), repeats,
                               f"[long] {label}").items():
            row["by_code"][name][key] = m
        if key == "hist_day1_raw":
            ensure_feature_transform(codes, roots, dates[0], row["setup_s"], max_parts=1)
            snap_root = first_ok_root(codes, roots, lambda r: os.path.exists(f"{r}/histories/date={dates[0]}/_SUCCESS"))
            if snap_root:
                row["snapshot_day1"] = snapshot_events(snap_root, dates[0])
                print(f"[long] bare pyarrow read + rewrite of the day-1 snapshot ({row['snapshot_day1']}) ...",
                      flush=True)
                row["bare_rewrite"] = bare_rewrite_seconds(snapshot_parts(snap_root, dates[0]), f"{root}/rewrite",
                                                           floor_repeats)
        if key == "hist_fold_day2":
            snap_root = first_ok_root(codes, roots, lambda r: os.path.exists(f"{r}/histories/date={dates[1]}/_SUCCESS"))
            if snap_root:
                row["snapshot_day2"] = snapshot_events(snap_root, dates[1])
    row["fold_events"] = {"hist_day1_raw": row["day_events"][dates[0]],
                          "hist_fold_day2": row["day_events"][dates[1]] + row.get("snapshot_day1", {}).get("events", 0),
                          "hist_fold_day3": row["day_events"][dates[2]] + row.get("snapshot_day2", {}).get("events", 0)}
    for name, m in measure(codes, roots, "pipelines.build_examples", build_args, repeats,
                           f"[long] build_examples {build_day}").items():
        row["by_code"][name]["examples_1p"] = m
        row["by_code"][name]["examples"] = examples_built(roots[name], build_day) if "error" not in m else None
    source = first_ok_root(codes, roots, lambda r: examples_built(r, build_day) is not None)
    row["examples"] = examples_built(source, build_day) if source else None
    row["example_bytes"] = example_bytes(source, build_day) if source else 0
    print("[long] floor ...", flush=True)
    row["floor"] = floor_seconds(event_files(out, dates), f"{root}/floor", row["examples"] or 1,
                                 row["example_bytes"], floor_repeats)
    if profile_codes:
        row["profile"] = run_profiles(codes, roots, [
            ("update_histories fold day 2", "pipelines.update_histories", hist_args(dates[1])),
            ("build_examples", "pipelines.build_examples", build_args)], profile_codes, root)
    shutil.rmtree(root, ignore_errors=True)
    return row


# ------------------------------------------------------------------------------------------------------- analysis


PROFILE_CATEGORIES = ("tensorflow / tft", "pyarrow", "beam (coders, runner)", "project (transforms/, pipelines/)",
                      "numpy", "python stdlib", "builtins (C functions: pickle, list/dict methods ...)",
                      "other packages", "waiting (lock acquire, sleep, select)")
_WAITS = ("<method 'acquire' of '_thread.lock' objects>", "<method 'acquire' of '_thread.RLock' objects>",
          "<built-in method time.sleep>", "<built-in method select.select>", "<built-in method select.poll>",
          "<method 'poll' of 'select.poll' objects>", "<method 'poll' of 'select.epoll' objects>")
_STDLIB = os.path.dirname(os.__file__)


def profile_category(filename: str, function: str, tree: Path) -> str:
    """The category of a profiled function's self time: by its file (for C functions, ``~``: by its name)."""
    text = f"{filename} {function}".replace("\\", "/")
    if filename == "~" and function in _WAITS:
        return PROFILE_CATEGORIES[8]
    if filename.startswith(str(tree)) and any(f"/{p}/" in filename for p in
                                              ("transforms", "pipelines", "data_sources", "tokenminds_model")):
        return PROFILE_CATEGORIES[3]
    for needle, category in (("tensorflow", 0), ("tfx_bsl", 0), ("pyarrow", 1), ("apache_beam", 2), ("numpy", 4)):
        if needle in text:
            return PROFILE_CATEGORIES[category]
    if filename == "~" or filename.startswith("<"):
        return PROFILE_CATEGORIES[6]
    if filename.startswith(_STDLIB) and "site-packages" not in filename:
        return PROFILE_CATEGORIES[5]
    return PROFILE_CATEGORIES[7]


def profile_split(path: str, tree: Path, top: int = 12) -> dict:
    """Self time of the profiled functions, summed per category (by the function's file path), and the top
    functions."""
    import pstats

    stats = pstats.Stats(path).stats
    by_category = {c: 0.0 for c in PROFILE_CATEGORIES}
    functions = []
    for (filename, line, function), (_, _, self_s, cumulative_s, _) in stats.items():
        by_category[profile_category(filename, function, tree)] += self_s
        short = filename.replace(str(tree) + "/", "")
        short = short.split("site-packages/")[-1]
        functions.append((self_s, cumulative_s, f"{short}:{line}({function})" if filename != "~" else function))
    functions.sort(reverse=True)
    return {"self_s_by_category": by_category, "profiled_self_s": sum(by_category.values()),
            "top_self": [{"self_s": s, "cumulative_s": c, "function": f} for s, c, f in functions[:top]]}


def marginal(rows, job_key: str, code: str):
    """(extra run CPU s per extra input event, in µs), between the two largest sizes; None if unavailable."""
    if len(rows) < 2:
        return None
    a, b = rows[-2], rows[-1]
    ma, mb = a["by_code"][code].get(job_key, {}), b["by_code"][code].get(job_key, {})
    if "run_cpu_s" not in ma or "run_cpu_s" not in mb or b["events"] == a["events"]:
        return None
    return (mb["run_cpu_s"] - ma["run_cpu_s"]) / (b["events"] - a["events"]) * 1e6


def fmt(value, spec=",.0f", missing="-"):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return missing
    return format(value, spec)


def floor_us_per_event(row):
    return row["floor"]["floor_cpu_s"] / max(row["events"], 1) * 1e6


def comparison_rows(rows, long_row, codes):
    """(job, size, code, events, measurement, yardstick name, yardstick CPU s) for every timed job."""
    out = []
    for row in rows:
        size = f"{row['users']:,} users"
        for key in ("1p", "2p"):
            for code in codes:
                m = row["by_code"][code.name]
                if f"histories_{key}" in m:
                    out.append(("update_histories all days", f"{size}, {key}", code.name, row["events"],
                                m[f"histories_{key}"], None, None))
            for code in codes:
                m = row["by_code"][code.name]
                if f"examples_{key}" in m:
                    out.append(("build_examples day 2", f"{size}, {key}", code.name, row["events"],
                                m[f"examples_{key}"], "floor", row["floor"]["floor_cpu_s"]))
    if long_row:
        size = f"{long_row['users']:,} users x {long_row['history_watches']:,}, 1p"
        names = {"hist_day1_raw": "update_histories day 1 from raw", "hist_fold_day2": "update_histories fold day 2",
                 "hist_fold_day3": "update_histories fold day 3"}
        for key, name in names.items():
            for code in codes:
                m = long_row["by_code"].get(code.name, {}).get(key)
                if m is None:
                    continue
                bare = long_row.get("bare_rewrite", {}).get("cpu_s") if key == "hist_fold_day2" else None
                out.append((name, size, code.name, long_row["fold_events"][key], m, "bare rewrite" if bare else None,
                            bare))
        for code in codes:
            m = long_row["by_code"].get(code.name, {}).get("examples_1p")
            if m is not None:
                out.append(("build_examples day 2", size, code.name, long_row["events"], m, "floor",
                            long_row["floor"]["floor_cpu_s"]))
    return out


def print_comparison(rows, long_row, codes):
    table = []
    by_key = {}
    for job, size, code, events, m, yard_name, yard_cpu in comparison_rows(rows, long_row, codes):
        by_key[(job, size, code)] = m
        if "error" in m:
            table.append([job, size, code, f"{events:,}", "FAILED", "", "", "", "", "", "", ""])
            continue
        ratio_to_baseline = ""
        base = by_key.get((job, size, "baseline"))
        if code == "current" and base and "error" not in base:
            ratio_to_baseline = (f"{base['run_cpu_s'] / m['run_cpu_s']:.1f}x / "
                                 f"{m['peak_tree_rss_mib'] / base['peak_tree_rss_mib']:.2f}")
        gc_share = m["gc"].get("gc_share") if size.endswith("1p") else None
        table.append([job, size, code, f"{events:,}", f"{m['run_cpu_s']:.1f}", f"{m['cpu_s']:.1f}",
                      fmt(events / m["run_cpu_s"] if m["run_cpu_s"] > 0 else None),
                      f"{m['peak_tree_rss_mib']:,.0f}", fmt(gc_share, ".1%"),
                      fmt(m["run_cpu_s"] / yard_cpu if yard_cpu else None, ",.1f") + (
                          f" ({yard_name})" if yard_cpu else ""), ratio_to_baseline, f"{m['run_s']:.1f}"])
    print_table(["job", "size", "code", "input events", "run CPU s", "tree CPU s", "events/CPU-s", "peak RSS MiB",
                 "GC share", "x yardstick", "speed-up / RSS ratio", "run wall s"], table)
    print("run CPU s: the job's process tree, less start-up and imports; tree CPU s: all of it. events/CPU-s: input "
          "events / run CPU s. x yardstick: run CPU s / the yardstick's CPU s (build: the I/O floor at that size; "
          "fold day 2: a bare pyarrow read + rewrite of the day-1 snapshot). speed-up: baseline run CPU / current; "
          "RSS ratio: current peak RSS / baseline's. GC share: 1 process only.")


def issue_figures(rows, long_row, codes) -> dict:
    figures = {}
    for code in codes:
        f = {}
        if len(rows) >= 2:
            build_us = marginal(rows, "examples_1p", code.name)
            floor_us = floor_us_per_event(rows[-1])
            f["build_marginal_us_per_event"] = build_us
            f["floor_us_per_event"] = floor_us
            f["build_marginal_floor_x"] = build_us / floor_us if build_us is not None else None
            hist_us = marginal(rows, "histories_1p", code.name)
            f["hist_marginal_events_per_cpu_s"] = 1e6 / hist_us if hist_us and hist_us > 0 else None
        largest = rows[-1] if rows else None
        if largest:
            m = largest["by_code"][code.name].get("examples_1p", {})
            if "run_cpu_s" in m:
                f["build_job_floor_x_short"] = m["run_cpu_s"] / largest["floor"]["floor_cpu_s"]
        if long_row:
            by = long_row["by_code"].get(code.name, {})
            m = by.get("examples_1p", {})
            if "run_cpu_s" in m:
                f["build_job_floor_x_long"] = m["run_cpu_s"] / long_row["floor"]["floor_cpu_s"]
                f["build_peak_rss_mib_long"] = m["peak_tree_rss_mib"]
            fold = by.get("hist_fold_day2", {})
            if "run_cpu_s" in fold and long_row.get("bare_rewrite"):
                f["fold_over_bare_rewrite"] = fold["run_cpu_s"] / long_row["bare_rewrite"]["cpu_s"]
                f["hist_peak_rss_mib_long"] = fold["peak_tree_rss_mib"]
            raw = by.get("hist_day1_raw", {})
            if "peak_tree_rss_mib" in raw:
                f["hist_raw_peak_rss_mib_long"] = raw["peak_tree_rss_mib"]
            reference = rss_reference(rows, long_row)
            if reference:
                short = reference["by_code"][code.name]
                for job, long_key, short_key in (("hist", "hist_fold_day2", "histories_1p"),
                                                 ("hist_raw", "hist_day1_raw", "histories_1p"),
                                                 ("build", "examples_1p", "examples_1p")):
                    lm, sm = by.get(long_key, {}), short.get(short_key, {})
                    if "peak_tree_rss_mib" in lm and "peak_tree_rss_mib" in sm:
                        f[f"{job}_rss_long_over_short"] = lm["peak_tree_rss_mib"] / sm["peak_tree_rss_mib"]
        figures[code.name] = f
    return figures


def rss_reference(rows, long_row):
    """The short-history size the long-history RSS is compared with: the one with as many users, else the largest."""
    if not rows:
        return None
    return next((r for r in rows if long_row and r["users"] == long_row["users"]), rows[-1])


def print_issue_figures(figures, rows, long_row, codes):
    names = [c.name for c in codes]
    short = f"{rows[-2]['users']:,} -> {rows[-1]['users']:,} users" if len(rows) >= 2 else "-"
    largest = f"{rows[-1]['users']:,} users" if rows else "-"
    reference = rss_reference(rows, long_row)
    reference = f"{reference['users']:,} users" if reference else "-"
    long_size = f"{long_row['users']:,} x {long_row['history_watches']:,}" if long_row else "-"
    spec = [
        ("build_examples marginal CPU µs / input event", short, "build_marginal_us_per_event", ",.1f", None, None),
        ("  floor CPU µs / input event (largest short size)", largest, "floor_us_per_event", ",.2f", None, None),
        ("  marginal / floor", short, "build_marginal_floor_x", ",.0f", "<=", "build_marginal_floor_x"),
        ("build_examples run CPU / floor", largest, "build_job_floor_x_short", ",.0f", "<=", "build_job_floor_x"),
        ("build_examples run CPU / floor", long_size, "build_job_floor_x_long", ",.0f", "<=", "build_job_floor_x"),
        ("update_histories marginal events / CPU-s", short, "hist_marginal_events_per_cpu_s", ",.0f", ">=",
         "hist_marginal_events_per_cpu_s"),
        ("update_histories fold day 2 / bare read+rewrite", long_size, "fold_over_bare_rewrite", ",.2f", "<=",
         "fold_over_bare_rewrite"),
        ("peak RSS MiB, update_histories fold day 2", long_size, "hist_peak_rss_mib_long", ",.0f", "<=",
         "peak_rss_mib"),
        ("peak RSS MiB, update_histories day 1 from raw", long_size, "hist_raw_peak_rss_mib_long", ",.0f", "<=",
         "peak_rss_mib"),
        ("peak RSS MiB, build_examples", long_size, "build_peak_rss_mib_long", ",.0f", "<=", "peak_rss_mib"),
        ("RSS long / short, update_histories (fold day 2)", f"{long_size} / {reference}", "hist_rss_long_over_short",
         ",.2f", "<=", "rss_long_over_short"),
        ("RSS long / short, update_histories (day 1 raw)", f"{long_size} / {reference}",
         "hist_raw_rss_long_over_short", ",.2f", None, None),
        ("RSS long / short, build_examples", f"{long_size} / {reference}", "build_rss_long_over_short", ",.2f", "<=",
         "rss_long_over_short"),
    ]
    table = []
    for label, size, key, number, sense, target_key in spec:
        if not long_row and long_size in size:
            continue
        cells = [fmt(figures[n].get(key), number) for n in names]
        target = f"{sense} {TARGETS[target_key]:,.{0 if TARGETS[target_key] >= 10 else 1}f}" if sense else ""
        verdict = ""
        value = figures.get("current", {}).get(key)
        if sense and value is not None:
            ok = value <= TARGETS[target_key] if sense == "<=" else value >= TARGETS[target_key]
            verdict = "ok" if ok else "MISSED"
            if "marginal" in key and value <= 0:
                verdict = "n/a (noise: sizes too close)"
        table.append([label, size, *cells, target, verdict])
    print_table(["figure (1 process, run CPU)", "size", *names, "target", "current"], table)


def print_profiles(profiles: dict):
    for name, split in profiles.items():
        if "error" in split:
            print(f"\n-- profile {name}: FAILED --")
            continue
        total = split["profiled_self_s"] or 1.0
        print(f"\n-- profile {name}: {split['profiled_self_s']:.1f} s profiled self time (wall clock, the thread "
              f"that runs the job, under cProfile; the job's main process used {split['main_cpu_s']:.1f} CPU s in "
              "run_main, profiler overhead included) --")
        print_table(["category (by the function's file)", "self s", "share"],
                    [[c, f"{s:.1f}", f"{s / total:.0%}"] for c, s in
                     sorted(split["self_s_by_category"].items(), key=lambda kv: -kv[1])])
        print_table(["top functions by self time", "self s", "cumulative s"],
                    [[t["function"][:110], f"{t['self_s']:.2f}", f"{t['cumulative_s']:.2f}"]
                     for t in split["top_self"][:8]])


def linear_fit(events, seconds):
    """Least squares seconds = fixed + per_event * events; (fixed s, microseconds per event)."""
    if len(events) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.asarray(events, float), np.asarray(seconds, float), 1)
    return float(intercept), float(slope * 1e6)


def print_current_tables(rows, modes) -> dict:
    """The current code's per-mode table, the floor, and the scaling over sizes (as before the comparison)."""
    def ok(m):
        return m and "error" not in m

    for key in modes:
        print(f"\n== current code, {MODE_LABELS[key]} ({' '.join(MODES[key])}) ==")
        table = []
        for r in rows:
            h, e = r.get(f"histories_{key}"), r.get(f"examples_{key}")
            examples = r["examples"] or 0
            table.append([f"{r['users']:,}", f"{r['events']:,}",
                          *([f"{h['run_s']:.1f}", f"{h['run_cpu_s']:.1f}", fmt(r['events'] / h['run_cpu_s']),
                             f"{h['peak_tree_rss_mib']:,.0f}"] if ok(h) else ["FAILED", "", "", ""]),
                          f"{examples:,}",
                          *([f"{e['run_s']:.1f}", f"{e['run_cpu_s']:.1f}", fmt(r['events'] / e['run_cpu_s']),
                             f"{e['peak_tree_rss_mib']:,.0f}"] if ok(e) else ["FAILED", "", "", ""]),
                          f"{h['import_s']:.0f}/{e['import_s']:.0f}" if ok(h) and ok(e) else ""])
        print_table(["users", "input events", "hist s", "hist run CPU s", "hist events/CPU-s", "hist RSS MiB",
                     "examples", "build s", "build run CPU s", "build events/CPU-s", "build RSS MiB",
                     "imports s h/b"], table)

    print("\n== floor: read the validated watch/search Parquet (pyarrow) + write the examples' bytes as gzip "
          "TFRecords ==")
    table = []
    for r in rows:
        f = r["floor"]
        e = r.get("examples_1p")
        table.append([f"{r['users']:,}", f"{f['rows_read']:,}", f"{r['examples'] or 0:,}",
                      f"{r['example_bytes'] / 2**20:,.2f}", f"{f['read_s']:.3f}", f"{f['write_s']:.3f}",
                      f"{f['floor_s']:.3f}", f"{f['floor_cpu_s']:.3f}",
                      fmt(e["run_cpu_s"] / f["floor_cpu_s"] if ok(e) else None, ",.0f") + "x"])
    print_table(["users", "rows read", "records", "MiB written", "read s", "write s", "floor s", "floor CPU s",
                 "build 1p run CPU / floor CPU"], table)

    scaling = {}
    if len(rows) < 2:
        return scaling
    print(f"\n== scaling of the current code, {rows[0]['users']:,} -> {rows[-1]['users']:,} users ==")
    table = []
    for pipeline in ("histories", "examples"):
        for key in modes:
            name = f"{pipeline}_{key}"
            if not all(ok(r.get(name)) for r in rows):
                continue
            small, large = rows[0], rows[-1]
            run_ratio = (large[name]["run_s"] / large["events"]) / (small[name]["run_s"] / small["events"])
            cpu_ratio = (large[name]["cpu_s"] / large["events"]) / (small[name]["cpu_s"] / small["events"])
            fixed, per_event = linear_fit([r["events"] for r in rows], [r[name]["run_s"] for r in rows])
            fixed_cpu, per_event_cpu = linear_fit([r["events"] for r in rows], [r[name]["cpu_s"] for r in rows])
            scaling[name] = {"cost_per_event_ratio": run_ratio, "cpu_per_event_ratio": cpu_ratio,
                             "fit_fixed_s": fixed, "fit_us_per_event": per_event, "fit_fixed_cpu_s": fixed_cpu,
                             "fit_cpu_us_per_event": per_event_cpu}
            job = "update_histories" if pipeline == "histories" else "build_examples"
            table.append([f"{job}, {MODE_LABELS[key]}", f"{run_ratio:.2f}", f"{cpu_ratio:.2f}", f"{fixed:.1f}",
                          f"{per_event:.0f}", f"{fixed_cpu:.1f}", f"{per_event_cpu:.0f}"])
    print_table(["pipeline", "cost/event L/S", "CPU/event L/S", "fit fixed s", "fit us/event", "fit fixed CPU s",
                 "fit CPU us/event"], table)
    print("cost/event L/S: (run s per input event at the largest size) / (at the smallest), and the same in tree CPU "
          "s; 1 = linear. fit: least squares over all sizes, run s (and tree CPU s) = fixed + per-event x input "
          "events.")
    return scaling


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="500,2000,8000", help="comma-separated sizes (users), smallest first")
    parser.add_argument("--days", type=int, default=3, help="days of data (>= 3: day 2 needs days 1 and 3)")
    parser.add_argument("--sid-kind", choices=("rq_kmeans", "rqvae"), default="rq_kmeans",
                        help="SID model for the setup (rqvae: 300 steps)")
    parser.add_argument("--modes", default="1p,2p", help="runner modes: 1p (one process), 2p (two worker processes)")
    parser.add_argument("--long-history-users", type=int, default=None,
                        help="users of the long-history size (0: skip it; default 4000, 0 with --small)")
    parser.add_argument("--history-watches", type=int, default=1200,
                        help="prior watches per user (0.9-1.0 x this) at the long-history size")
    parser.add_argument("--baseline-tree", default=None,
                        help="a checkout of older code (e.g. `git worktree add /tmp/baseline_tree 8ce9ba5`) whose "
                             "jobs run side by side with this checkout's, on the same prepared data")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of each timed job (codes alternate within a round); the least CPU is reported")
    parser.add_argument("--profile", action="store_true",
                        help="also run update_histories and build_examples once each under cProfile at the "
                             "long-history size (else the largest size), current code, and print the split")
    parser.add_argument("--profile-baseline", action="store_true", help="with --profile: profile the baseline too")
    parser.add_argument("--no-baseline-long", action="store_true",
                        help="with --baseline-tree: run the baseline at the short-history sizes only (its "
                             "long-history jobs are the slowest part, and the largest in memory)")
    parser.add_argument("--job-timeout-s", type=float, default=None,
                        help="kill a timed job after this many seconds (reported as FAILED)")
    parser.add_argument("--floor-repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="parent directory of the per-size work dirs (default: tmp)")
    parser.add_argument("--small", action="store_true",
                        help=f"sizes {SMALL_USERS}, no long-history size unless given (for bench.run_all)")
    args = parser.parse_args(argv)
    global JOB_TIMEOUT_S
    JOB_TIMEOUT_S = args.job_timeout_s
    sizes = sorted(int(u) for u in (SMALL_USERS if args.small else args.users).split(",") if u.strip())
    long_users = args.long_history_users if args.long_history_users is not None else (0 if args.small else 4000)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.days < 3:
        parser.error("--days must be at least 3")
    if not sizes:
        parser.error("--users needs at least one size")
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must be a comma-separated subset of {sorted(MODES)}")
    if "1p" not in modes:
        modes.insert(0, "1p")  # the issue's figures, the floor ratios and the headline are 1-process figures
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    codes = [Code("current", REPO)]
    if args.baseline_tree:
        tree = Path(args.baseline_tree).resolve()
        if not (tree / "pipelines" / "update_histories.py").exists():
            parser.error(f"--baseline-tree {tree} is not a checkout of this project (no pipelines/update_histories.py)")
        codes.insert(0, Code("baseline", tree))  # baseline first in each round: ABAB
    profile_codes = (["current"] + (["baseline"] if args.profile_baseline else [])) if args.profile else []
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)

    # The setup runs Beam jobs in this process; their stage-level warnings are not news here.
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    started = time.perf_counter()
    print(f"{machine_line()}; sizes {sizes} users x {args.days} days, modes {modes}"
          + (f"; long-history size {long_users} users x {args.history_watches} watches" if long_users else "")
          + f"; codes: {', '.join(f'{c.name} ({c.tree})' for c in codes)}; SID model {args.sid_kind} 3x256",
          flush=True)
    rows = [bench_size(users, args.days, args.sid_kind, args.floor_repeats, args.workdir, codes, modes, args.repeats,
                       profile_codes if (not long_users and users == sizes[-1]) else ())
            for users in sizes]
    long_codes = [c for c in codes if not (args.no_baseline_long and c.name == "baseline")]
    long_row = (bench_long(long_users, args.history_watches, args.days, args.sid_kind, args.floor_repeats,
                           args.workdir, long_codes, args.repeats, profile_codes) if long_users else None)
    total_s = time.perf_counter() - started

    scaling = print_current_tables(rows, modes)
    print(f"\n== every timed job{' (baseline and current, same data, alternating runs)' if len(codes) > 1 else ''} ==")
    print_comparison(rows, long_row, codes)
    if long_row and long_row.get("bare_rewrite"):
        b, s = long_row["bare_rewrite"], long_row.get("snapshot_day1", {})
        print(f"bare rewrite of the day-1 snapshot: {s.get('users', 0):,} users, {s.get('watches', 0):,} watches, "
              f"{s.get('searches', 0):,} searches, {b['parts']} parts, {b['bytes'] / 2**20:,.1f} MiB: "
              f"{b['cpu_s']:.2f} CPU s ({b['wall_s']:.2f} s wall), best of {args.floor_repeats}")
    print("\n== issue 12 figures ==")
    figures = issue_figures(rows, long_row, codes)
    print_issue_figures(figures, rows, long_row, codes)
    print("marginal: between the two largest short-history sizes, extra run CPU s per extra input event; floor: CPU "
          "s of reading the validated input + writing the examples' bytes, per input event (largest short size); RSS "
          "long / short: over the short-history size with as many users (else the largest); "
          "peak RSS: the job's process tree, 1 process.")
    profiles = (long_row or rows[-1]).get("profile", {})
    if profiles:
        print_profiles(profiles)
    processes = {f"{p}_{k}": rows[-1][f"{p}_{k}"].get("process_commands") for p in ("histories", "examples")
                 for k in modes if f"{p}_{k}" in rows[-1]}
    print(f"\nprocesses seen per job at {rows[-1]['users']:,} users: {processes}")
    print(f"total benchmark time {total_s / 60:.1f} min")
    print(result_line("examples_pipeline", {"sizes": sizes, "days": args.days, "modes": modes, "rows": rows,
                                            "long": long_row, "scaling": scaling, "issue12": figures,
                                            "codes": {c.name: str(c.tree) for c in codes}, "total_s": total_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
