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


# ---------------------------------------------------------------------------------------------------------------
# Encoding and hidden-file drills
# ---------------------------------------------------------------------------------------------------------------
def write_bytes_partition(root, table, rows, name="part-00000.parquet"):
    """A partition whose string columns may hold arbitrary bytes: written as binary, relabelled string unchecked,
    so the file really holds invalid UTF-8 (as an upstream writer that skips validation produces)."""
    import pyarrow.parquet as pq

    schema = schemas.input_schema(table)
    loose = pa.schema([f.with_type(pa.binary()) if f.type == pa.string() else f for f in schema])
    directory = Path(schemas.partition_dir(str(root), table, DAY))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    pq.write_table(pa.Table.from_pylist(rows, schema=loose).cast(schema, safe=False), path)
    assert pq.read_table(path).schema == schema
    with pytest.raises(UnicodeDecodeError):
        pq.read_table(path).to_pylist()
    return path


def read_summary(out):
    import json

    return json.loads((Path(validate_inputs.run_dir(str(out), DAY)) / "summary.json").read_text())


def assert_cli_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_invalid_utf8_in_any_string_column_is_dead_lettered_and_good_rows_survive(tmp_path):
    from tests.helpers import video

    raw, out = tmp_path / "raw", tmp_path / "out"
    t = lambda minute: dt.datetime(2026, 1, 1, 9, minute, tzinfo=dt.timezone.utc)  # noqa: E731
    good_watches = [watch(user_id=f"u{i}".encode(), video_id=b"v1", scenario=b"LFV", surface=b"home", device=b"IOS",
                          event_ts=t(i)) for i in range(4)]
    bad_watches = [watch(user_id=b"u\xff", event_ts=t(10)), watch(video_id=b"v\xc3", event_ts=t(11)),
                   watch(scenario=b"LF\x80", event_ts=t(12)), watch(surface=b"\xfehome", event_ts=t(13)),
                   watch(device=b"I\xedOS", event_ts=t(14))]
    bad_watches = [{k: (val.encode() if isinstance(val, str) else val) for k, val in row.items()}
                   for row in bad_watches]
    # Bad rows interleaved with good ones in the same file (and the same row group).
    write_bytes_partition(raw, schemas.WATCH_EVENTS, [r for pair in zip(good_watches, bad_watches) for r in pair]
                          + good_watches[len(bad_watches):] + bad_watches[len(good_watches):])
    searches = [search(user_id=b"u1", query=b"funny cats", event_ts=t(0)),
                search(user_id=b"u2", query=b"caf\xc3\xa9 music", event_ts=t(1)),
                search(user_id=b"u3", query=b"\xff\xfe cats", event_ts=t(2)),
                search(user_id=b"u\xff", query=b"dogs", event_ts=t(3))]
    write_bytes_partition(raw, schemas.SEARCH_EVENTS, searches)
    write_bytes_partition(raw, schemas.VIDEOS, [{**video(video_id="v1"), "video_id": b"v1", "scenario": b"LFV"},
                                                {**video(video_id="v2"), "video_id": b"v\xff2", "scenario": b"LFV"}])

    result = cli_validate(raw, out)
    assert_cli_ok(result)
    totals = read_summary(out)["totals"]
    assert totals["balanced"] and totals["rows_in"] == 9 + 4 + 2
    assert totals["dead_by_reason"] == {v.BAD_ENCODING: 5 + 1 + 1, v.BAD_QUERY_ENCODING: 1}
    valid = table_rows(out, DAY)
    assert len(valid[schemas.WATCH_EVENTS]) == 4 and all("'u" in r for r in valid[schemas.WATCH_EVENTS])
    queries = read_parquet_dir(schemas.partition_dir(f"{out}/validated", schemas.SEARCH_EVENTS, DAY))
    assert sorted(r["query"] for r in queries) == ["caf\u00e9 music", "funny cats"]
    assert [r["video_id"] for r in read_parquet_dir(schemas.partition_dir(f"{out}/validated", schemas.VIDEOS,
                                                                          DAY))] == ["v1"]
    dead = read_parquet_dir(schemas.partition_dir(f"{out}/{schemas.DEAD_LETTER}", schemas.WATCH_EVENTS, DAY))
    assert sorted(r["detail"].split(" ")[0] for r in dead) == ["device", "scenario", "surface", "user_id",
                                                               "video_id"]
    assert all("bytes_base64" in r["raw_row"] for r in dead)  # the undecodable value is kept, replayable


