"""Sources up to the client boundary: parameterized BigQuery queries (no network), Parquet partition checks."""
import datetime as dt
import os
import shutil

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.gcp.bigquery import ReadFromBigQueryRequest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.cloud import bigquery

from pipelines.options import processing_dates, source_config
from tests.helpers import DAY, FNAPI, watch, write_partition
from transforms import schemas, sources
from transforms.sources import (InputContractError, MaterializePartitionQuery, ReadTable, SourceConfig,
                                build_partition_query, check_partition_files, list_partition_files)


def test_partition_query_binds_the_date_as_a_parameter():
    query = build_partition_query("my-project", "events", schemas.WATCH_EVENTS, DAY)
    assert "@partition_date" in query.sql
    assert "2026" not in query.sql  # the date never appears in the SQL text
    assert query.sql.startswith("SELECT `user_id`, `video_id`, `event_ts`")
    assert "FROM `my-project`.`events`.`watch_events` WHERE" in query.sql
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


# ---------------------------------------------------------------------------------------------------------------
# BigQuery identifiers: whole-string checks, domain-scoped projects kept whole.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("project,dataset", [
    ("my-project\n", "events"), ("my-project", "events\n"), ("example.com:my-project\n", "events"),
    ("my-project\n; DROP TABLE x", "events"), ("ex..com:my-project", "events"), (":my-project", "events")])
def test_identifiers_with_a_trailing_newline_or_junk_are_refused(project, dataset):
    with pytest.raises(ValueError, match="invalid BigQuery"):
        build_partition_query(project, dataset, schemas.WATCH_EVENTS, DAY)
    with pytest.raises(ValueError, match="invalid BigQuery"):
        SourceConfig(kind="bigquery", bq_project=project, bq_dataset=dataset)


def test_temp_dataset_with_a_trailing_newline_is_refused():
    with pytest.raises(ValueError, match="invalid BigQuery dataset"):
        build_partition_query("my-project", "events", schemas.WATCH_EVENTS, DAY, temp_dataset="scratch\n")


def test_domain_scoped_project_keeps_its_domain_in_sql_and_temp_table():
    query = build_partition_query("example.com:my-project", "events", schemas.WATCH_EVENTS, DAY,
                                  temp_dataset="scratch")
    assert "FROM `example.com:my-project`.`events`.`watch_events` WHERE" in query.sql
    assert query.destination.startswith("example.com:my-project.scratch.tokenminds_tmp_watch_events_20260101_")
    other = build_partition_query("other.org:my-project", "events", schemas.WATCH_EVENTS, DAY, "scratch")
    assert query.destination.rsplit("_", 1)[1] != other.destination.rsplit("_", 1)[1]  # the domain is in the digest
    destination = query.job_config().destination
    assert (destination.project, destination.dataset_id) == ("example.com:my-project", "scratch")
    assert destination.table_id.startswith("tokenminds_tmp_watch_events_20260101_")


def test_domain_scoped_project_round_trips_through_the_client_and_the_read_request():
    from apache_beam.io.gcp.bigquery_tools import parse_table_reference

    FakeClient.calls = []
    query = build_partition_query("example.com:my-project", "events", schemas.SEARCH_EVENTS, DAY, "scratch")
    fn = MaterializePartitionQuery("example.com:my-project", client_factory=FakeClient)
    fn.setup()
    [request] = list(fn.process(query))
    [(project, sql, config, job)] = FakeClient.calls
    assert project == "example.com:my-project" and job.waited and "`example.com:my-project`" in sql
    assert config.destination.project == "example.com:my-project"
    assert request.table.startswith("example.com:my-project:scratch.tokenminds_tmp_search_events_20260101_")
    request.validate()
    ref = parse_table_reference(request.table)
    assert (ref.projectId, ref.datasetId, ref.tableId) == (
        "example.com:my-project", "scratch", config.destination.table_id)


