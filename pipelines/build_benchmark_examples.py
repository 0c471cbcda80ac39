"""Build leave-one-out train / validation / test examples from one history snapshot: the benchmark protocol.

    python -m pipelines.build_benchmark_examples --date=2003-02-28 --output_root=workdir/bench/out \
        --full_depth_sids --max_tokens=256 --max_train_positions=0 --runner=FnApiRunner

Per user, the last watch is the test target, the one before it the validation target, and every earlier watch
(from the second on) a training target, each with the history before it (``transforms/benchmark_examples.py``).
Run it on the snapshot of a dataset's last day built with a history cap above any user's watch count
(``update_histories --max_history_watches``), so a user's whole timeline is split. ``pipelines.benchmark`` drives it.

Reads   <output_root>/histories/date=D/                     user snapshots (every watch of each user)
        --sid_model, --query_tokenizer, --feature_transform   the artifacts the token space is built from
Writes, under <benchmark_output>/date=D/ (``<benchmark_output>`` defaults to ``<output_root>/benchmark_examples``):
        examples/split={train,validation,test}/part-*.tfrecord.gz, feature_spec.json, vocabulary.json, _SUCCESS
                                                     the training example format + target_video_id
        sequences/part-*.parquet, _SUCCESS          user_id, video_ids (timeline order): the same split for the
                                                     ID-based baselines
        summary.json                                users in = out + dropped (< 3 watches) + dead; example stats
                                                     per split
and <output_root>/dead_letter/benchmark_examples/date=D/   users whose examples could not be built.
A rerun replaces every output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import List, Optional

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.parquetio import ReadFromParquetBatched
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.build_examples import (SEQUENCE_RANGES, SequenceOptions, check_sequence_options, sequence_config,
                                      vocabulary_layout)
from pipelines.cli import run_main, run_staged
from pipelines.options import JobSpec, TokenMindsOptions, artifact_paths, parse_job_options, processing_dates
from pipelines.update_histories import require_success, snapshot_dir, snapshot_sid_model_version
from transforms import benchmark_examples as bx
from transforms import examples, outputs, schemas

SUMMARY_FILE = "summary.json"
FEATURE_SPEC_FILE = "feature_spec.json"
VOCABULARY_FILE = "vocabulary.json"
SEQUENCES_SCHEMA = pa.schema([pa.field("user_id", pa.string()), pa.field("video_ids", pa.list_(pa.string()))])


class BenchmarkExamplesOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--benchmark_output", default=None,
                            help="Root of the outputs (default: <output_root>/benchmark_examples).")
        parser.add_argument("--max_train_positions", type=int, default=0,
                            help="Training examples per user: 0 = one per training position; N = the last one plus "
                                 "a seeded sample of N-1 others.")
        parser.add_argument("--train_targets", type=int, default=1,
                            help="Target rows of a training example: the next K training watches (the paper's K "
                                 "look-ahead targets); validation and test always hold the one held-out watch.")
        parser.add_argument("--benchmark_shards", type=int, default=8, help="TFRecord shards of the train split.")


def benchmark_dir(output_root: str, date, benchmark_output: Optional[str] = None) -> str:
    """``<benchmark_output>/date=D``: a partition like every job's output (what a staged publish replaces)."""
    return outputs.join(benchmark_output or outputs.join(output_root, "benchmark_examples"), f"date={date}")


def split_dir(root: str, split: str) -> str:
    return outputs.join(root, "examples", f"split={split}")


def dead_letter_dir(output_root: str, date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), "benchmark_examples", date)


