"""The TokenMinds daily DAG: day D's data, once landed, through validation, SIDs, histories, examples of D-1,
continued training and refreshed user representations. Built from ``pipelines.daily_plan``. Airflow is a
deployment-side dependency, not in requirements.txt: the Airflow environment needs apache-airflow with the
apache-airflow-providers-apache-beam and apache-airflow-providers-google (Dataflow) providers.

Every planned task becomes a sensor ``wait_for_<task>`` (a ``PythonSensor`` checking, with Beam's ``FileSystems``, the
``_SUCCESS`` markers of the task's required inputs, this run's and earlier runs') followed by the task itself:
Beam jobs as ``BeamRunPythonPipelineOperator`` (``python -m pipelines.<job>`` on Dataflow), the trainer as a
``BashOperator`` running ``python -m tokenminds_model.train`` (replace it with your accelerator launcher). Tasks
that read their own previous day (SIDs, histories, training) have ``depends_on_past``.

Configuration, read when a task runs, never stored in the repository:

    Airflow Variables   tokenminds_gcp_project, tokenminds_gcp_region   the Dataflow project and region
                        tokenminds_temp_location                        gs://... for Dataflow temp files
                        tokenminds_output_root                          gs://.../tokenminds
                        tokenminds_input_root      (optional)           Parquet input root; unset: give the source
                                                                        options in tokenminds_job_args
                        tokenminds_job_args        (optional)           extra job options for every Beam job,
                                                    e.g. "--source=bigquery --bq_project=P --bq_dataset=D"
                        tokenminds_worker_image    (optional)           custom worker container (see Dockerfile);
                                                                        unset: the workers install setup.py
                        tokenminds_staging_location (optional)
    Environment         TOKENMINDS_PYTHON          the interpreter that launches the jobs (the project and its
                                                   requirements installed; default python3)
                        TOKENMINDS_SETUP_FILE      setup.py shipped to Dataflow workers (default: this checkout's)
                        TOKENMINDS_DAG_TASKS       comma-separated subset of the plan's tasks (default: every task
                                                   whose module exists in this checkout, and whose upstream is kept)
                        TOKENMINDS_START_DATE      the first processing day (default 2026-01-01)

A manual run may name the processing day: ``airflow dags trigger tokenminds_daily --conf '{"date": "2026-01-05"}'``.
Bulk re-processing of a range goes through ``python -m pipelines.backfill``, not Airflow catch-up.
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import os
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("pipelines") is None:  # the DAG folder is this checkout's dags/
    sys.path.insert(0, str(REPO_ROOT))

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator  # noqa: E402

try:  # Airflow 3: the authoring API is airflow.sdk, the core operators live in the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.sensors.python import PythonSensor
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator
    from airflow.sensors.python import PythonSensor

from pipelines import daily_plan  # noqa: E402

log = logging.getLogger(__name__)

DAG_ID = "tokenminds_daily"
PY_INTERPRETER = os.environ.get("TOKENMINDS_PYTHON", "python3")
SETUP_FILE = os.environ.get("TOKENMINDS_SETUP_FILE", str(REPO_ROOT / "setup.py"))
START_DATE = dt.datetime.fromisoformat(os.environ.get("TOKENMINDS_START_DATE", "2026-01-01")).replace(
    tzinfo=dt.timezone.utc)

OUTPUT_ROOT = "{{ var.value.tokenminds_output_root }}"
INPUT_ROOT = "{{ var.value.get('tokenminds_input_root', '') }}"
JOB_ARGS = "{{ var.value.get('tokenminds_job_args', '') }}"
DATAFLOW_CONFIG = {
    "project_id": "{{ var.value.tokenminds_gcp_project }}",
    "location": "{{ var.value.tokenminds_gcp_region }}",
    "wait_until_finished": True,
}
DEFAULT_PIPELINE_OPTIONS = {
    "temp_location": "{{ var.value.tokenminds_temp_location }}",
    "staging_location": "{{ var.value.get('tokenminds_staging_location', '') }}",
    "sdk_container_image": "{{ var.value.get('tokenminds_worker_image', '') }}",
    "setup_file": SETUP_FILE,
}


def processing_day(context) -> dt.date:
    """Day D of this run: ``dag_run.conf["date"]`` when a manual run names one, else the data interval's day."""
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    if conf.get("date"):
        return dt.date.fromisoformat(str(conf["date"]))
    if context.get("ds"):
        return dt.date.fromisoformat(context["ds"])
    if context.get("data_interval_start"):
        return context["data_interval_start"].date()
    raise ValueError('this run has no logical date: trigger it with --conf \'{"date": "YYYY-MM-DD"}\'')


def job_args(rendered: str, input_root: str) -> list:
    """The shared job options: ``--input_root`` (Parquet source) and the ``tokenminds_job_args`` Variable."""
    return ([f"--input_root={input_root}"] if input_root else []) + shlex.split(rendered or "")


