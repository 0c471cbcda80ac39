"""Reading one day's partition of an input table, from Parquet files or from BigQuery, behind one transform.

``ReadTable(table, date, source)`` yields the partition's rows as plain dicts whatever the source, so every later
step is source-agnostic (``ReadTableBatches``: a range's partitions in one read, as Arrow batches). Rows are *not*
trusted here: they go through ``transforms.validation`` next.

Parquet (the embedded default): ``<input_root>/<table>/date=YYYY-MM-DD/*.parquet``. Files whose names start with
``.`` or ``_`` are not data (the Hadoop/Spark convention: ``_SUCCESS``, ``.part-*.crc``, writers' temp files). The
driver lists the partition and reads each file's footer before the job starts, so a missing partition, an
unreadable (or zero-byte) file or a missing column fails at once with the file and column named, not as a stack
trace from inside a worker. An empty day is a partition directory holding a ``_SUCCESS`` marker and no data files,
or zero-row Parquet files with the schema.

String values are decoded here, one by one: a value that is not UTF-8 is passed on as its raw ``bytes`` (for
validation to dead-letter with a reason) instead of failing the whole file.

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
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp.bigquery import ReadAllFromBigQuery, ReadFromBigQueryRequest
from apache_beam.io.parquetio import ReadAllFromParquetBatched

from transforms import schemas
from transforms.outputs import SUCCESS_MARKER


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
def is_hidden_file(path: str) -> bool:
    """Names starting with ``.`` or ``_`` are markers, checksums or temp files, never data (Hadoop/Spark)."""
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def _match_partition_files(input_root: str, table: str, date: dt.date):
    pattern = schemas.partition_dir(input_root, table, date) + "/*.parquet"
    matches = FileSystems.match([pattern])[0].metadata_list
    return sorted((m for m in matches if not is_hidden_file(m.path)), key=lambda m: m.path)


def list_partition_files(input_root: str, table: str, date: dt.date) -> List[str]:
    """The partition's data files: ``*.parquet`` except hidden ones (names starting with ``.`` or ``_``)."""
    return [m.path for m in _match_partition_files(input_root, table, date)]


def check_partition_files(input_root: str, table: str, date: dt.date) -> List[str]:
    """The partition's files, after checking each file's footer against the contract. Raises InputContractError.

    An empty list means an empty day: the partition directory exists with a ``_SUCCESS`` marker and no data files.
    """
    directory = schemas.partition_dir(input_root, table, date)
    matches = _match_partition_files(input_root, table, date)
    if not matches:
        if FileSystems.exists(FileSystems.join(directory, SUCCESS_MARKER)):
            return []
        raise InputContractError(
            f"{table}: no Parquet files for {date} under {directory}/ (files named .* or _* are ignored; an empty "
            f"day needs the partition directory with a {SUCCESS_MARKER} marker, or a zero-row Parquet file with "
            "the table's schema)")
    required = schemas.REQUIRED_FIELDS[table]
    for match in matches:
        path = match.path
        if match.size_in_bytes == 0:
            raise InputContractError(f"{table}: Parquet file {path} is empty (0 bytes), so not Parquet; an empty "
                                     f"day is a zero-row Parquet file with the schema, or no data files and a "
                                     f"{SUCCESS_MARKER} marker")
        try:
            with FileSystems.open(path) as handle:
                file_schema = pq.read_schema(handle)
        except Exception as err:  # pyarrow raises several types for a corrupt footer
            raise InputContractError(f"{table}: cannot read Parquet file {path}: {err}") from err
        missing = [name for name in required if name not in file_schema.names]
        if missing:
            raise InputContractError(f"{table}: file {path} lacks required column(s) {missing}; "
                                     f"it has {file_schema.names}")
    return [m.path for m in matches]


