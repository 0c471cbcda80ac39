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
from apache_beam.io.parquetio import ReadFromParquetBatched
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import daily_plan
from pipelines.cli import run_main, run_per_day
from pipelines.options import JobSpec, TokenMindsOptions, parse_job_options, processing_dates, validated_root
from transforms import histories, outputs, schemas


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


def update_day(pipeline: beam.Pipeline, date: dt.date, output_root: str, validated_root: str,
               job: "UpdateHistoriesOptions", staged=lambda path: path) -> None:
    day = date.isoformat()
    version = current_sid_model_version(output_root, date)
    previous_dir = snapshot_dir(output_root, date - dt.timedelta(days=1))
    has_previous = outputs.success_marker_exists(previous_dir)
    remap_previous = has_previous and snapshot_sid_model_version(output_root, date - dt.timedelta(days=1)) != version
    event_days = [date] if has_previous else [date - dt.timedelta(days=i) for i in range(job.backfill_days)][::-1]

    # 1. Read, as Arrow row groups: the day's validated events (or the backfill window), the current SIDs (a side
    #    input), yesterday's snapshot (here, or shard by shard in the fold).
    require_success(video_sids_dir(output_root, date), "SID assignment")
    video_sids = histories.read_video_sids(pipeline, video_sids_dir(output_root, date))
    events = {}
    for table in (schemas.WATCH_EVENTS, schemas.SEARCH_EVENTS):
        for event_day in event_days:
            require_success(schemas.partition_dir(validated_root, table, event_day), f"validated {table}")
        events[table] = [pipeline | f"Read {table}" >> histories.ReadValidated(validated_root, table, event_days)]
    out_dir = staged(snapshot_dir(output_root, date))
    dead_dir = staged(dead_letter_dir(output_root, date))
    by_shard = folds_by_shard(previous_dir, has_previous, remap_previous, job.history_shards)

    # 2. Transform: attach SIDs (dead-lettering watches of unknown videos; after a SID model change, yesterday's
    #    watches too), bound each user's day, fold. Yesterday's part s holds exactly the users of today's part s
    #    when both have --history_shards shards, so then only the day's events are shuffled (keyed by shard) and
    #    each shard's fold reads yesterday's part itself; a backfill (no snapshot yesterday) folds its window's
    #    events the same way. Otherwise (a SID model change, another shard count) every record, yesterday's too, is
    #    keyed by user.
    shards = job.history_shards if by_shard else 0
    keyed = [
        events[schemas.WATCH_EVENTS] | "AllWatches" >> beam.Flatten() | "KeyWatches" >> histories.KeyByUser(
            day, schemas.WATCH_EVENTS, job.max_history_watches, video_sids, num_shards=shards),
        events[schemas.SEARCH_EVENTS] | "AllSearches" >> beam.Flatten() | "KeySearches" >> histories.KeyByUser(
            day, schemas.SEARCH_EVENTS, job.max_history_searches, num_shards=shards)]
    if by_shard:
        folded = ([k["keyed"] for k in keyed] | "AllKeyed" >> beam.Flatten()
                  | "FoldShards" >> histories.FoldShards(day, version, job.max_history_watches,
                                                         job.max_history_searches,
                                                         previous_dir if has_previous else None, out_dir,
                                                         job.history_shards))
        snapshot_files, user_counts = folded["files"], []
    else:
        previous = (pipeline | "ReadPreviousSnapshot" >> ReadFromParquetBatched(outputs.join(previous_dir, "*.parquet"))
                    if has_previous else pipeline | "NoPreviousSnapshot" >> beam.Create([]))
        keyed.append(previous | "KeyPrevious" >> histories.KeyByUser(
            day, schemas.HISTORIES, video_sids=video_sids if remap_previous else None))
        folded = ([k["keyed"] for k in keyed] | "AllKeyed" >> beam.Flatten()
                  | "FoldHistories" >> histories.FoldHistories(day, version, job.max_history_watches,
                                                              job.max_history_searches))
        snapshot_files = folded["snapshots"] | "WriteSnapshots" >> histories.WriteSnapshots(
            out_dir, job.history_shards)
        user_counts = [folded["snapshots"] | "CountUsers" >> beam.Map(
            lambda table: ((schemas.HISTORIES, day, outputs.STAT, "users"), table.num_rows))]

    # 3. Write: snapshots and dead letters, then the summary and _SUCCESS.
    writes = [snapshot_files,
              [k["dead"] for k in keyed] | "AllDead" >> beam.Flatten()
              | "WriteDead" >> outputs.WriteParquetShards(dead_dir, schemas.DEAD_LETTER_SCHEMA)]
    summary = ([k["counts"] for k in keyed] + [folded["counts"], *user_counts] | "AllCounts" >> beam.Flatten()
               | "Summarize" >> outputs.SummarizeCounts(extra={
                   "job": "update_histories", "date": day, "sid_model_version": version,
                   "built_from": "previous_snapshot" if has_previous else f"backfill_{job.backfill_days}_days",
                   "remapped_previous_sids": remap_previous,
                   "max_history_watches": job.max_history_watches,
                   "max_history_searches": job.max_history_searches}))
    _ = summary | "Finish" >> outputs.WriteSummaryAndSuccess(staged(snapshot_summary_path(output_root, date)),
                                                             [out_dir], after=writes)


def folds_by_shard(previous_dir: str, has_previous: bool, remap_previous: bool, num_shards: int) -> bool:
    """Whether the day is folded shard by shard (``histories.FoldShards``: only the day's events shuffled, by
    shard): when yesterday's snapshot has today's shards and SID model, or when there is none (a backfill)."""
    if not has_previous:
        return True
    return not remap_previous and histories.is_sharded_snapshot(previous_dir, num_shards)


def dead_letter_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), schemas.HISTORIES, date)


JOB = JobSpec(name="update_histories", summary=__doc__.split("\n\n")[0], option_classes=(UpdateHistoriesOptions,),
              shared=daily_plan.get_task("update_histories").reads,
              ranges={"max_history_watches": (1, None), "max_history_searches": (0, None),
                      "backfill_days": (1, 36600),  # 100 years: a public dataset's whole span
                      "history_shards": (1, 10000)})


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
