"""Nightly batch inference: every user's dense embedding and decoded user tokens as of the end of day D.

    python -m pipelines.refresh_users --date=2026-01-08 --model=workdir/out/models/date=2026-01-07 \
        --output_root=workdir/out --runner=FnApiRunner

Reads   <output_root>/histories/date=D/          every user's history snapshot (not only users active on D)
        --model                                  a checkpoint written by tokenminds_model.train
        --sid_model, --query_tokenizer, --feature_transform   the artifacts the training examples were built with
        <output_root>/video_sids/date=<=D/       the catalogue, to decode only SID prefixes that exist (default)
        <output_root>/user_representations/date=D-1/   yesterday's rows, kept for users whose inference fails
Writes  <output_root>/user_representations/date=D/part-*.parquet   one row per user (schemas.USER_REPRESENTATIONS)
        <output_root>/user_representations/date=D/_SUCCESS         last, once every shard is written
        <output_root>/user_representations/_runs/date=D/summary.json   users in = out + dead, storage per user
        <output_root>/dead_letter/user_representations/date=D/     users whose input or inference failed
        with --sink=bigquery also <bq_project>:<bq_output_dataset>.user_representations, partition D replaced

The story: check the model and artifacts agree (before reading any data) -> read the snapshot (Arrow tables) ->
build the users' inputs with the training-example logic, a batch of users per featurizer call -> Reshuffle (a
fusion break: users spread over the workers) -> RunInference (one encoder pass, every scenario decoded) -> rows ->
write over --representation_shards files, with failed users dead-lettered and carried over from yesterday while
their old row is unexpired.

``generated_at`` is the end of day D (the moment the snapshot describes), so reruns give identical rows;
``expires_at = generated_at + --ttl_hours`` (24 h by default, the refresh cadence).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Dict, List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.parquetio import ReadFromParquetBatched
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.build_examples import SEQUENCE_RANGES, SequenceOptions, sequence_config, vocabulary_layout
from pipelines import daily_plan
from pipelines.cli import run_main, run_per_day
from pipelines.options import (JobSpec, TokenMindsOptions, artifact_paths, parse_job_options,
                               processing_dates)
from pipelines.update_histories import require_success, snapshot_dir
from transforms import examples, outputs, representations, schemas, sources

MAX_TTL_HOURS = 24 * 366


class RefreshUsersOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--model", required=False, default=None,
                            help="User-model checkpoint directory (tokenminds_model.train --output).")
        parser.add_argument("--top_n", type=int, default=20, help="Decoded tokens per scenario (paper: 20).")
        parser.add_argument("--beam_size", type=int, default=20)
        parser.add_argument("--users_per_batch", type=_users_per_batch, default="auto",
                            help="Users per model call; every call is padded to it (one compiled shape). auto: 32 on "
                                 "CPU workers; with --dataflow_service_options=worker_accelerator=type:T;... as many "
                                 "as the GPU type's memory holds (tokenminds_model.inference.resolve_users_per_batch).")
        parser.add_argument("--unconstrained", action="store_true",
                            help="Decode any SID prefix, not only prefixes of videos in the catalogue.")
        parser.add_argument("--ttl_hours", type=float, default=schemas.DEFAULT_REPRESENTATION_TTL_HOURS,
                            help="expires_at = generated_at + this.")
        parser.add_argument("--generated_at", default=None,
                            help="ISO-8601 UTC time stamped on the rows (default: the end of --date, so reruns are "
                                 "identical); a scheduler passes its run's logical time, e.g. Airflow's {{ ts }}.")
        parser.add_argument("--representation_shards", type=int, default=2)
        parser.add_argument("--sink", choices=("parquet", "bigquery"), default="parquet",
                            help="bigquery: also load the rows into a date-partitioned BigQuery table.")
        parser.add_argument("--bq_output_dataset", default=None,
                            help="BigQuery dataset of the user_representations table (project: --bq_project).")


def _users_per_batch(value: str):
    if value == "auto":
        return value
    number = int(value)
    if not 1 <= number <= 1 << 16:
        raise ValueError(f"--users_per_batch={value} must be 'auto' or in [1, {1 << 16}]")
    return number


def users_per_batch(options: PipelineOptions, model_dir: str) -> int:
    """--users_per_batch, with ``auto`` decided here on the driver for the workers' devices."""
    from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, StandardOptions

    from tokenminds_model.inference import resolve_users_per_batch
    from tokenminds_model.model import ModelConfig
    from tokenminds_model.model_checkpoints import read_checkpoint_document

    value = options.view_as(RefreshUsersOptions).users_per_batch
    if value != "auto":
        return int(value)
    config = ModelConfig.from_dict(read_checkpoint_document(model_dir, verify=False)["config"])
    service = list(options.view_as(GoogleCloudOptions).dataflow_service_options or [])
    service += list(options.view_as(DebugOptions).experiments or [])
    remote = "Dataflow" in str(options.view_as(StandardOptions).runner or "")
    return resolve_users_per_batch(value, config, service_options=service, remote_workers=remote)


