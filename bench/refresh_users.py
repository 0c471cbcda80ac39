"""Nightly refresh throughput: users/s (and users per CPU-second) through the whole refresh_users pipeline and
through the bare model call, side by side, at two model sizes; peak memory.

Setup (not timed): sample data for ``--users`` users over 3 days, validated, SIDs (RQ-KMeans 3x256), history
snapshots, query tokenizer, feature transform and day-2 examples (``bench.examples_pipeline.prepare``); then, per
model size, a checkpoint trained for a few steps on those examples (throughput does not depend on training).

Timed per size:
- pipeline: ``python -m pipelines.refresh_users --date=<day 3> --unconstrained`` (decoding as the bare call does)
  as a measured subprocess (``bench.common.run_job``: run seconds without interpreter start-up, CPU seconds and
  peak RSS of the process tree), one process;
- the same pipeline on a snapshot of only ``FIXED_USERS`` of those users (its own output root, same artifacts): its
  CPU seconds are the run's fixed cost (interpreter and imports, checkpoint checks, the featurizer's TensorFlow
  load, XLA compilation, Beam's start-up), so ``(pipeline CPU - fixed CPU)`` is the per-user part;
- bare model: in this process, the same users' serving inputs (built beforehand with ``transforms.serving``,
  equal to ``transforms.examples.serving_history``, not timed) through ``tokenminds_model.inference.UserInference``
  (one encoder pass, embedding, unconstrained multi-context beam search for LFV and SFV, 20 + 20 tokens), after one
  warm-up call that compiles; best of ``--repeats``.

users/s per core = users / CPU seconds (XLA and Beam both use more than one thread; CPU seconds count them all).
``pipeline/bare (CPU)`` = bare CPU / pipeline CPU, the whole run; ``per-user pipeline/bare (CPU)`` = bare CPU /
(pipeline CPU - fixed CPU) x users / (users - FIXED_USERS): how close the pipeline's cost per extra user is to the
bare model's.

    python -m bench.refresh_users [--users 600] [--sizes tiny,small] [--repeats 2] [--small]

The issue's figure (pipeline/bare CPU at 2,000 users): ``python -m bench.refresh_users --users 2000``.
"""
from __future__ import annotations

import argparse
import glob
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from bench.common import FNAPI, machine_line, print_table, result_line, run_job  # noqa: E402

# Model sizes: the tiny preset (CPU default) and a wider, deeper one ("small"), both at 256 input tokens.
SIZES = {
    "tiny": {},
    "small": dict(d_model=128, num_heads=4, encoder_layers=3, decoder_layers=3, mlp_dim=512, embedding_dim=128),
}


FIXED_USERS = 32  # one model batch: the fixed-cost run


def fixed_cost_root(root: str, out: str, day: str, users: int) -> str:
    """An output root whose day-``day`` snapshot holds only the first ``users`` users of ``out``'s."""
    import os

    import pyarrow as pa

    from transforms import outputs

    fixed = f"{root}/fixed/out"
    directory = f"{fixed}/histories/date={day}"
    os.makedirs(directory)
    paths = sorted(glob.glob(f"{out}/histories/date={day}/*.parquet"))
    table = pa.concat_tables([pq.read_table(path) for path in paths])
    pq.write_table(table.slice(0, users), f"{directory}/part-00000-of-00001.parquet")
    outputs.write_text_file(f"{directory}/_SUCCESS", "")
    return fixed


def prepare_flow(root: str, users: int) -> dict:
    from bench.examples_pipeline import prepare
    from pipelines import build_examples, fit_feature_transform, update_histories

    prepared = prepare(root, users, 3, "rq_kmeans")
    dates, out = prepared["dates"], prepared["out"]
    update_histories.run([f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--output_root={out}",
                          "--backfill_days=1", *FNAPI])
    fit_feature_transform.run([f"--date={dates[0]}", f"--output_root={out}", *FNAPI])
    build_examples.run([f"--date={dates[1]}", f"--output_root={out}", *FNAPI])
    return prepared


def serving_inputs(out: str, day: str):
    """Every snapshot user's serving input ({"tokens", "length"}), built as refresh_users builds it
    (``transforms.serving``, equal to ``examples.serving_history`` per user)."""
    import datetime as dt

    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.build_examples import SequenceOptions, sequence_config, vocabulary_layout
    from tokenminds_model.query_tokenizer import QueryTokenizer
    from transforms import features, schemas, serving

    config = sequence_config(PipelineOptions([]).view_as(SequenceOptions))
    layout = vocabulary_layout(f"{out}/sid_model", f"{out}/query_tokenizer", f"{out}/feature_transform")
    tokenizer = QueryTokenizer.load(f"{out}/query_tokenizer")
    featurizer = features.WatchFeaturizer(f"{out}/feature_transform")
    cutoff = schemas.to_epoch_us(schemas.day_bounds(dt.date.fromisoformat(day))[1])
    histories = []
    for path in sorted(glob.glob(f"{out}/histories/date={day}/*.parquet")):
        built = serving.build_serving_inputs(pq.read_table(path), cutoff, layout, config, tokenizer, featurizer)
        histories += [history for _, history in built if not isinstance(history, Exception)]
    return histories


