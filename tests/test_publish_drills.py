"""Drills for staged publishing and option checks: a failed or concurrent rerun never damages good output.

Each drill injects one fault, then checks the exit code, the message, and that the output that was there before is
byte-identical (or, for a successful rerun, completely replaced and never seen half-written).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import build_examples, update_histories, validate_inputs
from tests.helpers import FNAPI
from transforms import publish, schemas

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root) -> dict:
    """Relative path -> sha256 of every file under ``root`` (what "byte-identical" means here)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def one_error_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr[-2000:]
    return lines[-1]


@pytest.fixture
def validated_copy(validated_sample, tmp_path):
    """raw/ and a validated out/ for the sample's first two days (a private copy)."""
    shutil.copytree(validated_sample["root"] / "raw", tmp_path / "raw")
    shutil.copytree(validated_sample["root"] / "out", tmp_path / "out",
                    ignore=shutil.ignore_patterns("video_sids", "histories", "examples"))
    return tmp_path, validated_sample["dates"]


def test_failed_range_rerun_keeps_every_good_day(validated_copy):
    root, dates = validated_copy
    before = tree_digest(root / "out")
    bad = Path(schemas.partition_dir(str(root / "raw"), schemas.WATCH_EVENTS, dates[1])) / "part-99999.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    result = cli("pipelines.validate_inputs", f"--start_date={dates[0]}", f"--end_date={dates[1]}",
                 f"--input_root={root}/raw", f"--output_root={root}/out", "--runner=FnApiRunner")
    assert "part-99999.parquet" in one_error_line(result)
    assert tree_digest(root / "out") == before


def test_mistyped_input_root_changes_nothing(validated_copy):
    root, dates = validated_copy
    before = tree_digest(root / "out")
    result = cli("pipelines.validate_inputs", f"--date={dates[0]}", f"--input_root={root}/raww",
                 f"--output_root={root}/out", "--runner=FnApiRunner")
    assert "no Parquet files" in one_error_line(result)
    assert tree_digest(root / "out") == before


def test_an_output_folder_that_is_not_ours_is_never_replaced(validated_copy):
    root, dates = validated_copy
    foreign = Path(schemas.partition_dir(str(root / "out/validated"), schemas.SEARCH_EVENTS, dates[0]))
    for p in foreign.iterdir():
        p.unlink()
    (foreign / "notes.txt").write_text("someone else's")
    before = tree_digest(root / "out")
    with pytest.raises(FileExistsError, match="holds files no TokenMinds job wrote"):
        validate_inputs.run([f"--date={dates[0]}", f"--input_root={root}/raw", f"--output_root={root}/out", *FNAPI])
    assert tree_digest(root / "out") == before


def test_failed_downstream_reruns_keep_the_published_day(daily_flow, tmp_path):
    """build_examples without the next day's snapshot, update_histories without the day's SIDs: both fail before
    any work, and the examples / snapshot published earlier stay byte-identical (and no staging is left)."""
    root = tmp_path / "flow"
    shutil.copytree(daily_flow["root"], root)
    out, dates = root / "out", daily_flow["dates"]
    shutil.rmtree(schemas.partition_dir(str(out), schemas.HISTORIES, dates[1]) + "")
    shutil.rmtree(schemas.partition_dir(str(out), schemas.VIDEO_SIDS, dates[2]))
    before = tree_digest(out)
    with pytest.raises(FileNotFoundError, match="_SUCCESS is missing"):
        build_examples.run([f"--date={dates[0]}", f"--output_root={out}", *FNAPI])
    with pytest.raises(FileNotFoundError, match="no complete SID assignment"):
        update_histories.run([f"--date={dates[2]}", f"--output_root={out}", *FNAPI])
    assert tree_digest(out) == before
    assert not [p for p in out.rglob(".staging-*")]


