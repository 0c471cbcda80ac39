"""Every benchmark in bench/ at a small size, one after another, and one table of their headline figures.

    python -m bench.run_all [--only NAME[,NAME...]] [--timeout-s 1800]

Each benchmark runs as a subprocess (``python -m bench.<name>`` with its small-size flags, below) and ends with a
``RESULT {json}`` line; this collects those lines and prints one headline per benchmark. A benchmark added to bench/
later is run too, without flags, and its headline lists the first figures of its RESULT. A benchmark that prints
``SKIP`` (e.g. a dataset folder that is absent) is reported as skipped. Run a benchmark by itself for its full-size
figures (``python -m bench.<name> --help``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_BENCHMARKS = {"__init__", "common", "run_all"}
SMALL_FLAGS = {
    "sid_assignment": ["--small"],
    "examples_pipeline": ["--small"],
    "rqvae_training": ["--small"],
    "sid_real_data": ["--small"],
    "decoding": ["--users=8", "--history-len=64", "--catalogue=10000", "--repeats=2"],
    "model_training": ["--presets=tiny", "--synthetic"],
    "refresh_users": ["--small"],
    "validate_inputs": ["--users=500,2000", "--range-days=30"],
}
ORDER = ["rqvae_training", "sid_real_data", "sid_assignment", "decoding", "validate_inputs", "examples_pipeline",
         "model_training", "refresh_users"]


def _sid_assignment(r):
    return (f"{r['items']:,} items, {r['kind']} 3x256: bare JAX {r['bare_jax_items_per_s']:,.0f} items/s; "
            f"Beam 1 process {r['beam_single_items_per_s']:,.0f} items/s ({r['bare_over_beam_single']:,.0f}x slower), "
            f"2 processes {r['beam_2proc_items_per_s']:,.0f} items/s"
            + (f"; marginal 1 process {r['beam_single_marginal_items_per_s']:,.0f} items/s"
               if "beam_single_marginal_items_per_s" in r else "")
            + ("; encode_batched recompiles per batch length" if r.get("recompiles_per_batch_length") else ""))


def _examples_pipeline(r):
    rows, scaling = r["rows"], r["scaling"]
    small, large = rows[0], rows[-1]
    parts = [f"{row['users']:,} users: {row['events'] / row['histories_1p']['run_s']:,.0f} hist events/s, "
             f"{row['examples'] / row['examples_1p']['run_s']:,.1f} examples/s, "
             f"build/floor {row['examples_1p']['run_s'] / row['floor']['floor_s']:,.0f}x" for row in (small, large)]
    return ("; ".join(parts) + f"; cost/event L/S (1 process) hist {scaling['histories_1p']['cost_per_event_ratio']:.2f}"
            f", build {scaling['examples_1p']['cost_per_event_ratio']:.2f}")


def _rqvae_training(r):
    return (f"{r['items']:,} items, {r['steps']} steps: {r['train_examples_per_s']:,} training examples/s "
            f"({r['train_seconds']:.0f} s); encode_batched {r['encode_items_per_s']:,} items/s")


def _sid_real_data(r):
    return f"{r['items']:,} MovieLens items: " + "; ".join(
        f"{name} collisions {c['metrics']['full_sid_collision_rate']:.3f}, L1 genre agreement "
        f"{c['first']['same_prefix_agreement']:.2f} (random {c['first']['all_pairs_agreement']:.2f})"
        for name, c in r["columns"].items())


def _decoding(r):
    parts = []
    for feed, figures in r["results"].items():
        parts.append(f"{feed}: {figures['users_per_s_decode_1ctx']:,.0f} users/s decode 1 context, "
                     f"multi/separate {figures['ratio_multi_over_separate']:.2f}")
    return "; ".join(parts)


def _model_training(r):
    return ", ".join(f"{row['preset']}: {row['examples_per_s']:,.1f} examples/s, {row['tokens_per_s']:,.0f} tokens/s"
                     for row in r["rows"]) + f" ({r['platform']}, {r['data']} data)"


def _refresh_users(r):
    return "; ".join(f"{x['size']} ({x['num_params']:,} params): pipeline {x['pipeline_users_per_cpu_s']:.1f} vs bare "
                     f"{x['bare_users_per_cpu_s']:.1f} users/CPU-s, peak RSS {x['pipeline']['peak_tree_rss_mib']:,.0f} "
                     "MiB" for x in r["results"])


def _validate_inputs(r):
    f = r["figures"]
    return (f"marginal {f['marginal_rows_per_cpu_s']:,.0f} rows/CPU-s"
            + (f"; range peak RSS {f['range_peak_rss_mib']:,.0f} MiB" if "range_peak_rss_mib" in f else ""))


HEADLINES = {"sid_assignment": _sid_assignment, "examples_pipeline": _examples_pipeline,
             "rqvae_training": _rqvae_training, "sid_real_data": _sid_real_data, "decoding": _decoding,
             "model_training": _model_training, "refresh_users": _refresh_users, "validate_inputs": _validate_inputs}


def _generic(r):
    figures = [(k, v) for k, v in r.items() if isinstance(v, (int, float)) and k != "bench"]
    return ", ".join(f"{k} {v:,.4g}" for k, v in figures[:6]) or json.dumps(r)[:200]


def discover():
    # Private modules (``_gc_probe``: the wrapper examples_pipeline runs its jobs under) are tools, not benchmarks.
    names = sorted(p.stem for p in (REPO / "bench").glob("*.py")
                   if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def run_one(name: str, timeout_s: float):
    command = [sys.executable, "-m", f"bench.{name}", *SMALL_FLAGS.get(name, [])]
    started = time.perf_counter()
    try:
        process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return command, time.perf_counter() - started, f"TIMED OUT after {timeout_s:.0f} s", None
    seconds = time.perf_counter() - started
    results = [json.loads(line[len("RESULT "):]) for line in process.stdout.splitlines()
               if line.startswith("RESULT ")]
    if process.returncode != 0:
        tail = [line for line in process.stderr.strip().splitlines() if line.strip()][-1:] or ["(no stderr)"]
        return command, seconds, f"FAILED (exit {process.returncode}): {tail[0][:200]}", process
    if not results:
        skip = [line for line in process.stdout.splitlines() if line.startswith("SKIP")]
        return command, seconds, (f"skipped: {skip[0][6:200]}" if skip else "no RESULT line"), process
    try:
        headline = HEADLINES.get(name, _generic)(results[-1])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        headline = f"RESULT without the expected figures ({error!r}): {_generic(results[-1])}"
    return command, seconds, headline, process


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all in bench/)")
    parser.add_argument("--timeout-s", type=float, default=1800, help="per benchmark")
    parser.add_argument("--verbose", action="store_true", help="print each benchmark's own output as well")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; found {names}")
        names = [n for n in names if n in wanted]

    rows, failed = [], 0
    started = time.perf_counter()
    for name in names:
        print(f"running {name} ...", flush=True)
        command, seconds, headline, process = run_one(name, args.timeout_s)
        print(f"  {' '.join(Path(command[0]).name if i == 0 else c for i, c in enumerate(command))}: "
              f"{seconds:.0f} s", flush=True)
        if args.verbose and process is not None:
            print(process.stdout)
        if headline.startswith(("FAILED", "TIMED OUT", "no RESULT", "RESULT without")):
            failed += 1
            if process is not None:
                print("\n".join(process.stderr.strip().splitlines()[-15:]), flush=True)
        rows.append((name, " ".join(command[3:]) or "-", seconds, headline))
    print(f"\nall benchmarks at small sizes, {time.perf_counter() - started:.0f} s in total\n")
    name_width = max(len(r[0]) for r in rows) + 2
    flags_width = max(len(r[1]) for r in rows) + 2
    print(f"{'benchmark':<{name_width}}{'small-size flags':<{flags_width}}{'seconds':>8}  headline")
    for name, flags, seconds, headline in rows:
        print(f"{name:<{name_width}}{flags:<{flags_width}}{seconds:>8.0f}  {headline}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
