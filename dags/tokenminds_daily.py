"""The TokenMinds daily DAG: day D's data, once landed, through validation, SIDs, histories, examples of D-1,
continued training and refreshed user representations. Built from ``pipelines.daily_plan``. Airflow is a
deployment-side dependency with its own virtualenv, not in requirements.txt: ``dags/requirements-airflow.txt``
(apache-airflow 3.3 with the apache-beam and google providers, every other package pinned by
``dags/constraints-airflow.txt``; ``make airflow-venv`` builds it). The jobs themselves run with the project's
interpreter (``TOKENMINDS_PYTHON``), never inside the Airflow environment.

Day semantics. The schedule is a ``CronTriggerTimetable("0 0 * * *", interval=1 day)`` in UTC: the run that fires at
midnight starting day X has the data interval [X-1, X) and processes day D = X-1, the day that has just ended (its
data lands after midnight; the landing sensor waits up to 12 h). ``processing_day`` takes D from the data interval
(``data_interval_start``), never from ``ds``: with Airflow 3's plain ``@daily`` that is the day that starts, and a
manual or ``dags test`` run's logical date is the moment given, while the data interval is always the 24 h that
ended. A manual run may name D: ``airflow dags trigger tokenminds_daily --conf '{"date": "2026-01-05"}'``;
``airflow dags test tokenminds_daily 2026-01-06`` runs what the scheduled run of 2026-01-06T00:00Z runs: day
2026-01-05.

Every planned task becomes a deferrable sensor ``wait_for_<task>`` (``PlanInputsSensor``: the ``_SUCCESS`` markers
of the task's required inputs, this run's and earlier runs'; while one is missing the sensor defers to Airflow's
``FileTrigger`` for a local path or ``GCSBlobTrigger`` for gs://, so no worker slot is held while it waits)
followed by the task itself: Beam jobs as ``BeamRunPythonPipelineOperator`` (``python -m pipelines.<job>``), the
trainer as a ``BashOperator`` running ``python -m tokenminds_model.train`` (replace it with your accelerator
launcher). Tasks that read their own previous day (SIDs, histories, training) have ``depends_on_past``.

Runner. ``tokenminds_runner`` (Variable, else the environment's ``TOKENMINDS_RUNNER``, else ``DataflowRunner``) picks
where Beam jobs run: ``DataflowRunner``, or a local runner (``FnApiRunner``, ``DirectRunner``, ``PrismRunner``) that
runs the job in a subprocess on the worker and never creates a Dataflow or GCS hook, so a local run needs no Google
connection. On Dataflow the operator also waits for the job's driver, not only for the Dataflow job: the driver
publishes the staged outputs and writes ``_SUCCESS`` once the job has succeeded (``transforms/publish.py``), so the
task holds its worker slot for the job's duration (the sensors, which may wait for hours, are what defers).

Failures. A job's exit status 2 (bad input, option or configuration: reported by the driver before anything is
touched) fails the task at once, without retries; any other failure is retried (``TOKENMINDS_TASK_RETRIES``,
default 2, 10 minutes apart), which is safe: a rerun replaces a day's output only by publishing a complete new one.

Configuration, read when a task runs, never stored in the repository:

    Airflow Variables   tokenminds_output_root                          local path or gs://.../tokenminds
                        tokenminds_input_root      (optional)           Parquet input root; unset: give the source
                                                                        options in tokenminds_job_args
                        tokenminds_job_args        (optional)           shared job options, e.g. "--source=bigquery
                                                   --bq_project=P --bq_dataset=D"; each job gets those it reads
                        tokenminds_task_args       (optional)           JSON: each task's own options, e.g.
                                                   {"train": "--steps=200 --batch_size=32", "build_examples":
                                                    "--max_targets=5"}
                        tokenminds_runner          (optional)           DataflowRunner (default) | FnApiRunner | ...
                        tokenminds_runner_args     (optional)           Beam runner options for every Beam job,
                                                   e.g. "--max_num_workers=20" or "--direct_num_workers=2"
                        Dataflow only:
                        tokenminds_gcp_project, tokenminds_gcp_region   the Dataflow project and region
                        tokenminds_temp_location                        gs://... for Dataflow temp files
                        tokenminds_worker_image    (optional)           custom worker container (see Dockerfile);
                                                                        unset: the workers install setup.py
                        tokenminds_staging_location (optional)
    Environment         TOKENMINDS_PYTHON          the project's interpreter, which runs the jobs (default: this
                                                   checkout's .venv/bin/python when present, else python3)
                        TOKENMINDS_RUNNER          the runner when the Variable is unset
                        TOKENMINDS_SETUP_FILE      setup.py shipped to Dataflow workers (default: this checkout's)
                        TOKENMINDS_DAG_TASKS       comma-separated subset of the plan's tasks (default: every task
                                                   whose module exists in this checkout, and whose upstream is kept)
                        TOKENMINDS_START_DATE      the DAG's start date (default 2026-01-01)
                        TOKENMINDS_POKE_INTERVAL   seconds between the sensors' checks (default 300)
                        TOKENMINDS_TASK_RETRIES    retries of a failed task (default 2)

Bulk re-processing of a range goes through ``python -m pipelines.backfill``, not Airflow catch-up; it runs the
same plan and gives the same outputs.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("pipelines") is None:  # the DAG folder is this checkout's dags/
    sys.path.insert(0, str(REPO_ROOT))

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator  # noqa: E402

try:  # Airflow 3: the authoring API is airflow.sdk, the core operators live in the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.triggers.file import FileTrigger
    from airflow.sdk import DAG, BaseSensorOperator, CronTriggerTimetable
    from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout
except ImportError:  # Airflow 2.9+
    from airflow import DAG
    from airflow.exceptions import AirflowFailException, AirflowSensorTimeout
    from airflow.operators.bash import BashOperator
    from airflow.sensors.base import BaseSensorOperator
    from airflow.timetables.trigger import CronTriggerTimetable
    from airflow.triggers.file import FileTrigger

from pipelines import daily_plan  # noqa: E402

log = logging.getLogger(__name__)

DAG_ID = "tokenminds_daily"
DATAFLOW = "DataflowRunner"
LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "PrismRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
SETUP_FILE = os.environ.get("TOKENMINDS_SETUP_FILE", str(REPO_ROOT / "setup.py"))
START_DATE = dt.datetime.fromisoformat(os.environ.get("TOKENMINDS_START_DATE", "2026-01-01")).replace(
    tzinfo=dt.timezone.utc)
POKE_INTERVAL = float(os.environ.get("TOKENMINDS_POKE_INTERVAL", "300"))
RETRIES = int(os.environ.get("TOKENMINDS_TASK_RETRIES", "2"))
GCP_CONN_ID = "google_cloud_default"
# The schedule: at 00:00 UTC, for the day that has just ended (data interval = the previous 24 h).
TIMETABLE = CronTriggerTimetable("0 0 * * *", timezone="UTC", interval=dt.timedelta(days=1))

OUTPUT_ROOT = "{{ var.value.tokenminds_output_root }}"
INPUT_ROOT = "{{ var.value.get('tokenminds_input_root', '') }}"
JOB_ARGS = "{{ var.value.get('tokenminds_job_args', '') }}"
TASK_ARGS = "{{ var.value.get('tokenminds_task_args', '') }}"
RUNNER = "{{ var.value.get('tokenminds_runner', '') }}"
RUNNER_ARGS = "{{ var.value.get('tokenminds_runner_args', '') }}"
DATAFLOW_SETTINGS = {
    "project": "{{ var.value.get('tokenminds_gcp_project', '') }}",
    "region": "{{ var.value.get('tokenminds_gcp_region', '') }}",
    "temp_location": "{{ var.value.get('tokenminds_temp_location', '') }}",
    "staging_location": "{{ var.value.get('tokenminds_staging_location', '') }}",
    "worker_image": "{{ var.value.get('tokenminds_worker_image', '') }}",
}


# ---------------------------------------------------------------------------------------------------------------
# The day a run processes.
# ---------------------------------------------------------------------------------------------------------------
def processing_day(context) -> dt.date:
    """Day D of this run: ``dag_run.conf["date"]`` when a manual run names one, else the day of the data interval,
    which is the 24 h that ended when the run fired (``TIMETABLE``): the run of 2026-01-06T00:00Z processes
    2026-01-05. ``ds`` is not used: it is not that day for a manual or ``dags test`` run (nor, with a plain
    ``@daily``, for a scheduled one)."""
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    if conf.get("date"):
        return dt.date.fromisoformat(str(conf["date"]))
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None:
        raise ValueError('this run has no data interval: trigger it with --conf \'{"date": "YYYY-MM-DD"}\'')
    if end - start != dt.timedelta(days=1):
        raise ValueError(f"this run's data interval {start}..{end} is not one day: trigger it with "
                         '--conf \'{"date": "YYYY-MM-DD"}\'')
    return start.astimezone(dt.timezone.utc).date()


# ---------------------------------------------------------------------------------------------------------------
# Markers on a local filesystem or GCS (the same two the jobs write; GCS through the Airflow connection).
# ---------------------------------------------------------------------------------------------------------------
def _split_gcs(path: str):
    bucket, _, name = path[len("gs://"):].partition("/")
    return bucket, name


def _check_scheme(path: str) -> None:
    if "://" in path and not path.startswith("gs://"):
        raise ValueError(f"{path}: the DAG's sensors read local paths and gs:// only")


def marker_exists(path: str, gcp_conn_id: str = GCP_CONN_ID) -> bool:
    _check_scheme(path)
    if path.startswith("gs://"):
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        return GCSHook(gcp_conn_id=gcp_conn_id).exists(*_split_gcs(path))
    return os.path.isfile(path)


def marker_glob(pattern: str, gcp_conn_id: str = GCP_CONN_ID) -> list:
    """The paths matching ``pattern`` (``*`` within one path segment)."""
    _check_scheme(pattern)
    if pattern.startswith("gs://"):
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        bucket, name = _split_gcs(pattern)
        prefix = name.split("*", 1)[0]
        names = GCSHook(gcp_conn_id=gcp_conn_id).list(bucket, prefix=prefix)
        return [f"gs://{bucket}/{n}" for n in names if fnmatch.fnmatchcase(n, name)]
    import glob

    return sorted(glob.glob(pattern))


def is_first_day(task: daily_plan.Task, date: dt.date, output_root: str, gcp_conn_id: str = GCP_CONN_ID) -> bool:
    """``daily_plan.first_day`` from the markers that exist now: no output of ``task`` before ``date``."""
    if not task.bootstrapped:
        return False
    existing = [p for pattern in daily_plan.own_output_glob(task, output_root)
                for p in marker_glob(pattern, gcp_conn_id)]
    return daily_plan.first_day(task, date, daily_plan.dates_of(existing))


def marker_trigger(path: str, poke_interval: float, gcp_conn_id: str = GCP_CONN_ID):
    """Airflow's own trigger that fires once ``path`` exists: nothing of this project runs in the triggerer."""
    if path.startswith("gs://"):
        from airflow.providers.google.cloud.triggers.gcs import GCSBlobTrigger

        bucket, name = _split_gcs(path)
        return GCSBlobTrigger(bucket=bucket, object_name=name, use_glob=False, poke_interval=poke_interval,
                              google_cloud_conn_id=gcp_conn_id, hook_params={})
    return FileTrigger(filepath=path, poke_interval=poke_interval)