def time_bare(model_dir: str, histories, repeats: int) -> dict:
    from tokenminds_model.inference import UserInference, stack_histories
    from tokenminds_model.model import count_params
    from tokenminds_model.model_checkpoints import load_model

    config, params, layout = load_model(model_dir)
    model = UserInference(config, params, layout, batch_size=32)
    tokens, lengths, _ = stack_histories(histories, len(histories[0]["tokens"]))
    model(tokens[:1], lengths[:1])  # compile
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        model(tokens, lengths)
        best_wall = min(best_wall, time.perf_counter() - wall0)
        best_cpu = min(best_cpu, time.process_time() - cpu0)
    return {"run_s": best_wall, "cpu_s": best_cpu, "num_params": count_params(params)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="200 users (for bench.run_all)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    users = 200 if args.small else args.users
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = set(sizes) - set(SIZES)
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)}; choose from {sorted(SIZES)}")
    logging.getLogger().setLevel(logging.ERROR)
    print(f"{machine_line()}; {users} users x 3 days; model sizes {sizes}", flush=True)
    root = tempfile.mkdtemp(prefix="bench_refresh_", dir=args.workdir)
    prepared = prepare_flow(root, users)
    dates, out = prepared["dates"], prepared["out"]
    day = dates[-1]
    histories = serving_inputs(out, day)
    fixed_root = fixed_cost_root(root, out, day, FIXED_USERS)
    artifacts = [f"--{name}={out}/{name}" for name in ("sid_model", "query_tokenizer", "feature_transform")]
    results = []
    from tokenminds_model import train as train_lib

    for size in sizes:
        model_dir = f"{root}/models/{size}"
        train_lib.train([f"{out}/examples/date={dates[1]}"], model_dir, steps=2, batch_size=8, progress=False,
                        tensorboard=False, **SIZES[size])
        print(f"[{size}] refresh_users ...", flush=True)
        pipeline = run_job("pipelines.refresh_users", f"--date={day}", f"--output_root={out}",
                           f"--model={model_dir}", "--unconstrained", *FNAPI)
        pipeline.pop("log", None)
        fixed = run_job("pipelines.refresh_users", f"--date={day}", f"--output_root={fixed_root}",
                        f"--model={model_dir}", "--unconstrained", *artifacts, *FNAPI)
        fixed.pop("log", None)
        bare = time_bare(model_dir, histories, args.repeats)
        n = len(histories)
        per_user_cpu = (pipeline["cpu_s"] - fixed["cpu_s"]) / max(n - FIXED_USERS, 1)
        results.append({"size": size, "users": n, "num_params": bare["num_params"], "pipeline": pipeline,
                        "bare": bare, "fixed": fixed, "fixed_users": FIXED_USERS,
                        "pipeline_over_bare_cpu": bare["cpu_s"] / pipeline["cpu_s"],
                        "per_user_pipeline_over_bare_cpu": bare["cpu_s"] / n / per_user_cpu,
                        "pipeline_users_per_s": n / pipeline["run_s"], "pipeline_users_per_cpu_s":
                            n / pipeline["cpu_s"],
                        "bare_users_per_s": n / bare["run_s"], "bare_users_per_cpu_s": n / bare["cpu_s"]})
    bare_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print_table(["model", "params", "users", "pipeline users/s", "users/CPU-s", "peak RSS MiB",
                 "bare users/s", "bare users/CPU-s", "pipeline/bare (CPU)", "fixed CPU-s",
                 "per-user pipeline/bare (CPU)"],
                [[r["size"], f"{r['num_params']:,}", r["users"], f"{r['pipeline_users_per_s']:.1f}",
                  f"{r['pipeline_users_per_cpu_s']:.1f}", f"{r['pipeline']['peak_tree_rss_mib']:.0f}",
                  f"{r['bare_users_per_s']:.1f}", f"{r['bare_users_per_cpu_s']:.1f}",
                  f"{r['pipeline_over_bare_cpu']:.2f}", f"{r['fixed']['cpu_s']:.1f}",
                  f"{r['per_user_pipeline_over_bare_cpu']:.2f}"] for r in results])
    print(f"pipeline: whole refresh_users run (read snapshot, build inputs, RunInference, write Parquet, summary) in "
          f"one process; fixed: the same run on {FIXED_USERS} users (start-up, imports, artifact loads, XLA "
          f"compilation); bare: UserInference on the same users in this process (its peak RSS, incl. setup: "
          f"{bare_rss:.0f} MiB)")
    print(result_line("refresh_users", {"users": users, "results": results, "bare_process_peak_rss_mib": bare_rss}))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
