"""SID-assignment throughput: items/s through the Beam pipeline and through the bare JAX function, side by side.

One run, on the same synthetic catalogue (hierarchical clusters, as in ``bench/rqvae_training.py``; ``--dim``-wide
embeddings, written as a validated ``videos`` partition: ``<root>/validated_<N>/videos/date=D/part-0000S-of-00002.parquet``
+ ``_SUCCESS``, the layout ``pipelines.validate_inputs`` writes and ``pipelines.assign_sids`` reads):

- bare JAX: ``TrainedSIDModel.encode_batched`` on the embeddings (host numpy in and out, the pipeline's
  ``--inference_batch_size`` batches, after compilation; best of ``--repeats``, measured before and after the Beam
  runs);
- Beam: ``python -m pipelines.assign_sids --runner=FnApiRunner`` in full mode (no earlier assignment, so every video
  is read, joined, encoded by RunInference, disambiguated and written), in one process and with
  ``--direct_num_workers=2 --direct_running_mode=multi_processing``, each as a measured subprocess
  (``bench.common.run_job``: run time of the job apart from interpreter start-up and imports, CPU seconds and peak
  RSS of the whole process tree). The same job on a ``--tiny-items`` catalogue gives the fixed cost (worker
  start-up, model load, per-job overhead), and ``(items - tiny) / (run - run_tiny)`` the marginal items/s. The jobs
  run with ``JAX_LOG_COMPILES=1`` (logging only), so the table also counts the encoder's compilations in every
  process of the job and their seconds.

Both sides must agree: every item is encoded in full mode and written or dead-lettered, and the written SIDs equal
``encode_batched``'s. Wall-clock ratios are noisy on a shared machine; the CPU-second ratios less so.

The model, 3 levels x 256 codes, is fitted here: ``--kind=rq_kmeans`` (default; residual k-means, fits in seconds, its
encoder is the identity so encoding is the 3-level nearest-codeword search alone) or ``--kind=rqvae`` (a quick RQ-VAE
with ``--steps`` steps; encoding adds its MLP encoder).

    python -m bench.sid_assignment [--items=50000] [--tiny-items=2000] [--kind=rq_kmeans|rqvae] [--small]
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import RUNNERS, machine_line, print_table, result_line, run_job, synthetic_items  # noqa: E402

DAY = dt.date(2026, 1, 1)
SHARDS = 2  # validate_inputs' default --validated_shards


def write_validated_videos(validated_root: str, embeddings: np.ndarray) -> None:
    """The catalogue as validate_inputs would leave it: one day's partition, SHARDS files, then _SUCCESS."""
    from transforms import schemas

    directory = schemas.partition_dir(validated_root, schemas.VIDEOS, DAY)
    os.makedirs(directory)
    count = len(embeddings)
    start = dt.datetime(DAY.year, DAY.month, DAY.day, tzinfo=dt.timezone.utc)
    table = pa.table({
        "video_id": [f"v{i:08d}" for i in range(count)],
        "scenario": ["SFV" if i % 3 else "LFV" for i in range(count)],
        "content_embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)),
                                                               embeddings.shape[1]).cast(pa.list_(pa.float32())),
        "publish_ts": pa.array([start + dt.timedelta(seconds=i % 86_400) for i in range(count)],
                               type=schemas.TIMESTAMP),
    }, schema=schemas.VIDEOS_SCHEMA)
    bounds = np.linspace(0, count, SHARDS + 1).astype(int)
    for shard in range(SHARDS):
        pq.write_table(table.slice(bounds[shard], bounds[shard + 1] - bounds[shard]),
                       f"{directory}/part-{shard:05d}-of-{SHARDS:05d}.parquet", compression="zstd")
    open(f"{directory}/_SUCCESS", "w").close()


def fit_model(embeddings: np.ndarray, kind: str, steps: int, seed: int):
    from tokenminds_model.rqvae import RQVAEConfig, rq_kmeans, train_rqvae

    if kind == "rq_kmeans":
        return rq_kmeans(embeddings, levels=3, codebook_size=256, seed=seed, kmeans_iters=15,
                         kmeans_samples=min(len(embeddings), 20_000))
    config = RQVAEConfig(input_dim=embeddings.shape[1], levels=3, codebook_size=256, steps=steps, batch_size=512,
                         seed=seed, kmeans_init_iters=10)
    return train_rqvae(embeddings, config)[0]


def time_bare(model, embeddings: np.ndarray, batch_size: int, repeats: int):
    """([(wall s, CPU s of this process, all threads)] per repeat, codes)."""
    timings = []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        codes = model.encode_batched(embeddings, batch_size=batch_size)
        timings.append((time.perf_counter() - started, time.process_time() - started_cpu))
    return timings, codes


