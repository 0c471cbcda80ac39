"""Failure and bad-input drills: a run killed mid-write, broken input files, fuzzed rows, a truncated shard."""
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings, strategies as st

from pipelines import validate_inputs
from tests.helpers import DAY, FNAPI, read_parquet_dir, search, watch, write_partition
from transforms import schemas, validation as v
from transforms.validation import ValidateRows

REPO = Path(__file__).resolve().parents[1]


def run_cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(out, day):
    rows = {}
    for table in schemas.INPUT_TABLES:
        directory = schemas.partition_dir(f"{out}/validated", table, day)
        rows[table] = sorted(map(repr, read_parquet_dir(directory)))
    return rows


def test_sigkill_mid_write_then_rerun_gives_the_complete_output(validated_sample, tmp_path):
    raw, day = validated_sample["root"] / "raw", validated_sample["dates"][0]
    args = [f"--date={day}", f"--input_root={raw}", "--runner=FnApiRunner", "--validated_shards=3"]
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pipelines.validate_inputs", *args, f"--output_root={out}"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    killed_while_writing = False
    while time.time() < deadline and process.poll() is None:
        # Beam's file sinks write into .temp-beam-* directories, then rename; kill as soon as writing starts.
        if any(".temp-beam" in str(p) or p.name.startswith("part-") for p in out.rglob("*")):
            process.send_signal(signal.SIGKILL)
            killed_while_writing = True
            break
        time.sleep(0.02)
    process.wait()
    assert killed_while_writing and process.returncode == -signal.SIGKILL
    # Nothing partial is visible as complete: no _SUCCESS anywhere.
    assert not list(out.rglob("_SUCCESS"))

    [rerun] = validate_inputs.run([*args, f"--output_root={out}"])
    [clean] = validate_inputs.run([*args, f"--output_root={tmp_path / 'clean'}"])
    assert rerun["totals"] == clean["totals"] and rerun["totals"]["balanced"]
    assert table_rows(out, day) == table_rows(tmp_path / "clean", day)
    assert not [p for p in out.rglob("*") if p.is_file() and ".temp-beam" in str(p)]


@pytest.fixture
def one_good_day(tmp_path):
    raw = tmp_path / "raw"
    write_partition(raw, schemas.WATCH_EVENTS, DAY, [watch()])
    write_partition(raw, schemas.SEARCH_EVENTS, DAY, [search()])
    write_partition(raw, schemas.VIDEOS, DAY, [__import__("tests.helpers", fromlist=["video"]).video()])
    return raw


def cli_validate(raw, out):
    return run_cli("pipelines.validate_inputs", f"--date={DAY}", f"--input_root={raw}", f"--output_root={out}",
                   "--runner=FnApiRunner")