class PlanInputsSensor(BaseSensorOperator):
    """Waits, deferred, for every ``_SUCCESS`` marker the plan says ``plan_task`` needs in this run
    (``daily_plan.sensor_paths``): it checks them, and while one is missing defers to ``marker_trigger`` for it;
    when that fires it checks again. Its ``timeout`` counts from the first check."""

    template_fields = ("output_root", "input_root")
    ui_color = "#e0f0ff"

    def __init__(self, *, plan_task: str, output_root: str, input_root: str = "", deferrable: bool = True,
                 gcp_conn_id: str = GCP_CONN_ID, **kwargs):
        super().__init__(**kwargs)
        daily_plan.get_task(plan_task)
        self.plan_task, self.output_root, self.input_root = plan_task, output_root, input_root
        self.deferrable, self.gcp_conn_id = deferrable, gcp_conn_id

    def marker_paths(self, context) -> list:
        task = daily_plan.get_task(self.plan_task)
        day = processing_day(context)
        first = is_first_day(task, daily_plan.data_date(task, day), self.output_root, self.gcp_conn_id)
        if first:
            self.log.info("%s %s is its first day (no earlier output): it starts fresh", task.name,
                          daily_plan.data_date(task, day))
        return daily_plan.sensor_paths(task, day, self.output_root, input_root=self.input_root or None,
                                       first_day=first)

    def missing(self, context) -> list:
        paths = self.marker_paths(context)
        missing = [p for p in paths if not marker_exists(p, self.gcp_conn_id)]
        self.log.info("%s (day %s): %d of %d inputs ready%s", self.plan_task, processing_day(context),
                      len(paths) - len(missing), len(paths), "; waiting for " + ", ".join(missing) if missing else "")
        return missing

    def poke(self, context) -> bool:
        return not self.missing(context)

    def execute(self, context):
        if not self.deferrable:
            return super().execute(context)
        return self._check_or_defer(context, dt.datetime.now(dt.timezone.utc))

    def execute_complete(self, context, event=None, started: str = ""):
        if isinstance(event, dict) and event.get("status") == "error":
            raise RuntimeError(f"{self.task_id}: {event.get('message')}")
        return self._check_or_defer(context, dt.datetime.fromisoformat(started) if started else
                                    dt.datetime.now(dt.timezone.utc))

    def _check_or_defer(self, context, started: dt.datetime):
        missing = self.missing(context)
        if not missing:
            return None
        left = self.timeout - (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
        if left <= 0:
            raise AirflowSensorTimeout(f"{self.task_id}: still missing after {self.timeout:.0f} s: "
                                       f"{', '.join(missing)}")
        self.defer(trigger=marker_trigger(missing[0], self.poke_interval, self.gcp_conn_id),
                   method_name="execute_complete", kwargs={"started": started.isoformat()},
                   timeout=dt.timedelta(seconds=left))


# ---------------------------------------------------------------------------------------------------------------
# The tasks.
# ---------------------------------------------------------------------------------------------------------------
def project_python() -> str:
    """The interpreter that runs the jobs: TOKENMINDS_PYTHON, else this checkout's .venv, else python3."""
    configured = os.environ.get("TOKENMINDS_PYTHON")
    if configured:
        return configured
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else "python3"


def project_env() -> dict:
    """PYTHONPATH with this checkout first, so ``python -m pipelines.<job>`` finds the DAG's own code."""
    path = os.environ.get("PYTHONPATH", "")
    parts = [p for p in path.split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT)] + [p for p in parts if p != str(REPO_ROOT)])}