def ragged_batch_probe(model, embeddings: np.ndarray, batch_size: int):
    """RunInference hands the handler batches of varying length (BatchElements grows them, bundles end in partial
    batches). This times encode_batched(x[:n], batch_size) for a few lengths n not seen before, first call and
    repeat: a first call far above the repeat is a fresh compilation, which a handler must avoid by padding."""
    probes = []
    for rows in (batch_size // 2 + 1, batch_size // 4 + 3, 7):
        rows = min(rows, len(embeddings))
        first, repeat = (time_bare(model, embeddings[:rows], batch_size, 1)[0][0][0] for _ in range(2))
        probes.append({"rows": rows, "first_s": first, "repeat_s": repeat})
    return probes


def run_assign(root: str, validated_root: str, model_dir: str, dim: int, batch_size: int, runner, tag: str):
    from transforms import schemas

    out = f"{root}/out_{tag}"
    # JAX_LOG_COMPILES only logs (at WARNING, which the job's console shows): every compilation of the encoder, in
    # the job's process and in SDK worker processes, with its shapes and seconds.
    measured = run_job("pipelines.assign_sids", f"--date={DAY}", f"--output_root={out}",
                       f"--validated_root={validated_root}", f"--sid_model={model_dir}", f"--embedding_dim={dim}",
                       f"--inference_batch_size={batch_size}", *runner, extra_env={"JAX_LOG_COMPILES": "1"})
    log = measured.pop("log")
    measured["encode_compiles"] = len(re.findall(r"Compiling jit\(_encode\)", log))
    # The embeddings are the last argument: the last float32[rows,dim] of each line is the batch shape.
    measured["encode_batch_shapes"] = len({re.findall(r"float32\[(\d+),\d+\]", line)[-1]
                                           for line in log.splitlines() if "Compiling jit(_encode)" in line})
    measured["encode_compile_s"] = sum(float(x) for x in re.findall(
        r"(?:Finished tracing _encode for jit|Finished jaxpr to MLIR module conversion jit\(_encode\)|"
        r"Finished XLA compilation of jit\(_encode\)) in ([0-9.]+) sec", log))
    summary = json_load(schemas.run_summary_path(out, schemas.VIDEO_SIDS, DAY))
    table = summary["tables"]
    measured["mode"] = summary["mode"]
    measured["rows_out"] = table[schemas.VIDEO_SIDS][DAY.isoformat()]["rows_out"]
    measured["dead"] = table[schemas.VIDEO_SIDS][DAY.isoformat()].get("rows_dead", 0)
    measured["encoded"] = table[schemas.VIDEOS][DAY.isoformat()]["rows_out"]
    measured["sids"] = read_sids(out)
    shutil.rmtree(out)
    return measured


def json_load(path: str):
    import json

    with open(path) as handle:
        return json.load(handle)


def read_sids(out: str):
    from transforms import schemas

    directory = schemas.partition_dir(out, schemas.VIDEO_SIDS, DAY)
    table = pa.concat_tables([pq.read_table(path, columns=["video_id", "sid"])
                              for path in sorted(glob.glob(f"{directory}/part-*.parquet"))])
    return dict(zip(table["video_id"].to_pylist(), table["sid"].to_pylist()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--tiny-items", type=int, default=2_000,
                        help="catalogue size of the fixed-cost run (0: skip it and the marginal figures)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--kind", choices=("rq_kmeans", "rqvae"), default="rq_kmeans")
    parser.add_argument("--steps", type=int, default=300, help="RQ-VAE training steps (--kind=rqvae)")
    parser.add_argument("--batch-size", type=int, default=1024,
                        help="--inference_batch_size of the pipeline, and the bare encode_batched batch")
    parser.add_argument("--repeats", type=int, default=3, help="bare JAX repeats, before and after the Beam runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="5,000 items, tiny 1,000 (for bench.run_all)")
    parser.add_argument("--workdir", default=None, help="keep the catalogue and model here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.small:
        args.items, args.tiny_items = 5_000, 1_000
    if not 0 <= args.tiny_items < args.items:
        parser.error("--tiny-items must be >= 0 and below --items")

    import jax

    from tokenminds_model.checkpoints import load_sid_model, save_sid_model

    root = args.workdir or tempfile.mkdtemp(prefix="bench_sid_assignment_")
    os.makedirs(root, exist_ok=True)
    embeddings = synthetic_items(args.items, args.dim, args.seed)
    sizes = [args.items] + ([args.tiny_items] if args.tiny_items else [])
    for size in sizes:
        shutil.rmtree(f"{root}/validated_{size}", ignore_errors=True)
        write_validated_videos(f"{root}/validated_{size}", embeddings[:size])
    started = time.perf_counter()
    model = fit_model(embeddings, args.kind, args.steps, args.seed)
    fit_s = time.perf_counter() - started
    model_dir = f"{root}/sid_model"
    save_sid_model(model, model_dir, overwrite=True)
    model = load_sid_model(model_dir)  # what each worker does
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; {machine_line()}")
    print(f"catalogue: {args.items:,} items, {args.dim}-d; model: {args.kind} 3x256 ({model.version}), fitted in "
          f"{fit_s:.1f} s{f' ({args.steps} steps)' if args.kind == 'rqvae' else ''}; batch {args.batch_size}; "
          f"work dir {root}\n", flush=True)

    model.encode_batched(embeddings[:args.batch_size], batch_size=args.batch_size)  # compile outside the timing
    bare_before, codes = time_bare(model, embeddings, args.batch_size, args.repeats)

    beam = {}
    for label, runner in RUNNERS.items():
        for size in sizes:
            tag = f"{label.replace(' ', '_')}_{size}"
            print(f"running assign_sids, {label}, {size:,} items ...", flush=True)
            beam[(label, size)] = run_assign(root, f"{root}/validated_{size}", model_dir, args.dim, args.batch_size,
                                             runner, tag)
    bare_after, _ = time_bare(model, embeddings, args.batch_size, args.repeats)
    ragged = ragged_batch_probe(model, embeddings, args.batch_size)

    # Every item read, encoded in full mode, written or dead-lettered (more than --max_disambiguation_codes videos on
    # one full SID), and the written SIDs are the bare function's SIDs.
    for (label, size), measured in beam.items():
        assert measured["mode"] == "full", measured["mode"]
        assert measured["encoded"] == size == measured["rows_out"] + measured["dead"], (label, size, measured)
        sids = measured.pop("sids")
        assert len(sids) == measured["rows_out"]
        mismatched = [v for v, sid in sids.items() if list(sid) != codes[int(v[1:])].tolist()]
        assert not mismatched, f"{label}: pipeline SIDs differ from encode_batched for {mismatched[:5]}"

    bare_s, bare_cpu_s = min(t for t, _ in bare_before + bare_after), min(c for _, c in bare_before + bare_after)
    bare_rate, bare_cpu_rate = args.items / bare_s, args.items / max(bare_cpu_s, 1e-9)
    result = {"items": args.items, "tiny_items": args.tiny_items, "kind": args.kind, "dim": args.dim,
              "batch_size": args.batch_size, "bare_jax_s": bare_s, "bare_jax_cpu_s": bare_cpu_s,
              "bare_jax_items_per_s": bare_rate, "bare_jax_items_per_cpu_s": bare_cpu_rate,
              "bare_jax_all_s": [t for t, _ in bare_before + bare_after], "load_avg_1min": os.getloadavg()[0]}
    headers = ["path", "items", "seconds", "items/s", "bare/this", "CPU s", "items/CPU s", "bare/this CPU",
               "encoder compiles", "compile s", "peak RSS MiB"]
    rows = [[f"bare JAX encode_batched (batch {args.batch_size}, warm)", f"{args.items:,}", f"{bare_s:.3f}",
             f"{bare_rate:,.0f}", "1x", f"{bare_cpu_s:.3f}", f"{bare_cpu_rate:,.0f}", "1x", "0", "", ""]]
    for label in RUNNERS:
        key = "beam_single" if label == "1 process" else "beam_2proc"
        big = beam[(label, args.items)]
        rate, cpu_rate = args.items / big["run_s"], args.items / big["cpu_s"]
        rows.append([f"Beam assign_sids, {label}: job run", f"{args.items:,}", f"{big['run_s']:.2f}", f"{rate:,.0f}",
                     f"{bare_rate / rate:,.0f}x", f"{big['cpu_s']:.1f}", f"{cpu_rate:,.0f}",
                     f"{bare_cpu_rate / cpu_rate:,.0f}x",
                     f"{big['encode_compiles']} ({big['encode_batch_shapes']} shapes)", f"{big['encode_compile_s']:.1f}",
                     f"{big['peak_tree_rss_mib']:,.0f}"])
        rows.append([f"  process wall (+{big['wall_s'] - big['run_s']:.1f} s start-up, imports, exit)",
                     f"{args.items:,}", f"{big['wall_s']:.2f}", f"{args.items / big['wall_s']:,.0f}",
                     f"{bare_rate * big['wall_s'] / args.items:,.0f}x", "", "", "", "", "", ""])
        result.update({f"{key}_run_s": big["run_s"], f"{key}_wall_s": big["wall_s"], f"{key}_cpu_s": big["cpu_s"],
                       f"{key}_items_per_s": rate, f"{key}_items_per_cpu_s": cpu_rate,
                       f"{key}_peak_tree_rss_mib": big["peak_tree_rss_mib"], f"bare_over_{key}": bare_rate / rate,
                       f"bare_over_{key}_cpu": bare_cpu_rate / cpu_rate, f"{key}_dead": big["dead"],
                       f"{key}_encode_compiles": big["encode_compiles"],
                       f"{key}_encode_batch_shapes": big["encode_batch_shapes"],
                       f"{key}_encode_compile_s": big["encode_compile_s"]})
        if label == "1 process":
            # One process: the compilations run on the job's critical path, so subtracting them estimates the job
            # with one compiled batch shape (what the handler intends). Not done for 2 processes, where the workers
            # compile in parallel.
            without = big["run_s"] - big["encode_compile_s"]
            rows.append(["  job run minus encoder compile time (estimate)", f"{args.items:,}", f"{without:.2f}",
                         f"{args.items / without:,.0f}", f"{bare_rate * without / args.items:,.0f}x", "", "", "", "",
                         "", ""])
            result[f"{key}_items_per_s_without_compiles"] = args.items / without
        if args.tiny_items:
            tiny = beam[(label, args.tiny_items)]
            extra_s, extra_cpu = big["run_s"] - tiny["run_s"], big["cpu_s"] - tiny["cpu_s"]
            marginal = (args.items - args.tiny_items) / extra_s if extra_s > 0 else float("inf")
            rows.append([f"  fixed cost: the same job on {args.tiny_items:,} items", f"{args.tiny_items:,}",
                         f"{tiny['run_s']:.2f}", f"{args.tiny_items / tiny['run_s']:,.0f}", "", f"{tiny['cpu_s']:.1f}",
                         "", "", f"{tiny['encode_compiles']} ({tiny['encode_batch_shapes']} shapes)",
                         f"{tiny['encode_compile_s']:.1f}", f"{tiny['peak_tree_rss_mib']:,.0f}"])
            rows.append([f"  marginal: ({args.items:,} - {args.tiny_items:,} items) / (difference)",
                         f"{args.items - args.tiny_items:,}", f"{extra_s:.2f}", f"{marginal:,.0f}",
                         f"{bare_rate / marginal:,.0f}x", f"{extra_cpu:.1f}",
                         f"{(args.items - args.tiny_items) / extra_cpu:,.0f}" if extra_cpu > 0 else "", "", "", "", ""])
            result.update({f"{key}_tiny_run_s": tiny["run_s"], f"{key}_tiny_cpu_s": tiny["cpu_s"],
                           f"{key}_marginal_items_per_s": marginal, f"bare_over_{key}_marginal": bare_rate / marginal})
    print()
    print_table(headers, rows)
    print(f"\nbare JAX wall seconds, {args.repeats} before and {args.repeats} after the Beam runs (best is shown): "
          + ", ".join(f"{t:.3f}" for t, _ in bare_before + bare_after))
    print("seconds: the job's own run time (python -m pipelines.assign_sids minus interpreter start-up and imports); "
          "CPU s and RSS: the whole process tree (SDK worker processes included); encoder compiles: 'Compiling "
          "jit(_encode)' lines logged with JAX_LOG_COMPILES=1 in all of the job's processes, compile s: their "
          "tracing + lowering + XLA compilation seconds")
    dead = {label: beam[(label, args.items)]["dead"] for label in RUNNERS}
    print(f"dead-lettered (sid_collision_overflow: more videos on one full SID than disambiguation codes): {dead}")
    print(f"ragged batches (encode_batched(x[:n], batch_size={args.batch_size}) for lengths not seen before), "
          "first call / repeat: " + ", ".join(f"n={p['rows']}: {p['first_s'] * 1e3:.0f} / {p['repeat_s'] * 1e3:.1f} ms"
                                              for p in ragged))
    recompiles = all(p["first_s"] > 10 * p["repeat_s"] + 0.05 for p in ragged)
    pipeline_shapes = max(m["encode_batch_shapes"] for m in beam.values())
    if recompiles:
        print("  -> encode_batched compiles once per distinct row count below batch_size (it shrinks the batch to the "
              "row count instead of padding); RunInference's batches vary in length, so a handler must pad them "
              + ("itself: the pipeline's handler does (one encoder shape per job above)" if pipeline_shapes == 1 else
                 f"itself: the pipeline compiled {pipeline_shapes} encoder shapes, i.e. it does not"))
    result["ragged_batches"] = ragged
    result["recompiles_per_batch_length"] = recompiles
    print(f"ratio bare JAX / Beam 1 process: {result['bare_over_beam_single']:,.0f}x (wall), "
          f"{result['bare_over_beam_single_cpu']:,.0f}x (CPU); 2 processes / 1 process items/s: "
          f"{result['beam_2proc_items_per_s'] / result['beam_single_items_per_s']:.2f}x")
    print(result_line("sid_assignment", result))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