def representations_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(output_root, schemas.USER_REPRESENTATIONS, date)


def representations_summary_path(output_root: str, date: dt.date) -> str:
    return schemas.run_summary_path(output_root, schemas.USER_REPRESENTATIONS, date)


def dead_letter_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), schemas.USER_REPRESENTATIONS, date)


def check_model_matches(model_dir: str, layout, spec) -> Dict[str, str]:
    """Fail before reading data unless the checkpoint is complete and was trained on this token space and feature
    spec (so serving inputs are what the model was trained on). Returns the checkpoint's version."""
    from tokenminds_model.model_checkpoints import load_model, read_checkpoint_document

    document = read_checkpoint_document(model_dir)  # missing or truncated -> CheckpointError naming the directory
    if document["vocabulary"] != layout.to_manifest():
        raise ValueError(f"checkpoint {model_dir} was trained on another token space than --sid_model/"
                         "--query_tokenizer/--feature_transform give (vocabulary manifests differ)")
    if document["feature_spec"] != json.loads(json.dumps(spec)):
        raise ValueError(f"checkpoint {model_dir} was trained on examples with another feature spec (sequence "
                         "options differ from this job's)")
    load_model(model_dir)  # restores every array and checks the content hash: a corrupt checkpoint fails here
    return document["version"]


def catalogue_prefixes(output_root: str, date: dt.date, prefix_len: int, scenarios) -> Dict[str, np.ndarray]:
    """Distinct prefix-L SIDs per scenario of every video assigned up to day D (each day adds only new videos)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    pattern = outputs.join(output_root, schemas.VIDEO_SIDS, "date=*", "*.parquet")
    prefixes: Dict[str, set] = {s: set() for s in scenarios}
    for match in FileSystems.match([pattern])[0].metadata_list:
        day = match.path.split("date=")[-1].split("/")[0]
        if day > date.isoformat() or not outputs.success_marker_exists(match.path.rsplit("/", 1)[0]):
            continue
        with FileSystems.open(match.path) as handle:
            table = pq.read_table(handle, columns=["scenario", "sid"]).to_pydict()
        for scenario, sid in zip(table["scenario"], table["sid"]):
            if scenario in prefixes and sid is not None and len(sid) >= prefix_len:
                prefixes[scenario].add(tuple(sid[:prefix_len]))
    missing = [s for s, p in prefixes.items() if not p]
    if missing:
        raise ValueError(f"no SIDs for scenario(s) {missing} under {output_root}/{schemas.VIDEO_SIDS} up to {date}; "
                         "run pipelines.assign_sids, or pass --unconstrained")
    return {s: np.asarray(sorted(p), np.int32) for s, p in prefixes.items()}


def generation_time(value: Optional[str], date: dt.date) -> dt.datetime:
    if not value:
        return schemas.day_bounds(date)[1]
    try:
        stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--generated_at {value!r} is not an ISO-8601 time") from None
    if stamp.tzinfo is None:
        raise ValueError(f"--generated_at {value!r} needs a UTC offset (e.g. 2026-01-09T02:00:00+00:00)")
    if stamp < schemas.day_bounds(date)[1]:
        raise ValueError(f"--generated_at {value} is before the end of {date}: the snapshot describes that moment")
    return stamp.astimezone(dt.timezone.utc)


def bigquery_row(row: dict) -> dict:
    """A representation row as BigQuery's JSON load format wants it: timestamps as strings, the partition DATE."""
    return {**row, "generated_at": row["generated_at"].isoformat(), "expires_at": row["expires_at"].isoformat(),
            schemas.USER_REPRESENTATIONS_PARTITION_FIELD: row["snapshot_date"]}