def build(pipeline: beam.Pipeline, context: bx.SplitBuildContext, snapshots: str, out_dir: str, dead_dir: str,
          train_shards: int) -> None:
    # 1. Read the snapshot as Arrow tables.
    tables = pipeline | "ReadSnapshot" >> ReadFromParquetBatched(outputs.join(snapshots, "*.parquet"),
                                                                  columns=examples.SNAPSHOT_COLUMN_NAMES)
    # 2. Split every user's timeline and build the examples in columnar batches.
    built = tables | "BuildBenchmarkExamples" >> bx.BuildBenchmarkExamples(context)
    # 3. Write each split, the sequences and the dead letters; then the summary and the _SUCCESS markers.
    shards = {bx.TRAIN: train_shards, bx.VALIDATION: 1, bx.TEST: 1}
    writes = [built[name] | f"Write_{name}" >> outputs.WriteTFRecordShards(split_dir(out_dir, name), shards[name])
              for name in bx.SPLITS]
    writes.append(built[bx.SEQUENCES] | "WriteSequences" >> outputs.WriteParquetShards(
        outputs.join(out_dir, "sequences"), SEQUENCES_SCHEMA, key_columns=("user_id",)))
    writes.append(built["dead"] | "WriteDead" >> outputs.WriteParquetShards(dead_dir, schemas.DEAD_LETTER_SCHEMA))
    summary = built["counts"] | "Summarize" >> outputs.SummarizeCounts(extra={
        "job": "build_benchmark_examples", "date": context.date, "split_config": dataclasses.asdict(context.split),
        "sequence_config": repr(context.config), "protocol": "leave-one-out: last watch test, the one before "
        "validation, earlier ones train", "versions": {"sid_model": context.layout.sid_model_version,
                                                      "query_tokenizer": context.layout.query_tokenizer_version,
                                                      "transform_fn": context.layout.transform_fn_version}})
    with_stats = summary | "AddStats" >> beam.Map(lambda s, st: {**s, "examples": st},
                                                  st=beam.pvalue.AsSingleton(built["stats"]))
    success_dirs = [split_dir(out_dir, name) for name in bx.SPLITS] + [outputs.join(out_dir, "sequences")]
    _ = with_stats | "Finish" >> outputs.WriteSummaryAndSuccess(outputs.join(out_dir, SUMMARY_FILE),
                                                                success_dirs, after=writes)


JOB = JobSpec(name="build_benchmark_examples", summary=__doc__.split("\n\n")[0],
              option_classes=(BenchmarkExamplesOptions, SequenceOptions),
              shared=("date", "output_root", "sid_model", "query_tokenizer", "feature_transform", "seed"),
              ranges={**SEQUENCE_RANGES, "benchmark_shards": (1, 10000), "train_targets": (1, 64)},
              check=check_sequence_options)


def run(argv: Optional[List[str]] = None) -> dict:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(BenchmarkExamplesOptions)
    if not common.date:
        raise ValueError("--date (the snapshot's day, usually the dataset's last) is required")
    [date] = processing_dates(options)
    # One target per example: the held-out next watch.
    config = dataclasses.replace(sequence_config(options.view_as(SequenceOptions)), max_targets=1,
                                 target_mode="next")
    artifacts = artifact_paths(options)
    layout = vocabulary_layout(*artifacts)  # fails fast on a damaged or mismatched artifact
    snapshots = snapshot_dir(common.output_root, date)
    require_success(snapshots, f"history snapshot of {date}")
    if snapshot_sid_model_version(common.output_root, date) != layout.sid_model_version:
        raise ValueError(f"snapshot {date} was built with another SID model than --sid_model "
                         f"({layout.sid_model_version})")
    context = bx.SplitBuildContext(layout=layout, config=config,
                                   split=bx.SplitConfig(job.max_train_positions, common.seed, job.train_targets),
                                   query_tokenizer_dir=artifacts[1], feature_transform_dir=artifacts[2],
                                   date=date.isoformat())
    out_dir = benchmark_dir(common.output_root, date.isoformat(), job.benchmark_output)
    dead_dir = dead_letter_dir(common.output_root, date)
    specs = bx.split_feature_specs(config, context.split, layout)

    def write_spec_and_vocabulary(day_outputs):
        for name in bx.SPLITS:
            directory = split_dir(day_outputs.staged(out_dir), name)
            outputs.write_text_file(outputs.join(directory, FEATURE_SPEC_FILE),
                                    json.dumps(specs[name], indent=2) + "\n")
            layout.save_manifest(outputs.join(directory, VOCABULARY_FILE))

    [summary] = run_staged(options, JOB.name, [out_dir, dead_dir],
                           build=lambda pipeline, day_outputs: build(
                               pipeline, context, snapshots, day_outputs.staged(out_dir),
                               day_outputs.staged(dead_dir), job.benchmark_shards),
                           summary_paths=[outputs.join(out_dir, SUMMARY_FILE)],
                           before_run=write_spec_and_vocabulary) or [None]
    return summary


def main(argv=None):
    summary = run(argv)
    if summary:
        per_split = {name: stats["examples"] for name, stats in sorted(summary["examples"].items())}
        print(f"{summary['date']}: examples {per_split}, users {summary['totals']}")


if __name__ == "__main__":
    run_main(main)
