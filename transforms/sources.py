"""Reading one day's partition of an input table, from Parquet files or from BigQuery, behind one transform.

``ReadTable(table, date, source)`` yields the partition's rows as plain dicts whatever the source, so every later
step is source-agnostic. Rows are *not* trusted here: they go through ``ValidateRows`` next.

Parquet (the embedded default): ``<input_root>/<table>/date=YYYY-MM-DD/*.parquet``. The driver lists the partition
and reads each file's footer before the job starts, so a missing partition, an unreadable file or a missing
column fails at once with the file and column named, not as a stack trace from inside a worker.

BigQuery: Beam's ``ReadFromBigQuery`` cannot bind query parameters (apache/beam#20546), and SQL built by formatting
option values into strings is how injections happen. So the partition is selected by a parameterized query run with
the BigQuery client inside the job (``MaterializePartitionQuery``), into a temp table that ``ReadAllFromBigQuery``
then exports. Only identifiers (project, dataset, table), which BigQuery cannot parameterize, are put into the SQL
text, and only after validation against BigQuery's naming rules.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from typing import Callable, Dict, List, Optional, Sequence

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp.bigquery import ReadAllFromBigQuery, ReadFromBigQueryRequest
from apache_beam.io.parquetio import ReadAllFromParquet

from transforms import schemas


class InputContractError(ValueError):
    """An input partition that cannot be read at all (missing, unreadable, or without a required column)."""


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where input tables live. Built from pipeline options by ``pipelines.options.source_config``."""
    kind: str = "parquet"  # "parquet" | "bigquery"
    input_root: Optional[str] = None
    bq_project: Optional[str] = None
    bq_dataset: Optional[str] = None
    bq_temp_dataset: Optional[str] = None

    def __post_init__(self):
        if self.kind == "parquet":
            if not self.input_root:
                raise ValueError("--source=parquet needs --input_root")
        elif self.kind == "bigquery":
            validate_project_id(self.bq_project)
            validate_dataset_id(self.bq_dataset)
            if self.bq_temp_dataset:
                validate_dataset_id(self.bq_temp_dataset)
        else:
            raise ValueError(f"unknown source {self.kind!r}; expected 'parquet' or 'bigquery'")


# ---------------------------------------------------------------------------------------------------------------
# Parquet.
# ---------------------------------------------------------------------------------------------------------------
def list_partition_files(input_root: str, table: str, date: dt.date) -> List[str]:
    pattern = schemas.partition_dir(input_root, table, date) + "/*.parquet"
    matches = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in matches)


def check_partition_files(input_root: str, table: str, date: dt.date) -> List[str]:
    """The partition's files, after checking each file's footer against the contract. Raises InputContractError."""
    files = list_partition_files(input_root, table, date)
    if not files:
        raise InputContractError(
            f"{table}: no Parquet files for {date} under {schemas.partition_dir(input_root, table, date)}/ "
            "(an empty day must still have a partition, even an empty file)")
    required = schemas.REQUIRED_FIELDS[table]
    for path in files:
        try:
            with FileSystems.open(path) as handle:
                file_schema = pq.read_schema(handle)
        except Exception as err:  # pyarrow raises several types for a corrupt footer
            raise InputContractError(f"{table}: cannot read Parquet file {path}: {err}") from err
        missing = [name for name in required if name not in file_schema.names]
        if missing:
            raise InputContractError(f"{table}: file {path} lacks required column(s) {missing}; "
                                     f"it has {file_schema.names}")
    return files


class _ReadParquetPartition(beam.PTransform):
    def __init__(self, table: str, date: dt.date, input_root: str):
        super().__init__()
        self._table, self._date, self._input_root = table, date, input_root

    def expand(self, pbegin):
        files = check_partition_files(self._input_root, self._table, self._date)
        columns = list(schemas.input_schema(self._table).names)
        return (pbegin
                | "ListFiles" >> beam.Create(files)
                | "ReadFiles" >> ReadAllFromParquet(columns=columns, with_filename=False)
                # A file without an optional column yields rows without that key; the contract has every key.
                | "FillMissingColumns" >> beam.Map(lambda row, cols=tuple(columns): {c: row.get(c) for c in cols}))


# ---------------------------------------------------------------------------------------------------------------
# BigQuery.
# ---------------------------------------------------------------------------------------------------------------
# BigQuery naming rules: project ids are 6-30 chars of lowercase letters, digits and hyphens (optionally prefixed
# by a domain, "example.com:proj"); dataset and table ids are letters, digits and underscores.
_PROJECT_RE = re.compile(r"^(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")


def validate_project_id(project: Optional[str]) -> str:
    if not project or not _PROJECT_RE.match(project):
        raise ValueError(f"invalid BigQuery project id {project!r}")
    return project


def validate_dataset_id(dataset: Optional[str]) -> str:
    if not dataset or not _DATASET_RE.match(dataset):
        raise ValueError(f"invalid BigQuery dataset id {dataset!r}")
    return dataset