def job_args(rendered: str, input_root: str) -> list:
    """The shared job options: ``--input_root`` (Parquet source) and the ``tokenminds_job_args`` Variable."""
    return ([f"--input_root={input_root}"] if input_root else []) + shlex.split(rendered or "")


def own_args(rendered: str, task_name: str) -> list:
    """The task's own options from the ``tokenminds_task_args`` Variable (a JSON object: task -> options)."""
    if not (rendered or "").strip():
        return []
    try:
        table = json.loads(rendered)
    except json.JSONDecodeError as error:
        raise AirflowFailException(f"Variable tokenminds_task_args is not JSON: {error}") from None
    if not isinstance(table, dict) or not set(table) <= set(daily_plan.TASK_NAMES):
        raise AirflowFailException("Variable tokenminds_task_args must map task names "
                                   f"({', '.join(daily_plan.TASK_NAMES)}) to option strings")
    value = table.get(task_name, "")
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def runner_name(configured: str) -> str:
    """The Beam runner: the tokenminds_runner Variable, else TOKENMINDS_RUNNER, else DataflowRunner."""
    name = (configured or "").strip() or os.environ.get("TOKENMINDS_RUNNER", "").strip() or DATAFLOW
    known = {r.lower(): r for r in (DATAFLOW, *LOCAL_RUNNERS)}
    if name.lower() not in known:
        raise AirflowFailException(f"unknown runner {name!r}; use {DATAFLOW} or a local runner ("
                                   f"{', '.join(LOCAL_RUNNERS)})")
    return known[name.lower()]