def test_plain_project_read_request_parses_back_to_the_query_destination():
    from apache_beam.io.gcp.bigquery_tools import parse_table_reference

    FakeClient.calls = []
    query = build_partition_query("my-project", "events", schemas.VIDEOS, DAY)
    fn = MaterializePartitionQuery("my-project", client_factory=FakeClient)
    fn.setup()
    [request] = list(fn.process(query))
    [(_, sql, config, _)] = FakeClient.calls
    assert "FROM `my-project`.`events`.`videos` WHERE" in sql
    ref = parse_table_reference(request.table)
    assert (ref.projectId, ref.datasetId, ref.tableId) == ("my-project", "events", config.destination.table_id)


# ---------------------------------------------------------------------------------------------------------------
# Parquet: invalid UTF-8 in string columns, hidden files, empty days.
# ---------------------------------------------------------------------------------------------------------------
def write_raw_partition(root, table, rows, name="part-00000.parquet", schema=None):
    """Like write_partition, but string columns may hold arbitrary bytes: the file then has invalid UTF-8."""
    schema = schema or schemas.input_schema(table)
    loose = pa.schema([f.with_type(pa.binary()) if f.type == pa.string() else f for f in schema])
    directory = schemas.partition_dir(str(root), table, DAY)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    pq.write_table(pa.Table.from_pylist(rows, schema=loose).cast(schema, safe=False), path)
    return path


def read_rows(root, table, check):
    """Reads the partition through ReadTable; ``check(rows)`` runs on all rows (inside the pipeline)."""
    with TestPipeline(options=PipelineOptions(FNAPI)) as p:
        assert_that(p | ReadTable(table, DAY, SourceConfig(kind="parquet", input_root=str(root))), check)


def row_count(n):
    def check(rows):
        assert len(rows) == n, rows
    return check


def test_invalid_utf8_in_a_string_column_reaches_validation_as_bytes(tmp_path):
    rows = [watch(user_id=b"u1"), watch(user_id=b"u\xff2", surface=b"ho\xc3me"), watch(user_id=b"u3",
                                                                                      device=b"\xed\xa0\x80")]
    path = write_raw_partition(tmp_path, schemas.WATCH_EVENTS, rows)
    assert pq.read_table(path).schema.field("user_id").type == pa.string()
    with pytest.raises(UnicodeDecodeError):
        pq.read_table(path).to_pylist()  # the file really holds invalid UTF-8 in string columns

    def check(rows):
        got = sorted(rows, key=lambda r: repr(r["user_id"]))
        assert [(r["user_id"], r["surface"], r["device"]) for r in got] == [
            ("u1", "home", "IOS"), ("u3", "home", b"\xed\xa0\x80"), (b"u\xff2", b"ho\xc3me", "IOS")], got
        assert all(list(r) == list(schemas.WATCH_EVENTS_SCHEMA.names) for r in got)

    read_rows(tmp_path, schemas.WATCH_EVENTS, check)


def test_arrow_to_rows_keeps_undecodable_values_of_any_string_type_as_bytes():
    bad = pa.array([b"ok", b"\xff", None], pa.binary())
    table = pa.table({
        "s": bad.cast(pa.string(), safe=False),
        "ls": bad.cast(pa.large_string(), safe=False),
        "d": pa.DictionaryArray.from_arrays(pa.array([0, 1, None]), bad.cast(pa.string(), safe=False)[:2]),
        "nested": pa.array([[b"a"], [b"\xfe", b"b"], None], pa.list_(pa.binary())).cast(pa.list_(pa.string()),
                                                                                       safe=False),
        "n": pa.array([1.0, 2.0, None]),
    })
    assert sources.table_to_rows(table, ["s", "ls", "d", "nested", "n", "absent"]) == [
        {"s": "ok", "ls": "ok", "d": "ok", "nested": ["a"], "n": 1.0, "absent": None},
        {"s": b"\xff", "ls": b"\xff", "d": b"\xff", "nested": [b"\xfe", "b"], "n": 2.0, "absent": None},
        {"s": None, "ls": None, "d": None, "nested": None, "n": None, "absent": None},
    ]