def inputs_ready(task_name: str, output_root: str, input_root: str = "", **context) -> bool:
    """PythonSensor callable: every ``_SUCCESS`` the plan says ``task_name`` waits for exists (local or gs://)."""
    from apache_beam.io.filesystems import FileSystems

    task = daily_plan.get_task(task_name)
    paths = daily_plan.sensor_paths(task, processing_day(context), output_root, input_root=input_root or None)
    missing = [p for p in paths if not FileSystems.exists(p)]
    if missing:
        log.info("%s waits for %s", task_name, ", ".join(missing))
    return not missing


class PlannedBeamPipeline(BeamRunPythonPipelineOperator):
    """``python -m <module>`` of a plan task on Dataflow, with the plan's arguments for this run's data date."""

    template_fields = (*BeamRunPythonPipelineOperator.template_fields, "output_root", "input_root", "job_args")

    def __init__(self, *, plan_task: str, output_root: str, input_root: str = "", job_args: str = "", **kwargs):
        task = daily_plan.get_task(plan_task)
        super().__init__(py_file=task.module, py_options=["-m"], runner="DataflowRunner",
                         py_interpreter=PY_INTERPRETER, **kwargs)
        self.plan_task, self.output_root, self.input_root, self.job_args = plan_task, output_root, input_root, job_args

    def execute(self, context):
        task = daily_plan.get_task(self.plan_task)
        date = daily_plan.data_date(task, processing_day(context))
        argv = daily_plan.render_args(task, date, self.output_root, job_args(self.job_args, self.input_root))
        options = {k: v for k, v in (self.default_pipeline_options or {}).items() if v not in ("", None)}
        if options.get("sdk_container_image"):  # the container holds the project: nothing to install
            options.pop("setup_file", None)
            options["sdk_location"] = "container"
        self.default_pipeline_options = options
        self.pipeline_options = {**(self.pipeline_options or {}), **daily_plan.args_to_options(argv)}
        self.log.info("%s for %s: %s", task.module, date, " ".join(argv))
        return super().execute(context)


class PlannedProgram(BashOperator):
    """``python -m <module>`` of a plan task that is a single-machine program (training)."""

    template_fields = (*BashOperator.template_fields, "output_root")

    def __init__(self, *, plan_task: str, output_root: str, **kwargs):
        super().__init__(bash_command="true", **kwargs)
        self.plan_task, self.output_root = plan_task, output_root

    def execute(self, context):
        task = daily_plan.get_task(self.plan_task)
        argv = daily_plan.render_args(task, daily_plan.data_date(task, processing_day(context)), self.output_root)
        self.bash_command = " ".join(shlex.quote(a) for a in [PY_INTERPRETER, "-m", task.module, *argv])
        return super().execute(context)


def dag_tasks() -> list:
    """The plan's tasks this deployment runs: TOKENMINDS_DAG_TASKS, or those whose module exists; a task whose
    same-run upstream is left out is left out too."""
    wanted = os.environ.get("TOKENMINDS_DAG_TASKS")
    names = ([n.strip() for n in wanted.split(",") if n.strip()] if wanted else
             [t.name for t in daily_plan.TASKS if importlib.util.find_spec(t.module) is not None])
    kept = []
    for task in daily_plan.TASKS:
        if task.name in names and all(u in kept for u in daily_plan.same_run_upstream(task)):
            kept.append(task.name)
        elif task.name in names:
            log.warning("%s left out of %s: its upstream %s is not in the DAG", task.name, DAG_ID,
                        daily_plan.same_run_upstream(task))
    return kept


def build_dag() -> DAG:
    default_args = {"owner": "tokenminds", "retries": 2, "retry_delay": dt.timedelta(minutes=10)}
    with DAG(dag_id=DAG_ID, description="TokenMinds daily flow (pipelines.daily_plan)", schedule="@daily",
             start_date=START_DATE, catchup=False, max_active_runs=1, default_args=default_args,
             tags=["tokenminds"], doc_md=__doc__) as dag:
        operators = {}
        for name in dag_tasks():
            task = daily_plan.get_task(name)
            sensor = PythonSensor(
                task_id=f"wait_for_{name}", python_callable=inputs_ready, mode="reschedule",
                poke_interval=300, timeout=(12 if task.waits_for_landing else 3) * 3600,
                op_kwargs={"task_name": name, "output_root": OUTPUT_ROOT, "input_root": INPUT_ROOT})
            if task.kind == daily_plan.BEAM:
                operator = PlannedBeamPipeline(
                    task_id=name, plan_task=name, output_root=OUTPUT_ROOT, input_root=INPUT_ROOT, job_args=JOB_ARGS,
                    default_pipeline_options=dict(DEFAULT_PIPELINE_OPTIONS),
                    dataflow_config={**DATAFLOW_CONFIG, "job_name": f"tokenminds-{name.replace('_', '-')}"},
                    depends_on_past=task.sequential)
            else:
                operator = PlannedProgram(task_id=name, plan_task=name, output_root=OUTPUT_ROOT,
                                          depends_on_past=task.sequential)
            for upstream in daily_plan.same_run_upstream(task):
                operators[upstream] >> sensor
            sensor >> operator
            operators[name] = operator
    return dag


dag = build_dag()
