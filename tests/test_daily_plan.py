"""The daily plan (pipelines.daily_plan), in plain Python. The Airflow DAG built from it (dags/tokenminds_daily.py)
is tested in its own environment by tests/test_airflow_dag.py (Airflow is not in requirements.txt).
"""
import datetime as dt

import pytest

from pipelines import daily_plan
from pipelines.daily_plan import get_task

D = dt.date(2026, 1, 5)
ROOT = "gs://bucket/tokenminds"


def test_tasks_in_dependency_order():
    assert daily_plan.TASK_NAMES == ("validate_inputs", "assign_sids", "update_histories", "build_examples", "train",
                                     "refresh_users")
    upstream = {t.name: daily_plan.same_run_upstream(t) for t in daily_plan.TASKS}
    assert upstream == {"validate_inputs": (), "assign_sids": ("validate_inputs",),
                        "update_histories": ("validate_inputs", "assign_sids"),
                        "build_examples": ("update_histories",), "train": ("build_examples",),
                        "refresh_users": ("train", "update_histories")}
    for name, names in upstream.items():  # every upstream runs earlier in the list
        assert all(daily_plan.TASK_NAMES.index(u) < daily_plan.TASK_NAMES.index(name) for u in names)
    daily_plan.check_plan()


def test_build_examples_and_train_process_the_previous_day():
    runs = {run.name: run for run in daily_plan.daily_run(D, ROOT)}
    assert [r.name for r in daily_plan.daily_run(D, ROOT)] == list(daily_plan.TASK_NAMES)
    assert {name: run.date for name, run in runs.items()} == {
        "validate_inputs": D, "assign_sids": D, "update_histories": D, "build_examples": D - dt.timedelta(1),
        "train": D - dt.timedelta(1), "refresh_users": D}
    assert runs["build_examples"].args == ("--date=2026-01-04", f"--output_root={ROOT}")
    # Its look-ahead window closes with today's snapshot; the day itself is yesterday's.
    assert runs["build_examples"].waits_for == (f"{ROOT}/histories/date=2026-01-04/_SUCCESS",
                                                f"{ROOT}/histories/date=2026-01-05/_SUCCESS")
    assert runs["build_examples"].produces == (f"{ROOT}/examples/date=2026-01-04/_SUCCESS",)
    # Training continues yesterday's checkpoint on yesterday's examples; refresh uses what it trained.
    assert runs["train"].args == (f"--examples={ROOT}/examples/date=2026-01-04",
                                  f"--init_from={ROOT}/models/date=2026-01-03",
                                  f"--output={ROOT}/models/date=2026-01-04")
    assert runs["train"].produces == (f"{ROOT}/models/date=2026-01-04/_SUCCESS",)
    assert runs["refresh_users"].args == ("--date=2026-01-05", f"--output_root={ROOT}",
                                          f"--model={ROOT}/models/date=2026-01-04")
    assert runs["refresh_users"].waits_for == (f"{ROOT}/models/date=2026-01-04/_SUCCESS",
                                               f"{ROOT}/histories/date=2026-01-05/_SUCCESS")
    assert runs["refresh_users"].produces == (f"{ROOT}/user_representations/date=2026-01-05/_SUCCESS",)


def test_sequential_and_independent_tasks():
    assert daily_plan.sequential_tasks() == ("assign_sids", "update_histories", "train")
    assert daily_plan.independent_tasks() == ("validate_inputs", "build_examples", "refresh_users")
    # Inputs from earlier DAG runs: yesterday's SIDs/snapshot/checkpoint; examples read two earlier snapshots.
    earlier = {t.name: [(i.task, daily_plan.input_run_offset(t, i), i.required)
                        for i in daily_plan.earlier_run_inputs(t)] for t in daily_plan.TASKS}
    assert earlier["assign_sids"] == [("assign_sids", -1, False)]
    assert earlier["update_histories"] == [("update_histories", -1, False)]
    assert earlier["build_examples"] == [("update_histories", -2, False), ("update_histories", -1, True)]
    assert earlier["train"] == [("train", -1, True)]


def test_argument_rendering():
    common = ["--source=bigquery", "--bq_project=p", "--bq_dataset=events"]
    assert daily_plan.render_args(get_task("validate_inputs"), D, ROOT + "/", common) == [
        "--date=2026-01-05", f"--output_root={ROOT}", *common]
    # A program task takes no Beam job options.
    assert all(not a.startswith("--source") for a in daily_plan.render_args(get_task("train"), D, ROOT, common))
    assert daily_plan.args_to_options(["--date=2026-01-05", "--full_depth_sids", "--max_targets", "1",
                                       "--experiments=a", "--experiments=b"]) == {
        "date": "2026-01-05", "full_depth_sids": True, "max_targets": "1", "experiments": ["a", "b"]}
    with pytest.raises(ValueError):
        daily_plan.args_to_options(["date=2026-01-05"])