def test_lone_surrogates_are_dead_lettered_before_the_parquet_writers(tmp_path):
    import json

    from transforms import outputs

    # Lone surrogates come from readers and code that build text from raw code units. Beam's coders refuse them in
    # any element, so rows are validated here outside Beam, and what validation keeps and dead-letters is written
    # with the jobs' own Parquet writer, as validate_inputs does.
    rows = [watch(user_id="u1"), watch(user_id="u\ud800"), watch(video_id="v\udfff"),
            watch(user_id="u2", device="TV\udc80"), search(user_id="u3", query="cats \ud83d")]
    valid, dead = [], []
    for row in rows:
        table = schemas.SEARCH_EVENTS if "query" in row else schemas.WATCH_EVENTS
        clean, rejection = v.validate_row(table, row, DAY)
        if rejection is None:
            valid.append(clean)
        else:
            dead.append(v.dead_letter_row(table, DAY, row, rejection))
    with TestPipeline(options=PipelineOptions(FNAPI)) as p:
        _ = p | "Valid" >> beam.Create(valid) | "WriteValid" >> outputs.WriteParquetShards(
            str(tmp_path / "valid"), schemas.WATCH_EVENTS_SCHEMA)
        _ = p | "Dead" >> beam.Create(dead) | "WriteDead" >> outputs.WriteParquetShards(
            str(tmp_path / "dead"), schemas.DEAD_LETTER_SCHEMA)
    assert [r["user_id"] for r in read_parquet_dir(str(tmp_path / "valid"))] == ["u1"]
    written = read_parquet_dir(str(tmp_path / "dead"))
    assert sorted(r["reason"] for r in written) == [v.BAD_ENCODING] * 3 + [v.BAD_QUERY_ENCODING]
    raw_ids = sorted(json.loads(r["raw_row"])["user_id"] for r in written)
    assert raw_ids == ["u1", "u2", "u3", "u\ud800"]  # the dead-letter JSON keeps the surrogate, escaped


def test_queries_of_only_invisible_characters_are_empty_queries(one_good_day, tmp_path):
    invisible = ["\u200b\u200c", "\x00\x01", "\u2060 \ufeff", "\u200e\u00ad"]
    write_partition(one_good_day, schemas.SEARCH_EVENTS, DAY,
                    [search(user_id=f"x{i}", query=q) for i, q in enumerate(invisible)] + [
                        search(user_id="kept", query="\u200bcats")], name="part-00001.parquet")
    out = tmp_path / "out"
    assert_cli_ok(cli_validate(one_good_day, out))
    searches = read_summary(out)["tables"][schemas.SEARCH_EVENTS][DAY.isoformat()]
    assert searches["dead_by_reason"] == {v.EMPTY_QUERY: 4} and searches["balanced"]
    kept = read_parquet_dir(schemas.partition_dir(f"{out}/validated", schemas.SEARCH_EVENTS, DAY))
    assert sorted(r["query"] for r in kept) == ["funny cats", "\u200bcats"]  # accepted text kept as it came


def test_hidden_files_in_a_partition_are_not_read(one_good_day, tmp_path):
    for table in schemas.INPUT_TABLES:
        directory = Path(schemas.partition_dir(str(one_good_day), table, DAY))
        for hidden in (".part-00000.parquet", "_part-00000.parquet"):  # a writer's temp copy, a staging copy
            shutil.copy(directory / "part-00000.parquet", directory / hidden)
        (directory / ".part-00000.parquet.crc").write_bytes(b"\x00" * 8)
        (directory / "_SUCCESS").write_bytes(b"")
    out = tmp_path / "out"
    assert_cli_ok(cli_validate(one_good_day, out))
    assert read_summary(out)["totals"] == {"rows_in": 3, "rows_out": 3, "rows_dead": 0, "dead_by_reason": {},
                                           "balanced": True}  # one row per table, not three


def test_marker_only_and_zero_row_partitions_are_empty_days(one_good_day, tmp_path):
    searches = Path(schemas.partition_dir(str(one_good_day), schemas.SEARCH_EVENTS, DAY))
    for path in searches.iterdir():
        path.unlink()
    (searches / "_SUCCESS").write_bytes(b"")  # an empty day: the partition with its marker and no data files
    videos = Path(schemas.partition_dir(str(one_good_day), schemas.VIDEOS, DAY))
    (videos / "part-00000.parquet").unlink()
    write_partition(one_good_day, schemas.VIDEOS, DAY, [])  # an empty day: a zero-row file with the schema
    out = tmp_path / "out"
    assert_cli_ok(cli_validate(one_good_day, out))
    assert read_summary(out)["totals"] == {"rows_in": 1, "rows_out": 1, "rows_dead": 0, "dead_by_reason": {},
                                           "balanced": True}
    for table in schemas.INPUT_TABLES:
        assert (Path(schemas.partition_dir(f"{out}/validated", table, DAY)) / "_SUCCESS").exists()


def test_missing_day_advice_is_followable_and_a_zero_byte_file_is_named(one_good_day, tmp_path):
    searches = Path(schemas.partition_dir(str(one_good_day), schemas.SEARCH_EVENTS, DAY))
    shutil.rmtree(searches)
    result = cli_validate(one_good_day, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no Parquet files for 2026-01-01" in result.stderr and "_SUCCESS" in result.stderr
    assert "even an empty file" not in result.stderr

    searches.mkdir()
    (searches / "part-00000.parquet").write_bytes(b"")  # "an empty file" is not Parquet
    result = cli_validate(one_good_day, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "search_events" in result.stderr and "part-00000.parquet is empty (0 bytes)" in result.stderr

    (searches / "part-00000.parquet").unlink()
    (searches / "_SUCCESS").write_bytes(b"")  # what the message advises
    result = cli_validate(one_good_day, tmp_path / "out")
    assert_cli_ok(result)
    assert read_summary(tmp_path / "out")["totals"]["rows_in"] == 2