@dataclasses.dataclass(frozen=True)
class QueryParameter:
    name: str
    type: str  # a BigQuery standard SQL type name, e.g. "DATE", "TIMESTAMP"
    value: object


@dataclasses.dataclass(frozen=True)
class PartitionQuery:
    """A parameterized query selecting one day of one input table, and the temp table it materializes into."""
    table: str
    sql: str
    parameters: Sequence[QueryParameter]
    destination: str  # "project.dataset.table"

    def job_config(self):
        """The client's QueryJobConfig: parameters bound by BigQuery, results replacing the temp table."""
        from google.cloud import bigquery  # imported lazily: only the BigQuery source needs the client

        return bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter(p.name, p.type, p.value) for p in self.parameters],
            destination=self.destination,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            use_legacy_sql=False,
        )


def build_partition_query(project: str, dataset: str, table: str, date: dt.date,
                          temp_dataset: Optional[str] = None) -> PartitionQuery:
    """The query for one day of ``table``. Option values only ever reach BigQuery as parameters or validated ids."""
    validate_project_id(project)
    validate_dataset_id(dataset)
    validate_dataset_id(temp_dataset or dataset)
    if table not in schemas.INPUT_TABLES:
        raise ValueError(f"unknown input table {table!r}; expected one of {schemas.INPUT_TABLES}")
    if not isinstance(date, dt.date):
        raise TypeError(f"date must be a datetime.date, got {type(date).__name__}")
    columns = ", ".join(f"`{name}`" for name in schemas.input_schema(table).names)
    partition_column = schemas.PARTITION_COLUMN[table]
    project_name = project.split(":")[-1]
    sql = (f"SELECT {columns} FROM `{project_name}.{dataset}.{table}` "
           f"WHERE DATE(`{partition_column}`, 'UTC') = @partition_date")
    # Temp tables are named by content so that a rerun of the same day overwrites its own table.
    digest = hashlib.sha256(f"{project_name}.{dataset}.{table}|{date.isoformat()}".encode()).hexdigest()[:12]
    destination = f"{project_name}.{temp_dataset or dataset}.tokenminds_tmp_{table}_{date:%Y%m%d}_{digest}"
    return PartitionQuery(table=table, sql=sql, parameters=(QueryParameter("partition_date", "DATE", date),),
                          destination=destination)


def _default_bigquery_client(project: str):
    from google.cloud import bigquery

    return bigquery.Client(project=project)


class MaterializePartitionQuery(beam.DoFn):
    """Runs a PartitionQuery with the BigQuery client and emits a request to read its result table.

    ``client_factory`` is the client boundary: production uses ``google.cloud.bigquery.Client``; tests pass a fake.
    """

    def __init__(self, project: str, client_factory: Callable = _default_bigquery_client):
        super().__init__()
        self._project = project
        self._client_factory = client_factory

    def setup(self):
        self._client = self._client_factory(self._project)

    def process(self, query: PartitionQuery):
        job = self._client.query(query.sql, job_config=query.job_config())
        job.result()  # waits; raises with BigQuery's own message on failure
        project, dataset, table = query.destination.split(".")
        yield ReadFromBigQueryRequest(table=f"{project}:{dataset}.{table}")


class _ReadBigQueryPartition(beam.PTransform):
    def __init__(self, table: str, date: dt.date, source: SourceConfig):
        super().__init__()
        self._query = build_partition_query(source.bq_project, source.bq_dataset, table, date,
                                            source.bq_temp_dataset)
        self._project = source.bq_project

    def expand(self, pbegin):
        return (pbegin
                | "PartitionQuery" >> beam.Create([self._query])
                | "RunParameterizedQuery" >> beam.ParDo(MaterializePartitionQuery(self._project))
                | "ReadResultTable" >> ReadAllFromBigQuery())


# ---------------------------------------------------------------------------------------------------------------
# The one entry point pipelines use.
# ---------------------------------------------------------------------------------------------------------------
class ReadTable(beam.PTransform):
    """One day's partition of an input table as dicts keyed by the contract's column names."""

    def __init__(self, table: str, date: dt.date, source: SourceConfig):
        super().__init__()
        if table not in schemas.INPUT_TABLES:
            raise ValueError(f"unknown input table {table!r}; expected one of {schemas.INPUT_TABLES}")
        self._table, self._date, self._source = table, date, source

    def expand(self, pbegin):
        if self._source.kind == "parquet":
            return pbegin | _ReadParquetPartition(self._table, self._date, self._source.input_root)
        return pbegin | _ReadBigQueryPartition(self._table, self._date, self._source)


def source_summary(source: SourceConfig) -> Dict[str, Optional[str]]:
    """What a run read from, for run summaries (no credentials are ever part of a SourceConfig)."""
    return dataclasses.asdict(source)