def _without_strings(arrow_type: pa.DataType) -> pa.DataType:
    """``arrow_type`` with every string type replaced by its binary twin (a zero-copy cast), nested types too."""
    if pa.types.is_string(arrow_type):
        return pa.binary()
    if pa.types.is_large_string(arrow_type):
        return pa.large_binary()
    if pa.types.is_string_view(arrow_type):
        return pa.binary_view()
    if pa.types.is_dictionary(arrow_type):
        return _without_strings(arrow_type.value_type)  # decoded to dense values
    if pa.types.is_list(arrow_type):
        return pa.list_(arrow_type.value_field.with_type(_without_strings(arrow_type.value_type)))
    if pa.types.is_large_list(arrow_type):
        return pa.large_list(arrow_type.value_field.with_type(_without_strings(arrow_type.value_type)))
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.list_(arrow_type.value_field.with_type(_without_strings(arrow_type.value_type)),
                        arrow_type.list_size)
    if pa.types.is_struct(arrow_type):
        return pa.struct([f.with_type(_without_strings(f.type)) for f in arrow_type])
    if pa.types.is_map(arrow_type):
        return pa.map_(_without_strings(arrow_type.key_type), _without_strings(arrow_type.item_type))
    return arrow_type


def _decode_strings(value, arrow_type: pa.DataType):
    """A value read as ``_without_strings(arrow_type)``, with its strings decoded where they are UTF-8."""
    if value is None:
        return None
    if pa.types.is_dictionary(arrow_type):
        return _decode_strings(value, arrow_type.value_type)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value  # left as bytes: validation dead-letters it with the column named
    if (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
            or pa.types.is_fixed_size_list(arrow_type)):
        return [_decode_strings(item, arrow_type.value_type) for item in value]
    if pa.types.is_struct(arrow_type):
        return {f.name: _decode_strings(value.get(f.name), f.type) for f in arrow_type}
    if pa.types.is_map(arrow_type):
        return [(_decode_strings(k, arrow_type.key_type), _decode_strings(item, arrow_type.item_type))
                for k, item in value]
    return value


def _temporal_value(scalar):
    try:
        return scalar.as_py()
    except (OverflowError, ValueError):
        return scalar.value  # outside Python's datetime range: the raw count, which validation rejects


def column_values(column) -> list:
    """One Arrow column as Python values, never raising for a value's content: strings that are not UTF-8 come out
    as ``bytes``, and times outside Python's datetime range as their raw integer count."""
    try:
        return column.to_pylist()  # the fast path: every value converts
    except UnicodeDecodeError:
        raw = column.cast(_without_strings(column.type)).to_pylist()
        return [_decode_strings(value, column.type) for value in raw]
    except (OverflowError, ValueError):
        if pa.types.is_temporal(column.type):
            return [_temporal_value(scalar) for scalar in column]
        raise


def table_to_rows(table: pa.Table, columns: Sequence[str]) -> List[Dict]:
    """Rows of an Arrow table as dicts with exactly ``columns`` as keys (absent columns are None), in that order."""
    nulls = [None] * table.num_rows
    values = [column_values(table.column(name)) if name in table.column_names else nulls for name in columns]
    return [dict(zip(columns, row)) for row in zip(*values)] if columns else [{} for _ in range(table.num_rows)]


class _ArrowToRows(beam.DoFn):
    """Each Arrow table (one row group) to contract-keyed dicts; a file without an optional column gets None."""

    def __init__(self, columns: Sequence[str]):
        super().__init__()
        self._columns = tuple(columns)

    def process(self, table: pa.Table):
        yield from table_to_rows(table, self._columns)


class _ReadParquetPartition(beam.PTransform):
    def __init__(self, table: str, date: dt.date, input_root: str):
        super().__init__()
        self._table, self._date, self._input_root = table, date, input_root

    def expand(self, pbegin):
        files = check_partition_files(self._input_root, self._table, self._date)
        columns = list(schemas.input_schema(self._table).names)
        # Row groups as Arrow tables, decoded here rather than by Beam's ReadAllFromParquet, whose to_pydict()
        # raises on the first invalid UTF-8 string and so fails the whole job.
        return (pbegin
                | "ListFiles" >> beam.Create(files)
                | "ReadFiles" >> ReadAllFromParquetBatched(columns=columns)
                | "ToRows" >> beam.ParDo(_ArrowToRows(columns)))