def _exit_status(error: BaseException):
    match = re.search(r"(?:return code|exit code) (-?\d+)", str(error))
    return int(match.group(1)) if match else None


def _run_job(task_id: str, execute, context):
    """``execute(context)``, except that exit status 2 (an input or configuration error the job reported before
    touching anything: a retry would fail alike) fails the task now (AirflowFailException skips the retries)."""
    try:
        return execute(context)
    except Exception as error:
        if _exit_status(error) == 2:
            raise AirflowFailException(f"{task_id}: the job rejected its input or options (exit status 2; see the "
                                       "log above); not retried") from error
        raise


class PlannedBeamPipeline(BeamRunPythonPipelineOperator):
    """``python -m <module>`` of a plan task, with the plan's arguments for this run's data date, on the runner the
    ``tokenminds_runner`` Variable names (Dataflow, or a local runner in a subprocess on the worker)."""

    template_fields = (*BeamRunPythonPipelineOperator.template_fields, "output_root", "input_root", "job_args",
                       "task_args", "runner_args", "dataflow_settings")

    def __init__(self, *, plan_task: str, output_root: str, input_root: str = "", job_args: str = "",
                 task_args: str = "", runner: str = "", runner_args: str = "", dataflow_settings=None, **kwargs):
        task = daily_plan.get_task(plan_task)
        # deferrable=False: a local job runs in this worker; a Dataflow job's driver must run to its end, since it
        # publishes the outputs after the job succeeded.
        super().__init__(py_file=task.module, py_options=["-m"], runner=runner, deferrable=False, **kwargs)
        self.plan_task, self.output_root, self.input_root = plan_task, output_root, input_root
        self.job_args, self.task_args, self.runner_args = job_args, task_args, runner_args
        self.dataflow_settings = dict(dataflow_settings or {})

    def render_job(self, context):
        """(data date, the job's argv without runner options, runner) for this run."""
        task = daily_plan.get_task(self.plan_task)
        date = daily_plan.data_date(task, processing_day(context))
        argv = (daily_plan.render_args(task, date, self.output_root, job_args(self.job_args, self.input_root))
                + own_args(self.task_args, task.name))
        return date, argv, runner_name(self.runner)

    def execute(self, context):
        task = daily_plan.get_task(self.plan_task)
        date, argv, self.runner = self.render_job(context)
        options = {**daily_plan.args_to_options(shlex.split(self.runner_args or "")),
                   **daily_plan.args_to_options(argv)}
        if self.runner == DATAFLOW:
            settings = self.dataflow_settings
            missing = [f"tokenminds_{k}" for k in ("gcp_project", "gcp_region", "temp_location")
                       if not settings.get({"gcp_project": "project", "gcp_region": "region"}.get(k, k))]
            if missing:
                raise AirflowFailException(f"DataflowRunner needs the Variables {', '.join(missing)} (or set "
                                           "tokenminds_runner to a local runner)")
            defaults = {"temp_location": settings["temp_location"],
                        "staging_location": settings.get("staging_location") or None}
            if settings.get("worker_image"):  # the container holds the project: nothing to install
                defaults.update(sdk_container_image=settings["worker_image"], sdk_location="container")
            else:
                defaults["setup_file"] = SETUP_FILE
            self.default_pipeline_options = {k: v for k, v in defaults.items() if v}
            self.dataflow_config = {"project_id": settings["project"], "location": settings["region"],
                                    "job_name": f"tokenminds-{task.name.replace('_', '-')}-{date.isoformat()}",
                                    "wait_until_finished": True, "gcp_conn_id": self.gcp_conn_id}
        else:  # a local runner: no Dataflow configuration, no GCP hook, no connection
            self.default_pipeline_options, self.dataflow_config = {}, {}
        self.pipeline_options = options
        self.py_interpreter = project_python()
        os.environ.update(project_env())  # the job subprocess inherits this task process's environment
        self.log.info("%s for %s on %s with %s: %s", task.module, date, self.runner, self.py_interpreter,
                      " ".join(argv))
        return _run_job(self.task_id, super().execute, context)

    def execute_on_dataflow(self, context):
        """The provider's version stops reading the driver's output once it has seen the Dataflow job id and then
        polls the job. This project's driver publishes the outputs after the job succeeded, so it is waited for to
        its end instead; its exit status is the job's and the publication's. (The driver logs at WARNING, so the
        job id, and with it the job link and on_kill's cancellation, is there only when a driver logs it.)"""
        self.beam_hook.start_python_pipeline(
            variables=self.snake_case_pipeline_options, py_file=self.py_file, py_options=self.py_options,
            py_interpreter=self.py_interpreter, py_requirements=self.py_requirements,
            py_system_site_packages=self.py_system_site_packages, process_line_callback=self.process_line_callback,
            is_dataflow_job_id_exist_callback=None)
        if self.dataflow_job_id:
            from airflow.providers.google.cloud.links.dataflow import DataflowJobLink

            DataflowJobLink.persist(context=context, region=self.dataflow_config.location,
                                    job_id=self.dataflow_job_id, project_id=self.dataflow_config.project_id)
        return {"dataflow_job_id": self.dataflow_job_id}


