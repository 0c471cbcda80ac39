"""The daily DAG under Airflow's own scheduler loop: ``airflow dags test`` on a tiny generated sample, local runner.

Airflow lives in its own virtualenv (``make airflow-venv``: dags/requirements-airflow.txt pinned by
dags/constraints-airflow.txt, under ~/.cache/tokenminds/, named by a hash of the pins; ``.ci/run`` builds it and
passes it as TOKENMINDS_AIRFLOW_VENV). Where it is missing these tests skip, saying how to build it, except in CI
(CI=true), where they fail.

One module fixture does what a data engineer would: generates 40 users over 3 days (``make_sample_data``, which
writes the landing markers), prepares the first day and the shared artifacts (validation, SIDs and history snapshot
of 2026-01-01, SID model, query tokenizer, feature transform), then runs the DAG with ``tokenminds_runner=FnApiRunner``
and no Google connection:

- ``airflow dags test tokenminds_daily 2026-01-03``: the run of 2026-01-03T00:00Z, processing day 2026-01-02
  (examples and the model's first day: 2026-01-01, trained from scratch);
- the same command again (a rerun must change nothing);
- ``airflow dags test tokenminds_daily 2026-01-04`` (day 2026-01-03; training continues from 2026-01-01's checkpoint),
  with the day's landing markers written only once the first sensor has deferred, waiting for them.

Meanwhile, on a copy of the prepared tree, ``pipelines.backfill`` covers the same days; its outputs must equal the
DAG's: Parquet and TFRecord files byte for byte, models by content version and parameter values.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import daily_plan
from tests.conftest import FLOW_MODEL
from tests.helpers import FNAPI

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
PINS = (DAGS / "requirements-airflow.txt", DAGS / "constraints-airflow.txt")
DAG_ID = "tokenminds_daily"
DAY1, DAY2, DAY3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)
RUN_TIMEOUT_S = 600  # one `airflow dags test` (about 90 s here); killed with SIGKILL: it ignores SIGTERM
CHEAP_SID_MODEL = ["--kind=rq_kmeans", "--levels=3", "--codebook_size=16"]
TASK_ARGS = {
    "build_examples": "--example_shards=1",
    "train": "--steps=4 --batch_size=8 --no_progress --no_tensorboard --model_overrides="
             + shlex.quote(json.dumps(FLOW_MODEL, separators=(",", ":"))),
}
# Where each task's run summary is (next to its _SUCCESS markers, which daily_plan.success_paths names).
SUMMARIES = {
    "validate_inputs": "validation_runs/date={d}/summary.json",
    "assign_sids": "video_sids/_runs/date={d}/summary.json",
    "update_histories": "histories/_runs/date={d}/summary.json",
    "build_examples": "examples/date={d}/stats.json",
    "train": "models/date={d}/model_config.json",
    "refresh_users": "user_representations/_runs/date={d}/summary.json",
}


# ---------------------------------------------------------------------------------------------------------------
# The Airflow environment.
# ---------------------------------------------------------------------------------------------------------------
def airflow_venv() -> Path:
    """TOKENMINDS_AIRFLOW_VENV, else where ``make airflow-venv`` puts it (the Makefile's hash of the pins)."""
    if os.environ.get("TOKENMINDS_AIRFLOW_VENV"):
        return Path(os.environ["TOKENMINDS_AIRFLOW_VENV"])
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in PINS)).hexdigest()[:12]
    return Path.home() / ".cache" / "tokenminds" / f"airflow-venv-{digest}"


