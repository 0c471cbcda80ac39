"""Fold day D's validated events into the user history snapshot of day D-1, giving the snapshot as of end of day D.

    python -m pipelines.update_histories --date=2026-01-02 --output_root=workdir/out --runner=FnApiRunner

Reads   <validated_root>/{watch_events,search_events}/date=D/     (validate_inputs' output; needs its _SUCCESS)
        <output_root>/video_sids/date=D/                          (assign_sids' output: every video's SID)
        <output_root>/histories/date=D-1/                         (yesterday's snapshot, if it has _SUCCESS)
Writes  <output_root>/histories/date=D/part-*.parquet             one row per user: recent watches with SIDs,
                                                                  recent searches (schemas.HISTORIES_SCHEMA)
        <output_root>/histories/date=D/_SUCCESS                   last, once every shard is written
        <output_root>/histories/_runs/date=D/summary.json         rows in / out / dead / dropped per table
        <output_root>/dead_letter/histories/date=D/               watches of videos without a SID

With no snapshot for D-1 (the first run, or after a gap), the snapshot is built from the raw validated events of
the last --backfill_days days instead. If the SID model changed since D-1, the previous snapshot's watches are
re-joined with the current SIDs, so a snapshot never mixes two SID models.
"""
from __future__ import annotations

import argparse
import datetime as dt
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import daily_plan
from pipelines.cli import run_main, run_per_day
from pipelines.options import JobSpec, TokenMindsOptions, parse_job_options, processing_dates, validated_root
from transforms import histories, outputs, schemas
from transforms.sources import ReadTable, SourceConfig
from transforms.validation import parse_timestamp



class UpdateHistoriesOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--max_history_watches", type=int, default=schemas.DEFAULT_MAX_HISTORY_WATCHES)
        parser.add_argument("--max_history_searches", type=int, default=schemas.DEFAULT_MAX_HISTORY_SEARCHES)
        parser.add_argument("--backfill_days", type=int, default=30,
                            help="Days of raw events to build from when there is no previous snapshot.")
        parser.add_argument("--history_shards", type=int, default=4)


def snapshot_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(output_root, schemas.HISTORIES, date)


def video_sids_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(output_root, schemas.VIDEO_SIDS, date)


def snapshot_summary_path(output_root: str, date: dt.date) -> str:
    return schemas.run_summary_path(output_root, schemas.HISTORIES, date)


def snapshot_sid_model_version(output_root: str, date: dt.date) -> str:
    """The SID model a complete snapshot was built with."""
    return outputs.read_json_file(snapshot_summary_path(output_root, date))["sid_model_version"]


def video_sids_summary_path(output_root: str, date: dt.date) -> str:
    return schemas.run_summary_path(output_root, schemas.VIDEO_SIDS, date)


def current_sid_model_version(output_root: str, date: dt.date) -> str:
    directory = video_sids_dir(output_root, date)
    if not outputs.success_marker_exists(directory):
        raise FileNotFoundError(f"no complete SID assignment for {date}: {directory}/_SUCCESS is missing "
                                "(run pipelines.assign_sids first)")
    return outputs.read_json_file(video_sids_summary_path(output_root, date))["sid_model_version"]


def require_success(directory: str, what: str) -> None:
    if not outputs.success_marker_exists(directory):
        raise FileNotFoundError(f"{what} is not complete: {directory}/_SUCCESS is missing")


def _with_utc(row, column="event_ts"):
    return {**row, column: parse_timestamp(row[column])}