class PlannedProgram(BashOperator):
    """``python -m <module>`` of a plan task that is a single-machine program (training), with its own options from
    ``tokenminds_task_args``; on its first day (no earlier checkpoint) without ``--init_from``."""

    template_fields = (*BashOperator.template_fields, "output_root", "task_args")

    def __init__(self, *, plan_task: str, output_root: str, task_args: str = "", **kwargs):
        super().__init__(bash_command="true", cwd=str(REPO_ROOT), append_env=True, **kwargs)
        self.plan_task, self.output_root, self.task_args = plan_task, output_root, task_args

    def render_command(self, context) -> str:
        task = daily_plan.get_task(self.plan_task)
        date = daily_plan.data_date(task, processing_day(context))
        first = is_first_day(task, date, self.output_root)
        if first:
            self.log.info("%s %s: no earlier checkpoint under %s/models, so this is the first day: a fresh start",
                          task.name, date, self.output_root.rstrip("/"))
        argv = daily_plan.render_args(task, date, self.output_root, first_day=first) + own_args(self.task_args,
                                                                                                task.name)
        return " ".join(shlex.quote(a) for a in [project_python(), "-m", task.module, *argv])

    def execute(self, context):
        self.bash_command = self.render_command(context)
        self.env = {**(self.env or {}), **project_env()}
        return _run_job(self.task_id, super().execute, context)


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
    default_args = {"owner": "tokenminds", "retries": RETRIES, "retry_delay": dt.timedelta(minutes=10)}
    with DAG(dag_id=DAG_ID, description="TokenMinds daily flow (pipelines.daily_plan)", schedule=TIMETABLE,
             start_date=START_DATE, catchup=False, max_active_runs=1, default_args=default_args,
             tags=["tokenminds"], doc_md=__doc__) as dag:
        operators = {}
        for name in dag_tasks():
            task = daily_plan.get_task(name)
            sensor = PlanInputsSensor(
                task_id=f"wait_for_{name}", plan_task=name, output_root=OUTPUT_ROOT, input_root=INPUT_ROOT,
                poke_interval=POKE_INTERVAL, timeout=(12 if task.waits_for_landing else 3) * 3600, retries=0)
            if task.kind == daily_plan.BEAM:
                operator = PlannedBeamPipeline(
                    task_id=name, plan_task=name, output_root=OUTPUT_ROOT, input_root=INPUT_ROOT, job_args=JOB_ARGS,
                    task_args=TASK_ARGS, runner=RUNNER, runner_args=RUNNER_ARGS,
                    dataflow_settings=DATAFLOW_SETTINGS, depends_on_past=task.sequential)
            else:
                operator = PlannedProgram(task_id=name, plan_task=name, output_root=OUTPUT_ROOT, task_args=TASK_ARGS,
                                          depends_on_past=task.sequential)
            for upstream in daily_plan.same_run_upstream(task):
                operators[upstream] >> sensor
            sensor >> operator
            operators[name] = operator
    return dag


dag = build_dag()