@pytest.fixture(scope="module")
def venv() -> Path:
    path = airflow_venv()
    if not (path / ".installed").exists() or not (path / "bin" / "airflow").exists():
        message = (f"the Airflow environment {path} is not built; `make airflow-venv` builds it (about 3 minutes, "
                   "2.2 GB), .ci/run does so in CI")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def jax_cache(root: Path) -> dict:
    """JAX's persistent compilation cache, shared by every training and refresh of the test (the DAG's and the
    backfill's): the same programs compile once, about 10 s saved per job; the compiled code, and so the results,
    are the same."""
    return {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def airflow_env(home: Path, venv: Path, out: Path, raw: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({
        "PATH": f"{venv}/bin:{env.get('PATH', '')}", "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # The DAG's configuration, as a deployment gives it: Variables (here from the environment) ...
        "AIRFLOW_VAR_TOKENMINDS_OUTPUT_ROOT": str(out), "AIRFLOW_VAR_TOKENMINDS_INPUT_ROOT": str(raw),
        "AIRFLOW_VAR_TOKENMINDS_RUNNER": "FnApiRunner", "AIRFLOW_VAR_TOKENMINDS_TASK_ARGS": json.dumps(TASK_ARGS),
        # ... and the launcher's environment: the project's interpreter runs the jobs.
        "TOKENMINDS_PYTHON": sys.executable, "TOKENMINDS_TASK_RETRIES": "0", "TOKENMINDS_POKE_INTERVAL": "1",
    })
    env.update(extra)
    return env


def run_airflow(env: dict, *args: str, log: Path, on_line=None, timeout_s: int = RUN_TIMEOUT_S) -> str:
    """``airflow ARGS`` with its output streamed to ``log`` (and each line to ``on_line``); raises on failure."""
    command = ["timeout", "-s", "KILL", str(timeout_s), str(Path(env["PATH"].split(":")[0]) / "airflow"), *args]
    lines = []
    with open(log, "w") as handle, subprocess.Popen(command, env=env, cwd=log.parent, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            handle.write(line)
            lines.append(line)
            if on_line is not None:
                on_line(line)
    output = "".join(lines)
    if process.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} exited {process.returncode}; log {log}:\n{output[-6000:]}")
    return output


def dags_test(env: dict, logical_date: dt.date, log: Path, on_line=None) -> dict:
    """``airflow dags test tokenminds_daily DATE``: the run's id, state, data interval, task states and output."""
    started = time.monotonic()
    output = run_airflow(env, "dags", "test", DAG_ID, logical_date.isoformat(), log=log, on_line=on_line)
    seconds = time.monotonic() - started
    finished = re.search(r"DagRun Finished: .*?run_id=([^,]+),.*?state=(\w+),.*?data_interval_start=([^,]+), "
                         r"data_interval_end=([^,]+),", output)
    assert finished, f"no 'DagRun Finished' line in {log}"
    run_id, state, start, end = finished.groups()
    states = json.loads(run_airflow(env, "tasks", "states-for-dag-run", DAG_ID, run_id, "-o", "json",
                                    log=log.with_suffix(".states.log")).strip().splitlines()[-1])
    return {"run_id": run_id, "state": state, "interval": (start, end), "seconds": seconds, "output": output,
            "tasks": {t["task_id"]: t for t in states}}


# ---------------------------------------------------------------------------------------------------------------
# The sample, prepared up to the first day (what a from-scratch deployment does before enabling the DAG).
# ---------------------------------------------------------------------------------------------------------------
def prepare_first_day(raw: Path, out: Path) -> None:
    from pipelines import (assign_sids, fit_feature_transform, make_sample_data, train_query_tokenizer,
                           train_sid_model, update_histories, validate_inputs)

    make_sample_data.main([f"--output_root={raw}", "--users=40", "--days=3", "--seed=0", "--lfv_videos=200",
                           "--sfv_videos=400", f"--start_date={DAY1}"])
    day = [f"--date={DAY1}", f"--output_root={out}", *FNAPI]
    validate_inputs.run(day + [f"--input_root={raw}"])
    train_sid_model.train(train_sid_model.parse_args(
        [f"--videos={out}/validated/videos", f"--date={DAY1}", f"--output={out}/sid_model", *CHEAP_SID_MODEL]))
    assign_sids.run(day)
    update_histories.run(day + ["--backfill_days=1"])
    train_query_tokenizer.run(day + ["--query_vocab_size=200"])
    fit_feature_transform.run(day)


def backfill_commands(raw: Path, out: Path) -> list:
    """The same days through pipelines.backfill: the data dates the two DAG runs process (validation, SIDs,
    histories and user refresh of 01-02..01-03; examples and training of 01-01..01-02), with the prepared first day
    adopted. Two invocations, since refresh_users of 01-01 (which needs a model of 2025-12-31) is no day of theirs."""
    python = [sys.executable, "-m", "pipelines.backfill", f"--output_root={out}", f"--input_root={raw}", *FNAPI]
    return [
        python + [f"--start_date={DAY1}", f"--end_date={DAY3}", "--adopt_existing", "--example_shards=1",
                  "--steps=validate_inputs,assign_sids,update_histories,build_examples,train",
                  "--train_args=" + TASK_ARGS["train"]],
        python + [f"--start_date={DAY2}", f"--end_date={DAY3}", "--steps=refresh_users"],
    ]


@pytest.fixture(scope="module")
def dag_runs(venv, tmp_path_factory):
    root = tmp_path_factory.mktemp("airflow_dag")
    raw, out, home = root / "raw", root / "out", root / "airflow"
    timings = {}
    started = time.monotonic()
    prepare_first_day(raw, out)
    timings["prepare"] = time.monotonic() - started

    # The backfill of the same days, on a copy, runs beside the DAG runs (two cores: they overlap).
    parity_raw, parity_out = root / "parity_raw", root / "parity_out"
    shutil.copytree(raw, parity_raw)
    shutil.copytree(out, parity_out)
    backfill_log = root / "backfill.log"
    backfill = subprocess.Popen(["bash", "-c", " && ".join(shlex.join(c) for c in backfill_commands(parity_raw,
                                                                                                     parity_out))],
                                cwd=REPO, stdout=open(backfill_log, "w"), stderr=subprocess.STDOUT,
                                env={**os.environ, **jax_cache(root)})
    backfill_started = time.monotonic()
    try:
        env = airflow_env(home, venv, out, raw, **jax_cache(root))
        home.mkdir()
        run_airflow(env, "db", "migrate", log=home / "migrate.log")

        first = dags_test(env, DAY3, home / "first.log")  # the run of 2026-01-03T00:00Z: day 2026-01-02
        first_outputs = digests(out)
        again = dags_test(env, DAY3, home / "again.log")
        again_outputs = digests(out)

        # The next day, with its landing markers written only once the first sensor waits for them.
        markers = daily_plan.landing_paths(DAY3, str(raw))
        for marker in markers:
            os.remove(marker)
        landed = threading.Event()

        def land(line):
            if not landed.is_set() and "wait_for_validate_inputs" in line and "DEFERRED" in line:
                for marker in markers:
                    Path(marker).touch()
                landed.set()

        next_day = dags_test(env, dt.date(2026, 1, 4), home / "next.log", on_line=land)
        backfill_status = backfill.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if backfill.poll() is None:
            backfill.kill()
    timings.update(first=first["seconds"], again=again["seconds"], next=next_day["seconds"],
                   backfill_after_start=time.monotonic() - backfill_started, total=time.monotonic() - started)
    print("airflow dag test timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    for name, run in (("first", first), ("again", again), ("next", next_day)):
        print(f"{name}: {run['run_id']} {run['state']} interval {run['interval'][0]}..{run['interval'][1]}")
        for task_id, task in run["tasks"].items():
            print(f"  {task_id:<26} {task['state']:<8} {task['start_date']} .. {task['end_date']}")
    return {"root": root, "raw": raw, "out": out, "first": first, "again": again, "next": next_day,
            "first_outputs": first_outputs, "again_outputs": again_outputs, "landed": landed.is_set(),
            "backfill": (backfill_status, backfill_log.read_text()), "parity_out": parity_out}


# ---------------------------------------------------------------------------------------------------------------
# Comparing output trees.
# ---------------------------------------------------------------------------------------------------------------
VOLATILE = re.compile(r"(^|/)(_backfill|_runs|validation_runs)(/|$)|(^|/)(summary|stats|model_config|metrics)\.json$"
                      r"|(^|/)_MANIFEST\.json$|(^|/)\.staging-|^models/|^tensorboard/")


def tfrecords(directory: Path) -> list:
    import tensorflow as tf

    files = sorted(str(p) for p in directory.glob("part-*.tfrecord.gz"))
    return sorted(bytes(r.numpy()) for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def digests(root: Path) -> dict:
    """Every output file's content, comparable across reruns: Parquet and other data files by sha256, each example
    partition by its sorted records, each model by its content version and optimizer-state digest."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or VOLATILE.search(relative) or relative.endswith(".tfrecord.gz"):
            continue
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    for directory in sorted(root.glob("examples/date=*")):
        found[f"{directory.relative_to(root).as_posix()}/records"] = hashlib.sha256(
            b"".join(hashlib.sha256(r).digest() for r in tfrecords(directory))).hexdigest()
        found[f"{directory.relative_to(root).as_posix()}/files"] = hashlib.sha256(b"".join(
            p.read_bytes() for p in sorted(directory.glob("part-*.tfrecord.gz")))).hexdigest()
    for config in sorted(root.glob("models/date=*/model_config.json")):
        document = json.loads(config.read_text())
        found[config.parent.relative_to(root).as_posix()] = {
            k: document[k] for k in ("version", "state_digest", "step", "parent_version", "training_days")}
    return found


def differences(a: dict, b: dict) -> tuple:
    """(what differs between two output trees' ``digests`` and must not, what differs and may).

    Nothing may differ: Parquet and TFRecord shards are written by stable-hash sharding with sorted contents
    (``transforms.outputs``), so identical inputs give byte-identical files, the trainer reads the same records in the
    same order, and so the models and the representations computed with them are identical too."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    return [key for key in a if a[key] != b[key]], []


def model_params(directory: Path):
    from tokenminds_model.model_checkpoints import load_model

    import jax

    _, params, _ = load_model(str(directory))
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}


# ---------------------------------------------------------------------------------------------------------------
# The tests.
# ---------------------------------------------------------------------------------------------------------------
OPERATOR_CHECKS = r"""
import datetime as dt, importlib.util, json, sys, tempfile
from pathlib import Path
from unittest import mock

spec = importlib.util.spec_from_file_location("tokenminds_daily_dag", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from airflow.providers.apache.beam.hooks.beam import BeamHook
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.google.cloud.hooks import dataflow as dataflow_hooks
from airflow.providers.google.cloud.links.dataflow import DataflowJobLink
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from pipelines import daily_plan

dag = module.dag
utc = dt.timezone.utc
interval = {"data_interval_start": dt.datetime(2026, 1, 5, tzinfo=utc),
            "data_interval_end": dt.datetime(2026, 1, 6, tzinfo=utc)}
report = {}

# The graph: a deferrable sensor before every planned task, upstream edges from the plan, a daily timetable whose
# data interval is the day that has ended.
assert type(dag.timetable).__name__ == "CronTriggerTimetable" and dag.timetable.interval == dt.timedelta(days=1)
for task in daily_plan.TASKS:
    operator, sensor = dag.get_task(task.name), dag.get_task(f"wait_for_{task.name}")
    assert isinstance(sensor, module.PlanInputsSensor) and sensor.deferrable
    assert operator.upstream_task_ids == {sensor.task_id}
    assert sensor.upstream_task_ids == set(daily_plan.same_run_upstream(task))
    assert operator.depends_on_past == task.sequential
    if task.kind == daily_plan.BEAM:
        assert isinstance(operator, BeamRunPythonPipelineOperator) and not operator.deferrable
        assert operator.py_file == task.module and operator.py_options == ["-m"]
        assert "tokenminds_runner" in operator.runner
report["tasks"] = sorted(dag.task_ids)

# Day semantics.
assert module.processing_day(interval) == dt.date(2026, 1, 5)
run = type("DagRun", (), {"conf": {"date": "2026-01-09"}})()
assert module.processing_day({"dag_run": run, **interval}) == dt.date(2026, 1, 9)
for bad in ({}, {"data_interval_start": interval["data_interval_start"],
                 "data_interval_end": interval["data_interval_start"]}):
    try:
        module.processing_day(bad)
        raise AssertionError(bad)
    except ValueError:
        pass

def run_beam(name, runner, settings=None, fail=None, **fields):
    operator = dag.get_task(name)
    operator.output_root, operator.input_root, operator.job_args = "/data/out", "/data/raw", "--seed=3"
    operator.task_args, operator.runner, operator.runner_args = json.dumps({"build_examples": "--max_targets=2"}), \
        runner, "--direct_num_workers=1"
    operator.dataflow_settings = settings or {}
    operator.pipeline_options, operator.default_pipeline_options, operator.dataflow_config = {}, {}, {}
    captured = {}

    def start(self, **kwargs):
        captured.update(kwargs)
        if fail:
            raise fail

    def no_hook(*args, **kwargs):
        raise AssertionError("a Dataflow hook was created or polled")

    with mock.patch.object(BeamHook, "start_python_pipeline", start), \
            mock.patch.object(dataflow_hooks.DataflowHook, "wait_for_done", no_hook), \
            mock.patch.object(DataflowJobLink, "persist", lambda *a, **k: None), \
            mock.patch.object(dataflow_hooks.DataflowHook, "__init__", no_hook) if runner != "DataflowRunner" \
            else mock.patch.object(dataflow_hooks.DataflowHook, "project_id", "unused"):
        operator.execute({"ti": mock.MagicMock(), **interval})
    return operator, captured

# A local runner: the job with the plan's arguments, the project's interpreter, no Dataflow hook, no connection.
operator, captured = run_beam("build_examples", "FnApiRunner")
variables = captured["variables"]
assert variables["date"] == "2026-01-04" and variables["output_root"] == "/data/out" and variables["seed"] == "3"
assert variables["max_targets"] == "2" and variables["direct_num_workers"] == "1" and "input_root" not in variables
assert not any(k in variables for k in ("project", "temp_location", "setup_file", "job_name"))
assert captured["py_interpreter"] == module.project_python() and captured["py_file"] == "pipelines.build_examples"
assert captured["py_requirements"] is None  # no virtualenv built per task: the project's interpreter is used
operator, captured = run_beam("validate_inputs", "DirectRunner")
assert captured["variables"]["input_root"] == "/data/raw" and "seed" not in captured["variables"]

# Dataflow: project, region, temp location, setup.py, a job name with the day; the driver is waited for to its end
# (it publishes the outputs after the job), neither abandoned once the job id is known nor replaced by polling.
settings = {"project": "my-project", "region": "us-central1", "temp_location": "gs://my-bucket/tmp"}
operator, captured = run_beam("build_examples", "DataflowRunner", settings)
variables = captured["variables"]
assert variables["project"] == "my-project" and variables["region"] == "us-central1"
assert variables["temp_location"] == "gs://my-bucket/tmp" and variables["setup_file"].endswith("setup.py")
assert variables["job_name"].startswith("tokenminds-build-examples-2026-01-04")
assert captured["is_dataflow_job_id_exist_callback"] is None
operator, captured = run_beam("build_examples", "DataflowRunner", {**settings, "worker_image": "img:1"})
assert captured["variables"]["sdk_container_image"] == "img:1" and "setup_file" not in captured["variables"]
for bad in ({}, {"project": "p"}):
    try:
        run_beam("build_examples", "DataflowRunner", bad)
        raise AssertionError("Dataflow without its Variables")
    except AirflowFailException as error:
        assert "tokenminds_temp_location" in str(error)

# Exit status 2 (input or options rejected before anything was touched) is not retried; other failures are.
try:
    run_beam("assign_sids", "FnApiRunner", fail=RuntimeError("Apache Beam process failed with return code 2"))
    raise AssertionError("no failure")
except AirflowFailException:
    pass
try:
    run_beam("assign_sids", "FnApiRunner", fail=RuntimeError("Apache Beam process failed with return code 1"))
    raise AssertionError("no failure")
except AirflowFailException:
    raise AssertionError("a transient failure must be retried")
except RuntimeError:
    pass

# Training: a fresh start on its first day, --init_from the day before afterwards; its own options from the Variable.
with tempfile.TemporaryDirectory() as root:
    trainer = dag.get_task("train")
    trainer.output_root, trainer.task_args = root, json.dumps({"train": "--steps=7"})
    first = trainer.render_command(interval)
    assert "--init_from" not in first and first.endswith(f"--output={root}/models/date=2026-01-04 --steps=7")
    sensor = dag.get_task("wait_for_train")
    sensor.output_root, sensor.input_root = root, ""
    assert sensor.marker_paths(interval) == [f"{root}/examples/date=2026-01-04/_SUCCESS"]
    Path(root, "models", "date=2026-01-01").mkdir(parents=True)
    Path(root, "models", "date=2026-01-01", "_SUCCESS").touch()
    later = trainer.render_command(interval)
    assert f"--init_from={root}/models/date=2026-01-03" in later
    assert sensor.marker_paths(interval)[-1] == f"{root}/models/date=2026-01-03/_SUCCESS"
    # A missing marker defers the sensor to Airflow's FileTrigger for it (gs://: GCSBlobTrigger).
    try:
        sensor.execute(interval)
        raise AssertionError("did not defer")
    except TaskDeferred as deferred:
        assert type(deferred.trigger).__name__ == "FileTrigger"
        assert deferred.trigger.filepath == f"{root}/examples/date=2026-01-04/_SUCCESS"
        report["deferred_to"] = deferred.trigger.filepath
    assert type(module.marker_trigger("gs://b/out/x/_SUCCESS", 60)).__name__ == "GCSBlobTrigger"
print("REPORT " + json.dumps(report))
"""


def test_dag_operators_and_day_semantics(venv, tmp_path):
    """The DAG's graph and operators, executed against a mocked Beam hook inside the Airflow environment: the
    day's arguments, a local runner with no Dataflow hook, Dataflow's options, no retry of exit status 2, training's
    first day, the deferral."""
    result = subprocess.run([str(venv / "bin" / "python"), "-c", OPERATOR_CHECKS, str(DAGS / "tokenminds_daily.py")],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                 "AIRFLOW_HOME": str(tmp_path),
                                 # Only the Dataflow case reads it (a local runner must not touch it).
                                 "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": '{"conn_type": "google_cloud_platform"}'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert len(report["tasks"]) == 2 * len(daily_plan.TASKS)


def check_day(out: Path, processing_day: dt.date) -> None:
    """Every task of the run of ``processing_day`` wrote its _SUCCESS markers and its summary, for its data date."""
    for task in daily_plan.TASKS:
        date = daily_plan.data_date(task, processing_day)
        for marker in daily_plan.success_paths(task, date, str(out)):
            assert Path(marker).is_file(), f"{task.name} {date}: {marker} is missing"
        summary = json.loads((out / SUMMARIES[task.name].format(d=date)).read_text())
        if task.kind == daily_plan.BEAM:
            assert summary["date"] == date.isoformat() and summary["job"] == task.name, (task.name, summary)
        else:
            assert summary["training_days"][-1] == date.isoformat() and summary["step"] > 0


def test_first_day_runs_every_task_and_sensor(dag_runs):
    run, out = dag_runs["first"], dag_runs["out"]
    assert run["state"] == "success"
    # Airflow 3's data interval: the run of 2026-01-03T00:00Z covers 2026-01-02, the day it processes.
    assert run["interval"] == ("2026-01-02 00:00:00+00:00", "2026-01-03 00:00:00+00:00")
    expected = {n for t in daily_plan.TASK_NAMES for n in (t, f"wait_for_{t}")}
    assert {t: s["state"] for t, s in run["tasks"].items()} == {t: "success" for t in expected}
    check_day(out, DAY2)
    output = run["output"]
    # The local runner: the jobs ran with the project's interpreter, and nothing touched Google Cloud.
    assert f"{sys.executable} -m pipelines.validate_inputs --runner=FnApiRunner --date={DAY2}" in output
    assert not re.search(r"google_cloud_default|DataflowHook|GCSHook|credentials", output, re.I)
    # Training's first day starts fresh (no checkpoint before 2026-01-01), and says so.
    train = next(line for line in output.splitlines() if "-m tokenminds_model.train" in line)
    assert "--init_from" not in train and "first day" in output
    assert json.loads((out / f"models/date={DAY1}/model_config.json").read_text())["parent_version"] is None


def test_rerun_of_the_same_day_changes_nothing(dag_runs):
    again = dag_runs["again"]
    assert again["state"] == "success"
    assert {s["state"] for s in again["tasks"].values()} == {"success"}
    must, _ = differences(dag_runs["first_outputs"], dag_runs["again_outputs"])
    print(f"rerun: {len(dag_runs['first_outputs']) - len(must)} of {len(dag_runs['first_outputs'])} outputs identical")
    assert not must, f"a rerun of the same day changed {must}"


def test_next_day_continues_from_the_first(dag_runs):
    run, out = dag_runs["next"], dag_runs["out"]
    assert run["state"] == "success"
    assert run["interval"] == ("2026-01-03 00:00:00+00:00", "2026-01-04 00:00:00+00:00")
    assert {s["state"] for s in run["tasks"].values()} == {"success"}
    check_day(out, DAY3)
    # The landing sensor deferred (no worker slot held) until the markers landed, then went on.
    assert dag_runs["landed"]
    assert "running trigger in line" in run["output"] and "Found File" in run["output"]
    # Training continued from the first day's checkpoint; the snapshot folded into the previous one.
    assert f"--init_from={out}/models/date={DAY1}" in run["output"]
    first = json.loads((out / f"models/date={DAY1}/model_config.json").read_text())
    second = json.loads((out / f"models/date={DAY2}/model_config.json").read_text())
    assert second["parent_version"] == first["version"] and second["step"] == 2 * first["step"]
    assert second["training_days"] == [DAY1.isoformat(), DAY2.isoformat()]
    assert json.loads((out / f"histories/_runs/date={DAY3}/summary.json").read_text())["built_from"] == \
        "previous_snapshot"


def test_backfill_gives_the_same_outputs(dag_runs):
    status, log = dag_runs["backfill"]
    assert status == 0, log[-6000:]
    out, parity = dag_runs["out"], dag_runs["parity_out"]
    dag, backfilled = digests(out), digests(parity)
    must, _ = differences(dag, backfilled)
    print(f"parity: {len(dag) - len(must)} of {len(dag)} outputs identical")
    assert not must, f"backfill and DAG differ in {must}"
    # The models trained on byte-identical example files: identical parameter by parameter.
    import numpy as np

    for date in (DAY1, DAY2):
        a, b = model_params(out / f"models/date={date}"), model_params(parity / f"models/date={date}")
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
        assert all(np.array_equal(a[k], b[k]) for k in a), date
    # Both trees hold every day's outputs.
    for processing_day in (DAY2, DAY3):
        check_day(parity, processing_day)


def test_readme_dataflow_dry_run_works_offline():
    """The README's dry-run command, copied as it is: valid placeholder names, so nothing reaches the network; it
    says what it translated and where the job JSON went."""
    section = (REPO / "README.md").read_text().split("## Running on Dataflow", 1)[1]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pipelines.validate_inputs"] and "--dry_run=True" in argv
    started = time.monotonic()
    result = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    line = re.search(r"dry run: Dataflow job (\S+) translated, not submitted: (\d+) transforms \((\d+) primitive\); "
                     r"job JSON: (\S+)", result.stdout)
    assert line, result.stdout[-2000:]
    name, total, primitive, path = line.groups()
    assert name == "tokenminds-validate-inputs-dry-run" and int(total) > int(primitive) > 0
    assert json.loads(Path(path).read_text())["job"]["name"] == name
