"""Every benchmark at a small size, one after another, and one table of their headline figures.

    python -m bench.run_all

Each benchmark prints a final ``RESULT {json}`` line; this collects those. Small sizes keep the whole run to a few
minutes on 2 cores; run a benchmark by itself (``python -m bench.<name> --help``) for its full-size figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = [
    ("sid_assignment", ["--small"]),
    ("rqvae_training", ["--items=20000", "--steps=300"]),
    ("sid_real_data", ["--steps=300"]),
    ("examples_pipeline", ["--small"]),
]
HEADLINES = {
    "sid_assignment": lambda r: f"bare JAX {r['bare_jax_items_per_s']:,.0f} items/s; Beam 1 process "
                                f"{r['beam_single_items_per_s']:,.0f} items/s; 2 processes "
                                f"{r['beam_2_processes_items_per_s']:,.0f} items/s ({r['items']} items)",
    "rqvae_training": lambda r: f"{r['train_examples_per_s']:,} training examples/s; encode "
                                f"{r['encode_items_per_s']:,} items/s ({r['items']} items, {r['steps']} steps)",
    "sid_real_data": lambda r: "; ".join(f"{name}: collisions {c['full_sid_collision_rate']:.3f}"
                                         for name, c in r["columns"].items()),
    "examples_pipeline": lambda r: "; ".join(
        f"{row['users']} users: {row['examples'] / row['examples_single_s']:.1f} examples/s"
        for row in r["rows"]) + f"; per-event cost ratio {r['examples_cost_per_event_ratio']:.2f}",
}


def main():
    rows = []
    for name, args in BENCHMARKS:
        started = time.perf_counter()
        process = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=REPO, capture_output=True,
                                 text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        seconds = time.perf_counter() - started
        results = [json.loads(line[len("RESULT "):]) for line in process.stdout.splitlines()
                   if line.startswith("RESULT ")]
        if process.returncode != 0:
            headline = "FAILED: " + process.stderr.strip().splitlines()[-1] if process.stderr.strip() else "FAILED"
        elif "SKIP" in process.stdout and not results:
            headline = "skipped: " + process.stdout.strip().splitlines()[-1]
        else:
            headline = HEADLINES[name](results[-1]) if results else "no RESULT line"
        rows.append((name, seconds, headline))
        print(f"{name}: done in {seconds:.0f} s", flush=True)
    print()
    print(f"{'benchmark':<20}{'seconds':>9}  headline")
    for name, seconds, headline in rows:
        print(f"{name:<20}{seconds:>9.0f}  {headline}")


if __name__ == "__main__":
    main()
