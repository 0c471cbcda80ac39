"""Build day D's evaluation sets: per user and protocol, one held-out target and the history before it.

    python -m pipelines.build_eval_sets --date=2026-01-08 --output_root=workdir/out --runner=FnApiRunner

Reads   <output_root>/histories/date={D-1,D,D+1}/   user snapshots (D+1 supplies the 24 h windows after D's cutoffs)
        <output_root>/video_sids/date=D/           the target videos' disambiguation codes
        --sid_model, --query_tokenizer, --feature_transform   the artifacts of the training examples
        the sequence options of build_examples (--prefix_len, --full_depth_sids, --no_searches, --max_targets, ...):
        pass the ones the model's training examples were built with
Writes  <eval_output>/date=D/<protocol>/part-SSSSS-of-NNNNN.tfrecord.gz   the training feature spec plus the
                                                   target's video id, full SID, disambiguation code, the
                                                   ground-truth future watches and a perturbed history
        <eval_output>/date=D/<protocol>/feature_spec.json, vocabulary.json, _SUCCESS
        <eval_output>/date=D/summary.json          per protocol: users in = written + dropped (per reason)
        <eval_output>/date=D/_SUCCESS              last
(<eval_output> defaults to <output_root>/eval_sets.) Protocols and their rules: transforms/eval_sets.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.build_examples import (SEQUENCE_RANGES, SequenceOptions, check_sequence_options, sequence_config,
                                      vocabulary_layout, write_example_manifests)
from pipelines.cli import run_main, run_per_day
from pipelines.options import (ARTIFACTS, DAYS, JobSpec, TokenMindsOptions, artifact_paths, parse_job_options,
                               processing_dates)
from pipelines.update_histories import require_success, snapshot_dir, video_sids_dir
from transforms import eval_sets, examples, outputs, schemas

SUMMARY_FILE = "summary.json"


class BuildEvalSetsOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--eval_output", default=None,
                            help="Root of the eval-set output (default: <output_root>/eval_sets).")
        parser.add_argument("--cold_start_events", type=int, default=eval_sets.DEFAULT_COLD_START_EVENTS,
                            help="Cold start: events of the user's history kept (the first ones).")
        parser.add_argument("--stability_drop_rate", type=float, default=eval_sets.DEFAULT_DROP_RATE,
                            help="Share of watches removed from the perturbed history (embedding stability).")
        parser.add_argument("--eval_shards", type=int, default=1, help="TFRecord shards per protocol.")


def eval_dir(output_root: str, job: BuildEvalSetsOptions, date: dt.date) -> str:
    return outputs.join(job.eval_output or outputs.join(output_root, "eval_sets"), f"date={date.isoformat()}")


def build_day(pipeline: beam.Pipeline, date: dt.date, output_root: str, job: BuildEvalSetsOptions,
              context: eval_sets.EvalSetContext, staged=lambda path: path) -> str:
    day = date.isoformat()
    snapshot_days = [date - dt.timedelta(days=1), date, date + dt.timedelta(days=1)]
    # D and D+1 are required (the cold-start window runs into D+1); D-1 only adds history.
    for snapshot_day in snapshot_days[1:]:
        require_success(snapshot_dir(output_root, snapshot_day), f"history snapshot of {snapshot_day}")
    sids_dir = video_sids_dir(output_root, date)
    require_success(sids_dir, f"video SIDs of {day}")

    # 1. Read the snapshots and the day's SIDs.
    snapshots = []
    for label, snapshot_day in zip(("Before", "Day", "After"), snapshot_days):
        directory = snapshot_dir(output_root, snapshot_day)
        if outputs.success_marker_exists(directory):
            snapshots.append(pipeline | f"Read{label}" >> ReadFromParquet(outputs.join(directory, "*.parquet")))
        else:
            snapshots.append(pipeline | f"No{label}" >> beam.Create([]))
    video_sids = pipeline | "ReadVideoSids" >> ReadFromParquet(outputs.join(sids_dir, "*.parquet"),
                                                               columns=["video_id", "disambiguation"])

    # 2. Build every protocol's cases per user.
    built = (*snapshots, video_sids) | "BuildEvalSets" >> eval_sets.BuildEvalSets(context)

    # 3. Write one TFRecord directory per protocol, then the summary and the _SUCCESS markers.
    out_dir = staged(eval_dir(output_root, job, date))
    protocol_dirs = [outputs.join(out_dir, protocol) for protocol in eval_sets.PROTOCOLS]
    writes = [built["records"][protocol]
              | f"Write_{protocol}" >> outputs.WriteTFRecordShards(directory, job.eval_shards)
              for protocol, directory in zip(eval_sets.PROTOCOLS, protocol_dirs)]
    build = context.build
    summary = built["counts"] | "Summarize" >> outputs.SummarizeCounts(extra={
        "job": "build_eval_sets", "date": day, "seed": build.seed, "sequence_config": repr(build.config),
        "cold_start_events": context.cold_start_events, "stability_drop_rate": context.drop_rate,
        "protocols": list(eval_sets.PROTOCOLS),
        "versions": {"sid_model": build.layout.sid_model_version,
                     "query_tokenizer": build.layout.query_tokenizer_version,
                     "transform_fn": build.layout.transform_fn_version}})
    _ = summary | "Finish" >> outputs.WriteSummaryAndSuccess(outputs.join(out_dir, SUMMARY_FILE),
                                                             protocol_dirs + [out_dir], after=writes)
    return out_dir


JOB = JobSpec(name="build_eval_sets", summary=__doc__.split("\n\n")[0],
              option_classes=(BuildEvalSetsOptions, SequenceOptions), shared=DAYS + ARTIFACTS + ("output_root", "seed"),
              ranges={**SEQUENCE_RANGES, "cold_start_events": (1, None), "stability_drop_rate": (0, 0.999),
                      "eval_shards": (1, 10000)},
              check=check_sequence_options)


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(BuildEvalSetsOptions)
    config = sequence_config(options.view_as(SequenceOptions))  # the training examples' own options
    artifacts = artifact_paths(options)
    layout = vocabulary_layout(*artifacts)
    spec = eval_sets.eval_feature_spec(config, layout)

    def context_for(date: dt.date) -> eval_sets.EvalSetContext:
        start, end = schemas.day_bounds(date)
        return eval_sets.EvalSetContext(
            build=examples.ExampleBuildContext(
                layout=layout, config=config, seed=common.seed, query_tokenizer_dir=artifacts[1],
                feature_transform_dir=artifacts[2], day_start_us=schemas.to_epoch_us(start),
                day_end_us=schemas.to_epoch_us(end), date=date.isoformat()),
            cold_start_events=job.cold_start_events, drop_rate=job.stability_drop_rate)

    def write_spec_and_vocabulary(date, day_outputs):
        for protocol in eval_sets.PROTOCOLS:
            write_example_manifests(
                day_outputs.staged(outputs.join(eval_dir(common.output_root, job, date), protocol)), spec, layout)

    return run_per_day(
        options, processing_dates(options), JOB.name,
        build_day=lambda pipeline, date, out: build_day(pipeline, date, common.output_root, job, context_for(date),
                                                        out.staged),
        output_dirs=lambda date: [eval_dir(common.output_root, job, date)],
        summary_path=lambda date: outputs.join(eval_dir(common.output_root, job, date), SUMMARY_FILE),
        before_run=write_spec_and_vocabulary)


def main(argv=None):
    for summary in run(argv):
        written = {table.replace("eval_", ""): sum(e["rows_out"] for e in per_date.values())
                   for table, per_date in summary["tables"].items()}
        print(f"{summary['date']}: eval cases written {written}, users in/out balanced: "
              f"{summary['totals']['balanced']}")


if __name__ == "__main__":
    run_main(main)