class _KeyBatchByPartition(beam.DoFn):
    """(file, Arrow row group) to ((table, date), row group), the partition looked up by the file's path."""

    def __init__(self, partition_of_file: Dict[str, tuple]):
        super().__init__()
        self._partition_of_file = partition_of_file

    def process(self, named_batch):
        path, batch = named_batch
        if batch.num_rows:
            yield self._partition_of_file[path], batch


class _ReadParquetRange(beam.PTransform):
    def __init__(self, table: str, dates: Sequence[dt.date], input_root: str):
        super().__init__()
        self._table, self._dates, self._input_root = table, list(dates), input_root

    def expand(self, pbegin):
        # Every partition is checked (footers, columns) while the job is built, before anything is written.
        partition_of_file = {path: (self._table, date.isoformat()) for date in self._dates
                             for path in check_partition_files(self._input_root, self._table, date)}
        columns = list(schemas.input_schema(self._table).names)
        return (pbegin
                | "ListFiles" >> beam.Create(sorted(partition_of_file))
                | "ReadFiles" >> ReadAllFromParquetBatched(columns=columns, with_filename=True)
                | "ByPartition" >> beam.ParDo(_KeyBatchByPartition(partition_of_file)))


# ---------------------------------------------------------------------------------------------------------------
# BigQuery.
# ---------------------------------------------------------------------------------------------------------------
# BigQuery naming rules: project ids are 6-30 chars of lowercase letters, digits and hyphens, optionally prefixed
# by a domain ("example.com:my-project", a domain-scoped project); dataset and table ids are letters, digits and
# underscores. Checked with fullmatch: "$" in a re.match pattern would also accept a trailing newline.
_DOMAIN = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
_PROJECT_RE = re.compile(rf"(?:{_DOMAIN}:)?[a-z][a-z0-9-]{{4,28}}[a-z0-9]")
_DATASET_RE = re.compile(r"[A-Za-z0-9_]{1,1024}")


def validate_project_id(project: Optional[str]) -> str:
    if not isinstance(project, str) or not _PROJECT_RE.fullmatch(project):
        raise ValueError(f"invalid BigQuery project id {project!r}")
    return project


def validate_dataset_id(dataset: Optional[str]) -> str:
    if not isinstance(dataset, str) or not _DATASET_RE.fullmatch(dataset):
        raise ValueError(f"invalid BigQuery dataset id {dataset!r}")
    return dataset


def quote_table_path(project: str, dataset: str, table: str) -> str:
    """A GoogleSQL table path with every part in backticks: a domain-scoped project stays whole, colon included
    (```example.com:my-project`.`events`.`watch_events```). Only for ids that passed validation (no backticks)."""
    return ".".join(f"`{part}`" for part in (project, dataset, table))


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
    destination_project: str  # the whole project id, "example.com:" domain included where there is one
    destination_dataset: str
    destination_table: str

    @property
    def destination(self) -> str:
        """The temp table as "project.dataset.table" (the client's standard-SQL form; it keeps a domain prefix)."""
        return f"{self.destination_project}.{self.destination_dataset}.{self.destination_table}"

    @property
    def read_table_spec(self) -> str:
        """The temp table as Beam's "project:dataset.table" (for a domain-scoped project,
        "example.com:my-project:dataset.table", which ``bigquery_tools.parse_table_reference`` splits correctly)."""
        return f"{self.destination_project}:{self.destination_dataset}.{self.destination_table}"

    def job_config(self):
        """The client's QueryJobConfig: parameters bound by BigQuery, results replacing the temp table."""
        from google.cloud import bigquery  # imported lazily: only the BigQuery source needs the client

        # A TableReference built from its parts, not parsed from a string, so a domain-scoped project stays whole.
        destination = bigquery.DatasetReference(self.destination_project, self.destination_dataset).table(
            self.destination_table)
        return bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter(p.name, p.type, p.value) for p in self.parameters],
            destination=destination,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            use_legacy_sql=False,
        )


