"""Validate one day (or a range of days) of input tables against the data contract.

    python -m pipelines.validate_inputs --date=2026-01-01 --input_root=workdir/raw --output_root=workdir/out \
        --runner=FnApiRunner

Reads   <input_root>/{watch_events,search_events,videos}/date=D/*.parquet   (or BigQuery with --source=bigquery)
Writes  <output_root>/validated/<table>/date=D/part-*.parquet + _SUCCESS   rows that passed, deduplicated; this is
                                                                        itself a valid --input_root for later jobs
        <output_root>/dead_letter/<table>/date=D/part-*.parquet          rejected rows: the row as JSON + reason
        <output_root>/validation_runs/date=D/summary.json + _SUCCESS     rows in / out / dead per reason; in = out + dead
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
from typing import Callable, List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import daily_plan
from pipelines.cli import run_main, run_staged
from pipelines.options import (JobSpec, TokenMindsOptions, parse_job_options, processing_dates,
                               source_config)
from transforms import outputs, schemas
from transforms.sources import ReadTableBatches
from transforms.validation import ValidateRange


class ValidateInputsOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--tables", default=",".join(schemas.INPUT_TABLES),
                            help="Comma-separated input tables to validate.")
        parser.add_argument("--validated_shards", type=int, default=2,
                            help="Parquet shards per validated table partition.")


def validated_root(output_root: str) -> str:
    return outputs.join(output_root, "validated")


def dead_letter_root(output_root: str) -> str:
    return outputs.join(output_root, schemas.DEAD_LETTER)


def run_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(output_root, "validation_runs", date)


def output_dirs(output_root: str, tables: List[str], date: dt.date) -> List[str]:
    return ([schemas.partition_dir(validated_root(output_root), t, date) for t in tables]
            + [schemas.partition_dir(dead_letter_root(output_root), t, date) for t in tables]
            + [run_dir(output_root, date)])


def validate_range(pipeline: beam.Pipeline, dates: List[dt.date], tables: List[str], source, output_root: str,
                   embedding_dim: int, validated_shards: int, staged: Callable[[str], str] = lambda path: path) -> None:
    """Read every table's partitions of the whole range (one read per table), validate them as Arrow batches, and
    write each date's partitions, then each date's summary and _SUCCESS markers (each output under ``staged(final
    path)``). One branch for the range, not one per date: a long range costs no more to build or hold than a day."""
    days = [d.isoformat() for d in dates]
    valid_dirs = {(t, d): staged(schemas.partition_dir(validated_root(output_root), t, d))
                  for t in tables for d in days}
    dead_dirs = {(t, d): staged(schemas.partition_dir(dead_letter_root(output_root), t, d))
                 for t in tables for d in days}
    batches = {table: pipeline | f"Read {table}" >> ReadTableBatches(table, dates, source) for table in tables}
    validated = batches | "Validate" >> ValidateRange(valid_dirs, dead_dirs, validated_shards, embedding_dim)
    _ = validated["counts"] | "WriteSummaryAndSuccess" >> outputs.WriteDailySummaries(
        summary_paths={d: staged(outputs.join(run_dir(output_root, d), "summary.json")) for d in days},
        success_dirs={d: [valid_dirs[(t, d)] for t in tables] + [staged(run_dir(output_root, d))] for d in days},
        extra={d: {"job": "validate_inputs", "date": d, "embedding_dim": embedding_dim} for d in days},
        after=validated["written"])


def check_options(options: PipelineOptions) -> None:
    tables = job_tables(options.view_as(ValidateInputsOptions))
    unknown = sorted(set(tables) - set(schemas.INPUT_TABLES))
    if unknown or not tables:
        raise ValueError(f"--tables names unknown tables {unknown}; expected a subset of {schemas.INPUT_TABLES}")


def job_tables(job: "ValidateInputsOptions") -> List[str]:
    return [t.strip() for t in job.tables.split(",") if t.strip()]


JOB = JobSpec(name="validate_inputs", summary=__doc__.split("\n\n")[0], option_classes=(ValidateInputsOptions,),
              shared=daily_plan.get_task("validate_inputs").reads, ranges={"validated_shards": (1, 10000)},
              check=check_options)


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(ValidateInputsOptions)
    dates = processing_dates(options)
    source = source_config(options)
    tables = job_tables(job)

    def build(pipeline, day_outputs):
        # Every day's partitions are checked (footers, columns) while the job is built, before anything is written.
        validate_range(pipeline, dates, tables, source, common.output_root, common.embedding_dim,
                       job.validated_shards, day_outputs.staged)

    summaries = run_staged(
        options, JOB.name, [d for date in dates for d in output_dirs(common.output_root, tables, date)], build,
        summary_paths=[outputs.join(run_dir(common.output_root, d), "summary.json") for d in dates])
    for summary in summaries:
        totals = summary["totals"]
        logging.info("validate_inputs %s: in=%d out=%d dead=%d %s balanced=%s", summary["date"],
                     totals["rows_in"], totals["rows_out"], totals["rows_dead"], totals["dead_by_reason"],
                     totals["balanced"])
    return summaries


def main(argv=None):
    summaries = run(argv)
    for summary in summaries:
        totals = summary["totals"]
        print(f"{summary['date']}: rows in={totals['rows_in']} out={totals['rows_out']} dead={totals['rows_dead']} "
              f"{totals['dead_by_reason']}")


if __name__ == "__main__":
    run_main(main)
