"""Assign Semantic IDs to the catalog as of day D, incrementally.

    python -m pipelines.assign_sids --date=2026-01-02 --sid_model=workdir/out/sid_model --output_root=workdir/out \
        --runner=FnApiRunner

Reads   <output_root>/video_sids/date=D-1/                  yesterday's assignments (if complete, same model version)
        <validated_root>/videos/date=*/                     validated catalog partitions (only date=D when
                                                            yesterday's assignments carry over; all <= D otherwise)
        --sid_model                                          a SID model checkpoint (pipelines.train_sid_model)
Writes  <output_root>/video_sids/date=D/part-*.parquet      every video's full SID, disambiguation code, model
                                                            version (schemas.VIDEO_SIDS_SCHEMA)
        <output_root>/video_sids/date=D/_SUCCESS             last, once every shard is written
        <output_root>/video_sids/_runs/date=D/summary.json   rows in / out / dead, model version, mode
        <output_root>/dead_letter/video_sids/date=D/         videos whose SID collides beyond the reserved codes

Only videos not yet assigned under the same model version are encoded (RunInference with a JAX model handler);
earlier assignments carry over unchanged. A new model version triggers a full reassignment.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import daily_plan
from pipelines.cli import run_main, run_per_day
from pipelines.options import (JobSpec, TokenMindsOptions, artifact_paths, parse_job_options, processing_dates,
                               validated_root)
from tokenminds_model.checkpoints import read_sid_model_config
from tokenminds_model.vocabulary import DEFAULT_DISAMBIGUATION_SIZE
from transforms import outputs, schemas
from transforms.sid_assignment import EncodeVideos, MergeAssignments
from transforms.sources import ReadTableBatches, SourceConfig, batch_rows

ALREADY_ASSIGNED = "already_assigned"


class AssignSidsOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--inference_batch_size", type=int, default=1024)
        parser.add_argument("--max_disambiguation_codes", type=int, default=DEFAULT_DISAMBIGUATION_SIZE)
        parser.add_argument("--sid_shards", type=int, default=2)


def sids_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(output_root, schemas.VIDEO_SIDS, date)


def sids_summary_path(output_root: str, date: dt.date) -> str:
    return schemas.run_summary_path(output_root, schemas.VIDEO_SIDS, date)


def sids_model_version(output_root: str, date: dt.date) -> str:
    """The SID model a complete assignment was made with."""
    return outputs.read_json_file(sids_summary_path(output_root, date))["sid_model_version"]


def dead_letter_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), schemas.VIDEO_SIDS, date)


def catalog_dates(validated_root: str, up_to: dt.date) -> List[dt.date]:
    """Days <= up_to whose validated videos partition is complete."""
    pattern = outputs.join(validated_root, schemas.VIDEOS, "date=*", outputs.SUCCESS_MARKER)
    days = []
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        found = re.search(r"date=(\d{4}-\d{2}-\d{2})", metadata.path)
        if found and schemas.parse_date(found.group(1)) <= up_to:
            days.append(schemas.parse_date(found.group(1)))
    return sorted(days)


def _drop_already_assigned(grouped):
    _, groups = grouped
    if list(groups["existing"]):
        return []
    candidates = sorted(groups["candidates"], key=lambda row: (row["publish_ts"], row["scenario"]))
    return candidates[:1]  # a video republished on a later day is encoded once


def assign_day(pipeline: beam.Pipeline, date: dt.date, output_root: str, validated_root: str, model_dir: str,
               version: str, job: "AssignSidsOptions", staged=lambda path: path) -> None:
    day = date.isoformat()
    previous_dir = sids_dir(output_root, date - dt.timedelta(days=1))
    carry_over = (outputs.success_marker_exists(previous_dir)
                  and sids_model_version(output_root, date - dt.timedelta(days=1)) == version)
    read_days = [date] if carry_over else catalog_dates(validated_root, date)
    if date not in read_days:
        raise FileNotFoundError(f"validated videos for {date} are not complete under {validated_root}")
    validated = SourceConfig(kind="parquet", input_root=validated_root)

    # 1. Read: earlier assignments and the candidate videos.
    if carry_over:
        existing = pipeline | "ReadPreviousSids" >> ReadFromParquet(outputs.join(previous_dir, "*.parquet"))
    else:
        existing = pipeline | "NoPreviousSids" >> beam.Create([])
    # The catalog's days in one read (not one branch per day: a full assignment may read years of partitions).
    candidates = (pipeline | "ReadVideos" >> ReadTableBatches(schemas.VIDEOS, read_days, validated)
                  | "VideoRows" >> beam.FlatMap(batch_rows, columns=schemas.input_schema(schemas.VIDEOS).names))

    # 2. Transform: encode only videos without an assignment, then merge with disambiguation codes.
    to_encode = ({"existing": existing | "KeyExisting" >> beam.Map(lambda r: (r["video_id"], 1)),
                  "candidates": candidates | "KeyCandidates" >> beam.Map(lambda r: (r["video_id"], r))}
                 | "JoinOnVideo" >> beam.CoGroupByKey()
                 | "DropAlreadyAssigned" >> beam.FlatMap(_drop_already_assigned))
    encoded = to_encode | "EncodeVideos" >> EncodeVideos(model_dir, job.inference_batch_size)
    merged = (existing, encoded) | "Merge" >> MergeAssignments(version, day, job.max_disambiguation_codes)

    # 3. Write, then summary and _SUCCESS.
    out_dir = staged(sids_dir(output_root, date))
    dead_dir = staged(dead_letter_dir(output_root, date))
    writes = [merged["sids"] | "WriteSids" >> outputs.WriteParquetShards(out_dir, schemas.VIDEO_SIDS_SCHEMA,
                                                                          num_shards=job.sid_shards,
                                                                          key_columns=("video_id",)),
              merged["dead"] | "WriteDead" >> outputs.WriteParquetShards(dead_dir, schemas.DEAD_LETTER_SCHEMA)]
    # Accounting: every candidate video is encoded or already had a SID; every assignment in (carried over or
    # newly encoded) is written or dead-lettered.
    encoded_total = beam.pvalue.AsSingleton(encoded | "CountEncodedTotal" >> beam.combiners.Count.Globally())
    counts = [candidates | "CountCandidates" >> outputs.CountRows(schemas.VIDEOS, day, outputs.IN),
              encoded | "CountEncoded" >> outputs.CountRows(schemas.VIDEOS, day, outputs.OUT),
              (candidates | "CountCandidatesTotal" >> beam.combiners.Count.Globally()
               | "AlreadyAssigned" >> beam.Map(
                   lambda n, encoded_n: ((schemas.VIDEOS, day, outputs.DROPPED, ALREADY_ASSIGNED), n - encoded_n),
                   encoded_n=encoded_total)),
              existing | "CountCarriedIn" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.IN),
              encoded | "CountEncodedIn" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.IN),
              merged["sids"] | "CountWritten" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.OUT),
              merged["dead"] | "CountDead" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.DEAD),
              existing | "CountCarried" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.STAT, "carried_over")]
    summary = (counts | "AllCounts" >> beam.Flatten()
               | "Summarize" >> outputs.SummarizeCounts(extra={
                   "job": "assign_sids", "date": day, "sid_model_version": version, "sid_model": model_dir,
                   "mode": "incremental" if carry_over else "full", "catalog_days_read": [d.isoformat()
                                                                                         for d in read_days]}))
    _ = summary | "Finish" >> outputs.WriteSummaryAndSuccess(staged(sids_summary_path(output_root, date)),
                                                             [out_dir], after=writes)


JOB = JobSpec(name="assign_sids", summary=__doc__.split("\n\n")[0], option_classes=(AssignSidsOptions,),
              shared=daily_plan.get_task("assign_sids").reads,
              ranges={"inference_batch_size": (1, 1 << 20), "max_disambiguation_codes": (1, None),
                      "sid_shards": (1, 10000)})


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(AssignSidsOptions)
    sid_model, _, _ = artifact_paths(options)
    # Fail fast, before reading any data: the checkpoint must be intact and fit the catalog's embeddings.
    model_config = read_sid_model_config(sid_model)
    if model_config["config"]["input_dim"] != common.embedding_dim:
        raise ValueError(f"SID model {sid_model} expects {model_config['config']['input_dim']}-d embeddings, "
                         f"--embedding_dim is {common.embedding_dim}")
    version = model_config["version"]
    validated_tables = validated_root(options)
    root = common.output_root
    # Sequential by nature: each day carries over the day before.
    return run_per_day(
        options, processing_dates(options), JOB.name,
        build_day=lambda pipeline, date, out: assign_day(pipeline, date, root, validated_tables, sid_model,
                                                         version, job, out.staged),
        output_dirs=lambda date: [dead_letter_dir(root, date), schemas.run_summary_dir(root, schemas.VIDEO_SIDS, date),
                                  sids_dir(root, date)],
        summary_path=lambda date: sids_summary_path(root, date))


def main(argv=None):
    for summary in run(argv):
        table = summary["tables"].get(schemas.VIDEO_SIDS, {}).get(summary["date"], {})
        videos = summary["tables"].get(schemas.VIDEOS, {}).get(summary["date"], {})
        print(f"{summary['date']} ({summary['mode']}): {table.get('rows_out', 0)} videos with SIDs, "
              f"{videos.get('rows_out', 0)} newly encoded, model {summary['sid_model_version']}")


if __name__ == "__main__":
    run_main(main)