def build_partition_query(project: str, dataset: str, table: str, date: dt.date,
                          temp_dataset: Optional[str] = None) -> PartitionQuery:
    """The query for one day of ``table``. Option values only ever reach BigQuery as parameters or validated ids."""
    validate_project_id(project)
    validate_dataset_id(dataset)
    temp_dataset = validate_dataset_id(temp_dataset or dataset)
    if table not in schemas.INPUT_TABLES:
        raise ValueError(f"unknown input table {table!r}; expected one of {schemas.INPUT_TABLES}")
    if not isinstance(date, dt.date):
        raise TypeError(f"date must be a datetime.date, got {type(date).__name__}")
    columns = ", ".join(f"`{name}`" for name in schemas.input_schema(table).names)
    partition_column = schemas.PARTITION_COLUMN[table]
    sql = (f"SELECT {columns} FROM {quote_table_path(project, dataset, table)} "
           f"WHERE DATE(`{partition_column}`, 'UTC') = @partition_date")
    # Temp tables are named by content so that a rerun of the same day overwrites its own table.
    digest = hashlib.sha256(f"{project}.{dataset}.{table}|{date.isoformat()}".encode()).hexdigest()[:12]
    return PartitionQuery(table=table, sql=sql, parameters=(QueryParameter("partition_date", "DATE", date),),
                          destination_project=project, destination_dataset=temp_dataset,
                          destination_table=f"tokenminds_tmp_{table}_{date:%Y%m%d}_{digest}")


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
        yield ReadFromBigQueryRequest(table=query.read_table_spec)


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


class ReadTableBatches(beam.PTransform):
    """Every partition of one input table over ``dates``, read in one step, as ``((table, "YYYY-MM-DD"), batch)``.

    From Parquet a batch is an Arrow table (one row group, strings not yet decoded: ``validation.validate_batch``
    reads them as ``table_to_rows`` would); from BigQuery a list of row dicts (one parameterized query per day, see
    above). Range jobs use this instead of one ``ReadTable`` per day, so a long range is one read, not one branch
    per date.
    """

    ROWS_PER_BATCH = 10_000  # for the BigQuery rows, which come one by one

    def __init__(self, table: str, dates: Sequence[dt.date], source: SourceConfig):
        super().__init__()
        if table not in schemas.INPUT_TABLES:
            raise ValueError(f"unknown input table {table!r}; expected one of {schemas.INPUT_TABLES}")
        self._table, self._dates, self._source = table, list(dates), source

    def expand(self, pbegin):
        if self._source.kind == "parquet":
            return pbegin | _ReadParquetRange(self._table, self._dates, self._source.input_root)
        days = [pbegin | f"Read {date}" >> ReadTable(self._table, date, self._source)
                | f"Key {date}" >> beam.Map(lambda row, key=(self._table, date.isoformat()): (key, row))
                for date in self._dates]
        return (days | "AllDays" >> beam.Flatten()
                | "Batch" >> beam.GroupIntoBatches(self.ROWS_PER_BATCH))


def batch_rows(keyed_batch, columns: Sequence[str]) -> List[Dict]:
    """A ``ReadTableBatches`` element's rows as ``ReadTable`` gives them (dicts keyed by ``columns``)."""
    _, batch = keyed_batch
    return table_to_rows(batch, columns) if isinstance(batch, pa.Table) else list(batch)


def source_summary(source: SourceConfig) -> Dict[str, Optional[str]]:
    """What a run read from, for run summaries (no credentials are ever part of a SourceConfig)."""
    return dataclasses.asdict(source)