def update_day(pipeline: beam.Pipeline, date: dt.date, output_root: str, validated_root: str,
               job: "UpdateHistoriesOptions", staged=lambda path: path) -> None:
    day = date.isoformat()
    version = current_sid_model_version(output_root, date)
    previous_dir = snapshot_dir(output_root, date - dt.timedelta(days=1))
    has_previous = outputs.success_marker_exists(previous_dir)
    remap_previous = has_previous and snapshot_sid_model_version(output_root, date - dt.timedelta(days=1)) != version
    event_days = [date] if has_previous else [date - dt.timedelta(days=i) for i in range(job.backfill_days)][::-1]
    validated = SourceConfig(kind="parquet", input_root=validated_root)

    # 1. Read: the day's validated events (or the backfill window), the current SIDs, yesterday's snapshot.
    watch_rows, search_rows, counts = [], [], []
    for event_day in event_days:
        for table in (schemas.WATCH_EVENTS, schemas.SEARCH_EVENTS):
            require_success(schemas.partition_dir(validated_root, table, event_day), f"validated {table}")
        watches = (pipeline | f"ReadWatches {event_day}" >> ReadTable(schemas.WATCH_EVENTS, event_day, validated)
                   | f"UtcWatches {event_day}" >> beam.Map(_with_utc))
        searches = (pipeline | f"ReadSearches {event_day}" >> ReadTable(schemas.SEARCH_EVENTS, event_day, validated)
                    | f"UtcSearches {event_day}" >> beam.Map(_with_utc))
        watch_rows.append(watches)
        search_rows.append(searches)
        counts += [watches | f"CountWatchesIn {event_day}" >> outputs.CountRows(schemas.WATCH_EVENTS, day, outputs.IN),
                   searches | f"CountSearchesIn {event_day}" >> outputs.CountRows(
                       schemas.SEARCH_EVENTS, day, outputs.IN)]
    require_success(video_sids_dir(output_root, date), "SID assignment")
    video_sids = (pipeline
                  | "ReadVideoSids" >> ReadFromParquet(outputs.join(video_sids_dir(output_root, date), "*.parquet"),
                                                       columns=["video_id", "sid"])
                  | "KeyByVideo" >> beam.Map(lambda row: (row["video_id"], row["sid"])))
    if has_previous:
        previous = pipeline | "ReadPreviousSnapshot" >> ReadFromParquet(outputs.join(previous_dir, "*.parquet"))
    else:
        previous = pipeline | "NoPreviousSnapshot" >> beam.Create([])
    dead = []
    if remap_previous:
        # A new SID model: yesterday's watches get their SIDs under the new model before anything is folded in.
        remapped = (previous, video_sids) | "RemapPreviousSids" >> histories.RemapSnapshotSids(day)
        previous, counts, dead = remapped["snapshots"], counts + [remapped["counts"]], [remapped["dead"]]

    # 2. Transform: attach SIDs (dead-lettering watches of unknown videos), bound each user's day, fold.
    all_watches = watch_rows | "AllWatches" >> beam.Flatten()
    attached = (all_watches, video_sids) | "AttachSids" >> histories.AttachSids(day)
    keyed_searches = (search_rows | "AllSearches" >> beam.Flatten()
                      | "KeySearches" >> beam.Map(lambda row: (row["user_id"], histories.search_record(row))))
    folded = ({"previous": previous, "watches": attached["watches"], "searches": keyed_searches}
              | "FoldHistories" >> histories.FoldHistories(day, version, job.max_history_watches,
                                                          job.max_history_searches))

    # 3. Write: snapshots and dead letters, then the summary and _SUCCESS.
    out_dir = staged(snapshot_dir(output_root, date))
    dead_dir = staged(dead_letter_dir(output_root, date))
    writes = [folded["snapshots"] | "WriteSnapshots" >> outputs.WriteParquetShards(
                  out_dir, schemas.HISTORIES_SCHEMA, num_shards=job.history_shards, key_columns=("user_id",)),
              (dead + [attached["dead"]]) | "AllDead" >> beam.Flatten()
              | "WriteDead" >> outputs.WriteParquetShards(dead_dir, schemas.DEAD_LETTER_SCHEMA)]
    counts += [attached["dead"] | "CountDead" >> outputs.CountRows(schemas.WATCH_EVENTS, day, outputs.DEAD),
               folded["counts"],
               folded["snapshots"] | "CountUsers" >> outputs.CountRows(schemas.HISTORIES, day, outputs.STAT,
                                                                       "users")]
    summary = (counts | "AllCounts" >> beam.Flatten()
               | "Summarize" >> outputs.SummarizeCounts(extra={
                   "job": "update_histories", "date": day, "sid_model_version": version,
                   "built_from": "previous_snapshot" if has_previous else f"backfill_{job.backfill_days}_days",
                   "remapped_previous_sids": remap_previous,
                   "max_history_watches": job.max_history_watches,
                   "max_history_searches": job.max_history_searches}))
    _ = summary | "Finish" >> outputs.WriteSummaryAndSuccess(staged(snapshot_summary_path(output_root, date)),
                                                             [out_dir], after=writes)


def dead_letter_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), schemas.HISTORIES, date)


JOB = JobSpec(name="update_histories", summary=__doc__.split("\n\n")[0], option_classes=(UpdateHistoriesOptions,),
              shared=daily_plan.get_task("update_histories").reads,
              ranges={"max_history_watches": (1, None), "max_history_searches": (0, None),
                      "backfill_days": (1, 3660), "history_shards": (1, 10000)})


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(UpdateHistoriesOptions)
    validated_tables = validated_root(options)
    root = common.output_root
    # Days are sequential by nature (each folds into the one before), so a range runs one job per day.
    return run_per_day(
        options, processing_dates(options), JOB.name,
        build_day=lambda pipeline, date, out: update_day(pipeline, date, root, validated_tables, job, out.staged),
        output_dirs=lambda date: [dead_letter_dir(root, date),
                                  schemas.run_summary_dir(root, schemas.HISTORIES, date), snapshot_dir(root, date)],
        summary_path=lambda date: snapshot_summary_path(root, date))


def main(argv=None):
    for summary in run(argv):
        users = summary["stats"].get(f"{schemas.HISTORIES}.users", 0)
        print(f"{summary['date']}: {users} user snapshots; {summary['totals']}")


if __name__ == "__main__":
    run_main(main)
