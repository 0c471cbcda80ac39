"""Sources up to the client boundary: parameterized BigQuery queries (no network), Parquet partition checks."""
import datetime as dt

import apache_beam as beam
import pytest
from apache_beam.io.gcp.bigquery import ReadFromBigQueryRequest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.cloud import bigquery

from pipelines.options import processing_dates, source_config
from tests.helpers import DAY, FNAPI, watch, write_partition
from transforms import schemas
from transforms.sources import (InputContractError, MaterializePartitionQuery, ReadTable, SourceConfig,
                                build_partition_query, check_partition_files)


def test_partition_query_binds_the_date_as_a_parameter():
    query = build_partition_query("my-project", "events", schemas.WATCH_EVENTS, DAY)
    assert "@partition_date" in query.sql
    assert "2026" not in query.sql  # the date never appears in the SQL text
    assert query.sql.startswith("SELECT `user_id`, `video_id`, `event_ts`")
    assert "FROM `my-project.events.watch_events`" in query.sql
    config = query.job_config()
    assert isinstance(config, bigquery.QueryJobConfig)
    [param] = config.query_parameters
    assert (param.name, param.type_, param.value) == ("partition_date", "DATE", DAY)
    assert config.write_disposition == "WRITE_TRUNCATE" and config.use_legacy_sql is False


def test_partition_query_filters_videos_on_publish_ts_and_names_temp_table_by_day():
    a = build_partition_query("my-project", "events", schemas.VIDEOS, DAY, temp_dataset="scratch")
    b = build_partition_query("my-project", "events", schemas.VIDEOS, DAY, temp_dataset="scratch")
    c = build_partition_query("my-project", "events", schemas.VIDEOS, DAY + dt.timedelta(days=1), "scratch")
    assert "DATE(`publish_ts`, 'UTC') = @partition_date" in a.sql
    assert a.destination == b.destination != c.destination  # reruns overwrite their own temp table
    assert a.destination.startswith("my-project.scratch.tokenminds_tmp_videos_20260101_")


@pytest.mark.parametrize("project,dataset,table", [
    ("my-project`; DROP TABLE x; --", "events", schemas.WATCH_EVENTS),
    ("my-project", "events.other", schemas.WATCH_EVENTS),
    ("my-project", "ev ents", schemas.WATCH_EVENTS),
    ("my-project", "events", "watch_events` WHERE 1=1 --"),
    ("ab", "events", schemas.WATCH_EVENTS),
    ("", "events", schemas.WATCH_EVENTS),
])
def test_identifiers_that_are_not_bigquery_names_are_refused(project, dataset, table):
    with pytest.raises(ValueError):
        build_partition_query(project, dataset, table, DAY)


class FakeJob:
    def __init__(self):
        self.waited = False

    def result(self):
        self.waited = True


class FakeClient:
    calls = []

    def __init__(self, project):
        self.project = project

    def query(self, sql, job_config):
        job = FakeJob()
        FakeClient.calls.append((self.project, sql, job_config, job))
        return job


def test_materialize_runs_parameterized_job_then_requests_its_table():
    FakeClient.calls = []
    query = build_partition_query("my-project", "events", schemas.SEARCH_EVENTS, DAY)
    fn = MaterializePartitionQuery("my-project", client_factory=FakeClient)
    fn.setup()
    [request] = list(fn.process(query))
    [(project, sql, config, job)] = FakeClient.calls
    assert project == "my-project" and sql == query.sql and job.waited
    assert config.destination.table_id.startswith("tokenminds_tmp_search_events_20260101_")
    assert isinstance(request, ReadFromBigQueryRequest)
    assert request.table == query.destination.replace("my-project.", "my-project:", 1)


def test_bigquery_source_options_are_validated_before_any_job():
    with pytest.raises(ValueError, match="project"):
        source_config(PipelineOptions(["--source=bigquery", "--bq_project=x", "--bq_dataset=events"]))
    cfg = source_config(PipelineOptions(["--source=bigquery", "--bq_project=my-project", "--bq_dataset=events"]))
    assert cfg.kind == "bigquery" and cfg.input_root is None


def test_processing_dates_single_day_or_inclusive_range():
    assert processing_dates(PipelineOptions(["--date=2026-01-03"])) == [dt.date(2026, 1, 3)]
    days = processing_dates(PipelineOptions(["--start_date=2026-01-30", "--end_date=2026-02-02"]))
    assert days == [dt.date(2026, 1, 30) + dt.timedelta(days=i) for i in range(4)]
    for bad in (["--date=2026-1-3"], [], ["--date=2026-01-03", "--start_date=2026-01-01"],
                ["--start_date=2026-01-05", "--end_date=2026-01-01"]):
        with pytest.raises(ValueError):
            processing_dates(PipelineOptions(bad))


def test_missing_partition_fails_before_the_job_naming_the_directory(tmp_path):
    with pytest.raises(InputContractError, match=r"watch_events/date=2026-01-01"):
        check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY)


def test_file_without_a_required_column_is_named_with_the_column(tmp_path):
    schema = schemas.WATCH_EVENTS_SCHEMA.remove(schemas.WATCH_EVENTS_SCHEMA.get_field_index("scenario"))
    row = watch()
    del row["scenario"]
    path = write_partition(tmp_path, schemas.WATCH_EVENTS, DAY, [row], schema=schema)
    with pytest.raises(InputContractError, match=r"part-00000\.parquet lacks required column\(s\) \['scenario'\]"):
        check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY)
    assert path.endswith("part-00000.parquet")


def test_corrupt_parquet_file_is_named(tmp_path):
    path = write_partition(tmp_path, schemas.WATCH_EVENTS, DAY, [watch()])
    with open(path, "wb") as f:
        f.write(b"PAR1 this is not a parquet file")
    with pytest.raises(InputContractError, match="cannot read Parquet file .*part-00000.parquet"):
        check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY)


def test_read_table_fills_optional_columns_missing_from_a_file(tmp_path):
    schema = schemas.WATCH_EVENTS_SCHEMA.remove(schemas.WATCH_EVENTS_SCHEMA.get_field_index("device"))
    row = watch()
    del row["device"]
    write_partition(tmp_path, schemas.WATCH_EVENTS, DAY, [row], schema=schema)
    with TestPipeline(options=PipelineOptions(FNAPI)) as p:
        rows = p | ReadTable(schemas.WATCH_EVENTS, DAY, SourceConfig(kind="parquet", input_root=str(tmp_path)))
        assert_that(rows | beam.Map(lambda r: (sorted(r), r["device"])),
                    equal_to([(sorted(schemas.WATCH_EVENTS_SCHEMA.names), None)]))