def test_corrupt_parquet_file_is_a_clear_error_naming_the_file(one_good_day, tmp_path):
    bad = Path(schemas.partition_dir(str(one_good_day), schemas.WATCH_EVENTS, DAY)) / "part-00001.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(64))
    result = cli_validate(one_good_day, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: watch_events: cannot read Parquet file")
    assert "part-00001.parquet" in result.stderr and "Traceback" not in result.stderr


def test_file_missing_a_column_is_a_clear_error_naming_file_and_column(one_good_day, tmp_path):
    schema = schemas.SEARCH_EVENTS_SCHEMA.remove(schemas.SEARCH_EVENTS_SCHEMA.get_field_index("query"))
    write_partition(one_good_day, schemas.SEARCH_EVENTS, DAY, [{"user_id": "u1", "event_ts": None}], schema=schema,
                    name="part-00001.parquet")
    result = cli_validate(one_good_day, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "part-00001.parquet lacks required column(s) ['query']" in result.stderr


def test_retyped_column_and_far_future_events_become_dead_letters(one_good_day, tmp_path):
    schema = schemas.WATCH_EVENTS_SCHEMA.set(4, pa.field("watch_time_s", pa.string()))
    rows = [watch(user_id="retyped", watch_time_s="12.5"),
            watch(user_id="future", watch_time_s="1", event_ts=dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc))]
    write_partition(one_good_day, schemas.WATCH_EVENTS, DAY, rows, schema=schema, name="part-00001.parquet")
    [summary] = validate_inputs.run([f"--date={DAY}", f"--input_root={one_good_day}", f"--output_root={tmp_path}/o",
                                     *FNAPI])
    watches = summary["tables"][schemas.WATCH_EVENTS][DAY.isoformat()]
    assert watches["rows_in"] == 3 and watches["rows_out"] == 1 and watches["balanced"]
    assert watches["dead_by_reason"] == {v.BAD_WATCH_TIME: 1, v.TIMESTAMP_OUT_OF_RANGE: 1}


def test_an_empty_day_runs_and_reports_zero_rows(tmp_path):
    raw = tmp_path / "raw"
    for table in schemas.INPUT_TABLES:
        write_partition(raw, table, DAY, [])
    [summary] = validate_inputs.run([f"--date={DAY}", f"--input_root={raw}", f"--output_root={tmp_path}/o", *FNAPI])
    assert summary["totals"] == {"rows_in": 0, "rows_out": 0, "rows_dead": 0, "dead_by_reason": {},
                                 "balanced": True}
    assert os.path.exists(os.path.join(validate_inputs.run_dir(f"{tmp_path}/o", DAY), "_SUCCESS"))


def test_a_missing_day_is_a_clear_error(tmp_path):
    result = cli_validate(tmp_path / "nothing", tmp_path / "out")
    assert result.returncode == 2 and "no Parquet files for 2026-01-01" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Bad-row fuzzing.
# ---------------------------------------------------------------------------------------------------------------
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300), st.binary(max_size=40),
    st.datetimes(timezones=st.sampled_from([dt.timezone.utc, None])),
    st.lists(st.floats(allow_nan=True), max_size=80), st.sampled_from(["LFV", "SFV", "2026-01-01T10:00:00Z"]))


DROP = object()


def fuzzed_row(table):
    names = list(schemas.input_schema(table).names)
    good = {schemas.WATCH_EVENTS: watch(), schemas.SEARCH_EVENTS: search(),
            schemas.VIDEOS: __import__("tests.helpers", fromlist=["video"]).video()}[table]
    # Start from a valid row and replace a random subset of columns by arbitrary values, or drop them.
    return st.fixed_dictionaries({}, optional={n: st.one_of(ANY_VALUE, st.just(DROP)) for n in names}).map(
        lambda replaced: {k: val for k, val in {**good, **replaced}.items() if val is not DROP})


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(schemas.INPUT_TABLES).flatmap(lambda t: st.tuples(st.just(t), fuzzed_row(t))))
def test_validate_row_never_raises_and_returns_exactly_one_outcome(table_and_row):
    table, row = table_and_row
    clean, rejection = v.validate_row(table, row, DAY)
    assert (clean is None) != (rejection is None)
    if rejection is not None:
        assert rejection.reason in v.REASONS
    else:
        assert set(clean) == set(schemas.input_schema(table).names)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzzed_row(schemas.WATCH_EVENTS), min_size=1, max_size=40))
def test_fuzzed_rows_through_beam_are_all_accounted_for(rows):
    rows = rows + rows[:3]  # some exact duplicates too
    with TestPipeline(options=PipelineOptions(FNAPI)) as p:
        validated = p | beam.Create(rows) | ValidateRows(schemas.WATCH_EVENTS, DAY)
        counts = ((validated["valid"] | "TagValid" >> beam.Map(lambda _: "out"),
                   validated["dead"] | "TagDead" >> beam.Map(lambda _: "dead"))
                  | beam.Flatten() | beam.combiners.Count.Globally())
        assert_that(counts, equal_to([len(rows)]))


# ---------------------------------------------------------------------------------------------------------------
# A truncated TFRecord shard.
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_tfrecord_shard_is_reported_by_name(daily_flow, tmp_path):
    from tokenminds_model.data import CorruptShardError, numpy_batches

    source = Path(f"{daily_flow['root']}/out/examples/date={daily_flow['dates'][1]}")
    copy = tmp_path / "examples"
    shutil.copytree(source, copy)
    shard = sorted(copy.glob("part-*.tfrecord.gz"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=shard.name):
        for _ in numpy_batches([str(copy)], 8, seed=None, drop_remainder=False):
            pass
