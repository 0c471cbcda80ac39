"""The data contract: Parquet round trips and BigQuery schemas derived from the same definition."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import DAY, search, video, watch, write_partition
from transforms import schemas


@pytest.mark.parametrize("table,row", [(schemas.WATCH_EVENTS, watch()), (schemas.SEARCH_EVENTS, search()),
                                       (schemas.VIDEOS, video())])
def test_rows_round_trip_through_parquet_with_the_contract_schema(tmp_path, table, row):
    path = write_partition(tmp_path, table, DAY, [row])
    assert path.endswith(f"/{table}/date=2026-01-01/part-00000.parquet")
    back = pq.read_table(path)
    assert back.schema.equals(schemas.input_schema(table))
    [got] = back.to_pylist()
    if table == schemas.VIDEOS:
        assert got["content_embedding"] == pytest.approx(row["content_embedding"])
        got["content_embedding"] = row["content_embedding"]
    assert got == row


def test_bigquery_schemas_mirror_the_arrow_schemas():
    bq = schemas.bigquery_schema(schemas.WATCH_EVENTS_SCHEMA)
    assert [f["name"] for f in bq["fields"]] == schemas.WATCH_EVENTS_SCHEMA.names
    types = {f["name"]: (f["type"], f["mode"]) for f in bq["fields"]}
    assert types["event_ts"] == ("TIMESTAMP", "NULLABLE")
    assert types["liked"] == ("BOOL", "NULLABLE")
    videos = {f["name"]: (f["type"], f["mode"]) for f in schemas.bigquery_schema(schemas.VIDEOS_SCHEMA)["fields"]}
    assert videos["content_embedding"] == ("FLOAT64", "REPEATED")
    sids = {f["name"]: (f["type"], f["mode"]) for f in schemas.bigquery_schema(schemas.VIDEO_SIDS_SCHEMA)["fields"]}
    assert sids["sid"] == ("INT64", "REPEATED")
    with pytest.raises(TypeError):
        schemas.bigquery_schema(pa.schema([pa.field("x", pa.large_binary())]))


def test_required_fields_and_dedup_keys_are_columns_of_their_table():
    for table in schemas.INPUT_TABLES:
        names = set(schemas.input_schema(table).names)
        assert set(schemas.REQUIRED_FIELDS[table]) <= names
        assert set(schemas.DEDUP_KEY[table]) <= names
        assert set(schemas.OPTIONAL_DEFAULTS[table]) <= names - set(schemas.REQUIRED_FIELDS[table])


def test_partition_dir_rejects_malformed_dates():
    assert schemas.partition_dir("gs://b/root/", "videos", "2026-01-31") == "gs://b/root/videos/date=2026-01-31"
    with pytest.raises(ValueError):
        schemas.partition_dir("root", "videos", "2026/01/31")