def test_concurrent_reruns_never_show_success_beside_a_partial_set(daily_flow, tmp_path):
    """Two runs of one day at once, while a reader polls: whenever _SUCCESS is there, the shards are exactly the
    ones its manifest lists, with the listed sizes."""
    root = tmp_path / "flow"
    shutil.copytree(daily_flow["root"], root)
    day, out = daily_flow["dates"][0], root / "out"
    partition = out / "examples" / f"date={day}"
    seen, problems, done = [0], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                names = set(os.listdir(partition))
                if "_SUCCESS" in names:
                    listed = json.loads((partition / publish.MANIFEST_FILE).read_text())["files"]
                    actual = {n: (partition / n).stat().st_size for n in names - {publish.MANIFEST_FILE}}
                    if actual != {f["name"]: f["size"] for f in listed}:
                        problems.append(actual)
                    seen[0] += 1
            except FileNotFoundError:
                pass  # between two reads a swap happened: the next read sees the other complete version
            time.sleep(0.001)

    thread = threading.Thread(target=reader)
    thread.start()
    args = [f"--date={day}", f"--output_root={out}", "--runner=FnApiRunner"]
    runs = [subprocess.Popen([sys.executable, "-m", "pipelines.build_examples", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    codes = [r.wait(timeout=600) for r in runs]
    done.set()
    thread.join()
    assert codes == [0, 0] and seen[0] > 0 and not problems
    # The published day is one complete run's, byte-identical to the original build (records are sharded by a
    # stable hash and sorted, so identical inputs give identical files).
    assert tree_digest(partition) == tree_digest(Path(daily_flow["root"]) / partition.relative_to(root))


def test_a_killed_runs_staging_is_removed_by_the_next_run(validated_copy):
    root, dates = validated_copy
    final = schemas.partition_dir(str(root / "out/validated"), schemas.VIDEOS, dates[0])
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    run_id = publish.new_run_id().split("-")
    run_id[2] = dead_pid
    abandoned = Path(publish.staging_dir(final, "-".join(run_id)))
    abandoned.mkdir()
    (abandoned / "part-00000-of-00002.parquet").write_text("half")
    validate_inputs.run([f"--date={dates[0]}", f"--input_root={root}/raw", f"--output_root={root}/out", *FNAPI])
    assert not abandoned.exists()


def test_parquet_outputs_hold_only_parquet_with_rows_over_every_shard(daily_flow):
    out, day = Path(daily_flow["root"]) / "out", daily_flow["dates"][1]
    for table, key in [(schemas.HISTORIES, "user_id"), (schemas.VIDEO_SIDS, "video_id")]:
        partition = schemas.partition_dir(str(out), table, day)
        data = pq.read_table(partition)  # a plain reader of the folder works: no JSON beside the shards
        shards = sorted(Path(partition).glob("part-*.parquet"))
        counts = [pq.read_metadata(s).num_rows for s in shards]
        assert len(shards) >= 2 and min(counts) > 0 and sum(counts) == data.num_rows
        assert len(set(data.column(key).to_pylist())) == data.num_rows
        assert os.path.exists(schemas.run_summary_path(str(out), table, day))


@pytest.mark.parametrize("module, args, message", [
    ("pipelines.build_examples", ["--input_root=/nonexistent"], "build_examples does not read --input_root"),
    ("pipelines.build_examples", ["--max_target=2"], "build_examples does not accept --max_target"),
    ("pipelines.build_examples", ["--max_tokens=-5"], "--max_tokens=-5 is below its minimum"),
    ("pipelines.update_histories", ["--backfill_days=nan"], "argument --backfill_days: invalid int value: 'nan'"),
    ("pipelines.refresh_users", ["--model=m", "--ttl_hours=-24"], "--ttl_hours=-24.0 must be > 0"),
    ("pipelines.refresh_users", ["--model=m", "--ttl_hours=inf"], "--ttl_hours=inf must be a finite number"),
    ("pipelines.validate_inputs", ["--source=bigquery", "--bq_project=my-project", "--bq_dataset=events\n"],
     "invalid BigQuery dataset id"),
])
def test_bad_options_are_one_line_errors_before_any_work(module, args, message, tmp_path):
    result = cli(module, "--date=2026-01-01", f"--output_root={tmp_path}/out", "--runner=FnApiRunner", *args)
    assert message in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_help_lists_the_jobs_options():
    result = cli("pipelines.build_examples", "--help")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    for option in ("--max_targets", "--example_shards", "--max_tokens", "--output_root", "--sid_model", "--seed"):
        assert option in result.stdout
    assert "--input_root" not in result.stdout  # a shared option this job does not read is not offered


JOB_MODULES = ["validate_inputs", "assign_sids", "update_histories", "build_examples", "refresh_users",
               "build_adaptation", "build_eval_sets", "fit_feature_transform", "train_query_tokenizer",
               "build_grounding_examples"]


@pytest.mark.parametrize("name", JOB_MODULES)
def test_every_beam_entry_point_has_help_listing_its_options(name, capsys):
    import importlib

    from pipelines.options import parse_job_options

    job = importlib.import_module(f"pipelines.{name}").JOB
    with pytest.raises(SystemExit) as exit_info:
        parse_job_options(["--help"], job)
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in [a.option_strings[0] for cls in job.option_classes
                   for a in publish_test_actions(cls)] + [f"--{d}" for d in job.shared]:
        assert option in text, option


def publish_test_actions(cls):
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    cls._add_argparse_args(parser)
    return [a for a in parser._actions if a.option_strings]


def test_failed_refresh_keeps_the_published_representations(daily_flow, tmp_path):
    from pipelines import refresh_users

    root = tmp_path / "flow"
    shutil.copytree(daily_flow["root"], root)
    out, day = root / "out", daily_flow["dates"][1]
    published = Path(refresh_users.representations_dir(str(out), schemas.parse_date(day)))
    published.mkdir(parents=True)
    (published / "part-00000-of-00001.parquet").write_bytes(b"yesterday's good rows")
    (published / "_SUCCESS").write_text("")
    before = tree_digest(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        refresh_users.run([f"--date={day}", f"--output_root={out}", f"--model={tmp_path}/no_model", *FNAPI])
    assert tree_digest(out) == before