def test_sensor_paths():
    validate = get_task("validate_inputs")
    assert daily_plan.sensor_paths(validate, D, ROOT) == []  # BigQuery source: nothing to wait for on files
    assert daily_plan.sensor_paths(validate, D, ROOT, input_root="gs://raw") == [
        f"gs://raw/{t}/date=2026-01-05/_SUCCESS" for t in ("watch_events", "search_events", "videos")]
    validated = [f"{ROOT}/validated/{t}/date=2026-01-05/_SUCCESS" for t in ("watch_events", "search_events", "videos")]
    assert daily_plan.sensor_paths(get_task("assign_sids"), D, ROOT) == validated + [
        f"{ROOT}/validation_runs/date=2026-01-05/_SUCCESS"]
    histories = daily_plan.sensor_paths(get_task("update_histories"), D, ROOT)
    assert histories[-1] == f"{ROOT}/video_sids/date=2026-01-05/_SUCCESS"
    assert not any("histories/" in p for p in histories)  # yesterday's snapshot is optional (a first day has none)
    assert daily_plan.sensor_paths(get_task("train"), D, ROOT) == [f"{ROOT}/examples/date=2026-01-04/_SUCCESS",
                                                                   f"{ROOT}/models/date=2026-01-03/_SUCCESS"]


def test_paths_match_the_jobs():
    """The plan's output directories are the ones the jobs write."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import assign_sids, build_examples, update_histories, validate_inputs
    from transforms import schemas

    root = "/data/out"
    assert daily_plan.INPUT_TABLES == schemas.INPUT_TABLES
    job = PipelineOptions([]).view_as(build_examples.BuildExamplesOptions)
    assert daily_plan.output_dirs(get_task("validate_inputs"), D, root) == tuple(
        validate_inputs.output_dirs(root, list(schemas.INPUT_TABLES), D)[:3]) + (validate_inputs.run_dir(root, D),)
    assert daily_plan.output_dirs(get_task("assign_sids"), D, root) == (assign_sids.sids_dir(root, D),)
    assert daily_plan.output_dirs(get_task("update_histories"), D, root) == (update_histories.snapshot_dir(root, D),)
    assert daily_plan.output_dirs(get_task("build_examples"), D, root) == (build_examples.examples_dir(root, job, D),)


def test_check_plan_rejects_a_task_before_its_upstream():
    tasks = list(daily_plan.TASKS)
    tasks[1], tasks[2] = tasks[2], tasks[1]  # update_histories before assign_sids
    with pytest.raises(ValueError, match="runs after it"):
        daily_plan.check_plan(tasks)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_plan_cli_prints_a_day(capsys):
    daily_plan.main(["--date=2026-01-05", f"--output_root={ROOT}", "--input_root=gs://raw"])
    out = capsys.readouterr().out
    assert "python -m pipelines.build_examples --date=2026-01-04" in out
    assert "waits for gs://raw/videos/date=2026-01-05/_SUCCESS" in out


def test_training_first_day_starts_fresh_and_later_days_continue():
    train = get_task("train")
    assert train.bootstrapped and not any(t.bootstrapped for t in daily_plan.TASKS if t.name != "train")
    assert daily_plan.own_output_glob(train, ROOT + "/") == (f"{ROOT}/models/date=*/_SUCCESS",)
    found = daily_plan.dates_of([f"{ROOT}/models/date=2026-01-02/_SUCCESS", f"{ROOT}/models/date=2026-01-04/_SUCCESS",
                                 f"{ROOT}/examples/_SUCCESS"])
    assert found == [dt.date(2026, 1, 2), dt.date(2026, 1, 4)]
    # The first day: no checkpoint before it (one of that day or later does not count).
    assert daily_plan.first_day(train, dt.date(2026, 1, 2), found)
    assert not daily_plan.first_day(train, dt.date(2026, 1, 3), found)
    assert not daily_plan.first_day(get_task("assign_sids"), D, [])
    fresh = daily_plan.render_args(train, dt.date(2026, 1, 4), ROOT, first_day=True)
    assert fresh == [f"--examples={ROOT}/examples/date=2026-01-04", f"--output={ROOT}/models/date=2026-01-04"]
    assert daily_plan.sensor_paths(train, D, ROOT, first_day=True) == [f"{ROOT}/examples/date=2026-01-04/_SUCCESS"]
    # A bootstrap input must be an earlier output of the task itself.
    broken = [daily_plan.Task(name="x", module="m", kind=daily_plan.BEAM, date_offset=0,
                              inputs=(daily_plan.Input("validate_inputs", 0, bootstrap=True),),
                              outputs=lambda root, date: (), arguments=lambda date, root: [])]
    with pytest.raises(ValueError, match="bootstrap"):
        daily_plan.check_plan(list(daily_plan.TASKS[:1]) + broken)
    # The plan CLI shows a first day.
    runs = daily_plan.daily_run(D, ROOT, first_days=["train"])
    assert next(r for r in runs if r.name == "train").args == tuple(
        daily_plan.render_args(train, dt.date(2026, 1, 4), ROOT, first_day=True))