def write_to_bigquery(rows, project: str, dataset: str, date: dt.date):
    """FILE_LOADS into the day's partition with WRITE_TRUNCATE: a rerun replaces that day and nothing else."""
    from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery

    table = f"{project}:{dataset}.{schemas.USER_REPRESENTATIONS}${date.strftime('%Y%m%d')}"
    result = (rows | "ToBigQueryRows" >> beam.Map(bigquery_row)
            | "WriteToBigQuery" >> WriteToBigQuery(
                table=table, schema=schemas.bigquery_representations_schema(),
                method=WriteToBigQuery.Method.FILE_LOADS,
                write_disposition=BigQueryDisposition.WRITE_TRUNCATE,
                create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
                additional_bq_parameters={"timePartitioning": {
                    "type": "DAY", "field": schemas.USER_REPRESENTATIONS_PARTITION_FIELD}}))
    # The load jobs' ids: the summary and _SUCCESS wait for them like for the Parquet shards.
    return result.destination_load_jobid_pairs


def refresh_day(pipeline: beam.Pipeline, date: dt.date, output_root: str, job: RefreshUsersOptions, common,
                context: representations.ServingContext, settings: representations.InferenceSettings,
                versions: Dict[str, str], staged=lambda path: path) -> str:
    day = date.isoformat()
    generated_at = generation_time(job.generated_at, date)
    ttl = dt.timedelta(hours=job.ttl_hours)
    out_dir = staged(representations_dir(output_root, date))
    dead_dir = staged(dead_letter_dir(output_root, date))

    # 1. Read every user's snapshot as of the end of D, as Arrow tables.
    snapshots = pipeline | "ReadSnapshot" >> ReadFromParquetBatched(outputs.join(snapshot_dir(output_root, date),
                                                                                 "*.parquet"))
    # 2. Build the serving inputs with the training-example logic, many users per featurizer call; then a fusion
    #    break (Reshuffle) so that inference is spread over the workers by user.
    built = snapshots | "BuildServingInputs" >> representations.BuildServingInputs(context)
    # 3. Run the model: embedding + every scenario's tokens.
    inferred = built["inputs"] | "InferUsers" >> representations.InferUsers(settings, day)
    fresh = inferred["results"] | "ToRows" >> representations.ToRepresentationRows(
        context.layout, day, versions, generated_at, ttl)
    dead = (built["dead"], inferred["dead"]) | "AllDead" >> beam.Flatten()
    # 4. Users that failed keep yesterday's row while it is unexpired.
    previous_dir = representations_dir(output_root, date - dt.timedelta(days=1))
    if outputs.success_marker_exists(previous_dir):
        previous = pipeline | "ReadPrevious" >> ReadFromParquetBatched(outputs.join(previous_dir, "*.parquet"))
    else:
        previous = pipeline | "NoPrevious" >> beam.Create([])
    carried = (dead, previous) | "CarryOverFailed" >> representations.CarryOverFailed(generated_at)
    rows = (fresh, carried) | "AllRows" >> beam.Flatten()

    # 5. Write rows and dead letters, then the summary and _SUCCESS.
    writes = [rows | "WriteRows" >> outputs.WriteParquetShards(out_dir, schemas.USER_REPRESENTATIONS_SCHEMA,
                                                              job.representation_shards, key_columns=("user_id",)),
              dead | "WriteDead" >> outputs.WriteParquetShards(dead_dir, schemas.DEAD_LETTER_SCHEMA)]
    if job.sink == "bigquery":
        writes.append(write_to_bigquery(rows, common.bq_project, job.bq_output_dataset, date))
    users_in = (representations.USERS, day, outputs.IN, "")
    counts = ((snapshots | "CountIn" >> beam.Map(lambda table: (users_in, table.num_rows))),
              (fresh | "CountOut" >> outputs.CountRows(representations.USERS, day, outputs.OUT)),
              (dead | "CountDead" >> outputs.CountRows(representations.USERS, day, outputs.DEAD)),
              (carried | "CountCarried" >> outputs.CountRows(representations.USERS, day, outputs.STAT,
                                                             representations.CARRIED_OVER)))
    storage = fresh | "StorageFigures" >> beam.CombineGlobally(representations.StorageFigures())
    summary = (counts | "AllCounts" >> beam.Flatten()
               | "Summarize" >> outputs.SummarizeCounts(extra={
                   "job": "refresh_users", "date": day, "versions": versions, "sink": job.sink,
                   "generated_at": generated_at.isoformat(), "expires_at": (generated_at + ttl).isoformat(),
                   "decoding": {"scenarios": list(settings.scenarios), "top_n": settings.top_n,
                                "beam_size": settings.beam_size, "users_per_batch": settings.batch_size,
                                "constrained_to_catalogue": settings.catalogue_prefixes is not None}})
               | "AddStorage" >> beam.Map(lambda s, st: {**s, "storage": st},
                                          st=beam.pvalue.AsSingleton(storage)))
    _ = summary | "Finish" >> outputs.WriteSummaryAndSuccess(staged(representations_summary_path(output_root, date)),
                                                             [out_dir], after=writes)
    return out_dir