def test_hidden_files_in_a_partition_are_not_data(tmp_path):
    path = write_partition(tmp_path, schemas.WATCH_EVENTS, DAY, [watch()])
    directory = os.path.dirname(path)
    for hidden in (".part-00000.parquet", "_part-00000.parquet", "_temporary.parquet", ".crc.parquet"):
        shutil.copy(path, os.path.join(directory, hidden))
    assert list_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY) == [path]
    assert check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY) == [path]
    read_rows(tmp_path, schemas.WATCH_EVENTS, row_count(1))


def test_only_hidden_files_is_no_data_and_the_error_says_they_are_ignored(tmp_path):
    path = write_partition(tmp_path, schemas.WATCH_EVENTS, DAY, [watch()], name="_part-00000.parquet")
    with pytest.raises(InputContractError, match="ignored") as err:
        check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY)
    assert path.endswith("_part-00000.parquet")
    assert "_SUCCESS" in str(err.value)


def test_missing_partition_error_gives_advice_that_works(tmp_path):
    with pytest.raises(InputContractError) as err:
        check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY)
    message = str(err.value)
    assert "even an empty file" not in message
    assert "_SUCCESS" in message and "zero-row Parquet file" in message
    # Following the advice: the partition directory with a _SUCCESS marker and no data files is an empty day.
    directory = schemas.partition_dir(str(tmp_path), schemas.WATCH_EVENTS, DAY)
    os.makedirs(directory)
    open(os.path.join(directory, "_SUCCESS"), "w").close()
    assert check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY) == []
    read_rows(tmp_path, schemas.WATCH_EVENTS, row_count(0))


def test_partition_directory_without_data_or_success_marker_is_still_an_error(tmp_path):
    os.makedirs(schemas.partition_dir(str(tmp_path), schemas.WATCH_EVENTS, DAY))
    with pytest.raises(InputContractError, match="no Parquet files for 2026-01-01"):
        check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY)


def test_zero_row_parquet_file_is_an_empty_day(tmp_path):
    path = write_partition(tmp_path, schemas.SEARCH_EVENTS, DAY, [])
    assert check_partition_files(str(tmp_path), schemas.SEARCH_EVENTS, DAY) == [path]
    read_rows(tmp_path, schemas.SEARCH_EVENTS, row_count(0))


def test_zero_byte_parquet_file_is_an_error_naming_the_file(tmp_path):
    write_partition(tmp_path, schemas.WATCH_EVENTS, DAY, [watch()])
    empty = os.path.join(schemas.partition_dir(str(tmp_path), schemas.WATCH_EVENTS, DAY), "part-00001.parquet")
    open(empty, "wb").close()
    open(os.path.join(os.path.dirname(empty), "_SUCCESS"), "w").close()  # a marker does not excuse a bad file
    with pytest.raises(InputContractError, match=r"part-00001\.parquet is empty \(0 bytes\)"):
        check_partition_files(str(tmp_path), schemas.WATCH_EVENTS, DAY)


def test_timestamps_outside_pythons_range_reach_validation_as_raw_counts(tmp_path):
    # pyarrow cannot turn these into datetimes (OverflowError); the whole job used to fail on one such value.
    table = pa.table({"event_ts": pa.array([0, 2**62, None], schemas.TIMESTAMP), "user_id": ["a", "b", "c"]})
    rows = sources.table_to_rows(table, ["user_id", "event_ts"])
    assert [r["event_ts"] for r in rows] == [dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc), 2**62, None]
    from transforms import validation

    assert validation.validate_row(schemas.WATCH_EVENTS, watch(event_ts=2**62), DAY)[1].reason == \
        validation.BAD_TIMESTAMP
