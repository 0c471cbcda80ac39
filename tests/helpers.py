"""Small builders shared by tests: hand-written rows and partitions in the contract's layout."""
from __future__ import annotations

import datetime as dt
import os
from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from transforms import schemas

DAY = dt.date(2026, 1, 1)
T0 = dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.timezone.utc)

FNAPI = ["--runner=FnApiRunner"]
MULTIPROCESS = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def watch(**overrides) -> Dict:
    row = dict(user_id="u1", video_id="v1", event_ts=T0, scenario="LFV", watch_time_s=30.0, video_duration_s=60.0,
               surface="home", device="IOS", liked=False, disliked=False)
    row.update(overrides)
    return row


def search(**overrides) -> Dict:
    row = dict(user_id="u1", event_ts=T0, query="funny cats")
    row.update(overrides)
    return row


def video(dim: int = schemas.DEFAULT_EMBEDDING_DIM, **overrides) -> Dict:
    row = dict(video_id="v1", scenario="LFV", content_embedding=[0.125] * dim, publish_ts=T0)
    row.update(overrides)
    return row


def write_partition(root: str, table: str, date: dt.date, rows: List[Dict], schema: pa.Schema = None,
                    name: str = "part-00000.parquet") -> str:
    directory = schemas.partition_dir(str(root), table, date)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or schemas.input_schema(table)), path)
    return path


def read_parquet_dir(directory: str) -> List[Dict]:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))
    rows: List[Dict] = []
    for f in files:
        rows += pq.read_table(os.path.join(directory, f)).to_pylist()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Dataflow translation (Beam's --dry_run: the job is built and translated, nothing is submitted).
# ---------------------------------------------------------------------------------------------------------------
SETUP_FILE = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "setup.py")


def dataflow_args():
    return ["--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--project=tokenminds-ci",
            "--region=us-central1", "--temp_location=gs://tokenminds-ci-bucket/tmp",
            "--staging_location=gs://tokenminds-ci-bucket/staging", "--sdk_location=container",
            f"--setup_file={SETUP_FILE}"]


def transform_names(job):
    return {t.unique_name for t in job.proto_pipeline.components.transforms.values()}


def assert_translated(jobs, expected_count, *must_contain):
    assert len(jobs) == expected_count
    for job in jobs:
        assert job.proto.type_.name == "JOB_TYPE_BATCH" and job.proto.name.startswith("beamapp-")
        names = transform_names(job)
        for fragment in must_contain:
            assert any(fragment in name for name in names), (fragment, sorted(names)[:20])