def check_options(options: PipelineOptions) -> None:
    common, job = options.view_as(TokenMindsOptions), options.view_as(RefreshUsersOptions)
    if not job.model:
        raise ValueError("--model is required: the checkpoint directory written by tokenminds_model.train")
    if not 0 < job.ttl_hours <= MAX_TTL_HOURS:
        raise ValueError(f"--ttl_hours={job.ttl_hours} must be > 0 and at most {MAX_TTL_HOURS} (a row must expire "
                         "after it is generated)")
    if job.top_n > job.beam_size:
        raise ValueError(f"--top_n={job.top_n} cannot exceed --beam_size={job.beam_size}")
    if job.sink == "bigquery":
        sources.validate_project_id(common.bq_project)
        sources.validate_dataset_id(job.bq_output_dataset)
    elif common.bq_project or job.bq_output_dataset:
        raise ValueError("--bq_project/--bq_output_dataset are read only with --sink=bigquery")


JOB = JobSpec(name="refresh_users", summary=__doc__.split("\n\n")[0],
              option_classes=(RefreshUsersOptions, SequenceOptions),
              shared=daily_plan.get_task("refresh_users").reads,
              ranges={**SEQUENCE_RANGES, "top_n": (1, None), "beam_size": (1, None),
                      "users_per_batch": (1, 1 << 16), "ttl_hours": (None, None), "representation_shards": (1, 10000)},
              check=check_options)


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(RefreshUsersOptions)
    sequence = sequence_config(options.view_as(SequenceOptions))
    dates = processing_dates(options)
    # Fail fast, before reading any data: artifacts, checkpoint and snapshots must exist and agree.
    artifacts = artifact_paths(options)
    layout = vocabulary_layout(*artifacts)
    model_version = check_model_matches(job.model, layout, examples.feature_spec(sequence, layout))
    for date in dates:
        require_success(snapshot_dir(common.output_root, date), f"history snapshot of {date}")
    for date in dates:
        generation_time(job.generated_at, date)  # a malformed --generated_at fails here, not in a worker
    versions = {"model": model_version, "vocabulary": representations.vocabulary_version(layout),
                "sid_model": layout.sid_model_version}
    batch_size = users_per_batch(options, job.model)

    def refresh(pipeline, date, day_outputs):
        prefix_len = sequence.sid_length(layout)
        catalogue = None if job.unconstrained else catalogue_prefixes(common.output_root, date, prefix_len,
                                                                      sequence.scenarios)
        settings = representations.InferenceSettings(
            model_dir=job.model, scenarios=tuple(sequence.scenarios), top_n=job.top_n, beam_size=job.beam_size,
            batch_size=batch_size, catalogue_prefixes=catalogue)
        context = representations.ServingContext(
            layout=layout, config=sequence, query_tokenizer_dir=artifacts[1], feature_transform_dir=artifacts[2],
            cutoff_ts_us=schemas.to_epoch_us(schemas.day_bounds(date)[1]), date=date.isoformat())
        return refresh_day(pipeline, date, common.output_root, job, common, context, settings, versions,
                           day_outputs.staged)

    root = common.output_root
    return run_per_day(
        options, dates, JOB.name, build_day=refresh,
        output_dirs=lambda date: [dead_letter_dir(root, date),
                                  schemas.run_summary_dir(root, schemas.USER_REPRESENTATIONS, date),
                                  representations_dir(root, date)],
        summary_path=lambda date: representations_summary_path(root, date))


def main(argv=None):
    for summary in run(argv):
        users = summary["tables"][representations.USERS][summary["date"]]
        storage = summary["storage"]
        print(f"{summary['date']}: users in {users['rows_in']} = refreshed {users['rows_out']} + dead "
              f"{users['rows_dead']} (carried over {summary['stats'].get('users.' + representations.CARRIED_OVER, 0)})"
              f"; {storage['tokens_per_user']:.1f} tokens/user, {storage['token_bytes_per_user']:.0f} B of tokens vs "
              f"{storage['embedding_bytes_per_user']:.0f} B of embedding per user")


if __name__ == "__main__":
    run_main(main)
