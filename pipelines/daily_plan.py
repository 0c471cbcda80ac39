"""The daily flow as data: which jobs run for processing day D, in what order, on which days' data, waiting for what.

    python -m pipelines.daily_plan --date=2026-01-05 --output_root=gs://BUCKET/tokenminds   # print day D's run

The DAG (``dags/tokenminds_daily.py``) and the bulk backfill (``pipelines.backfill``) are both built from this
description, so the two cannot disagree on order, arguments or ``_SUCCESS`` paths. Plain Python: dataclasses and pure
functions, no Airflow and no Beam import (the Airflow scheduler parses the DAG file with this module).

One DAG run processes day D after day D's data has landed:

    validate_inputs(D) -> assign_sids(D) -> update_histories(D) -> build_examples(D-1) -> train(D-1) -> refresh_users(D)

``build_examples`` runs one day behind: day E's targets look 24 h ahead, so its window closes with the snapshot of
E+1, which exists once ``update_histories(D)`` has run. ``train`` continues the model from the previous day's
checkpoint on day D-1's examples; ``refresh_users`` recomputes user representations on day D's histories with it.

Every task writes ``_SUCCESS`` last into each output directory (``output_dirs``); a consumer waits for the markers of
its required inputs (``sensor_paths``). An input is named by the producing task and a day offset relative to the
consumer's *data* date; whether it comes from the same DAG run or from an earlier one follows from the tasks'
``date_offset``s (``same_run_upstream``, ``earlier_run_inputs``).

Sequential tasks read their own output of the day before (SIDs carry over, snapshots fold, training continues), so
their days must run in date order. The others are independent per date: a day's examples need only the history
snapshots of D-1..D+1, so different days' examples can be (re)built in any order or in parallel.

First days. Yesterday's SIDs and snapshot are optional inputs (``required=False``): used when present. Yesterday's
checkpoint is a *bootstrap* input: required, except on training's first day, which is the day before which no
checkpoint exists at all under ``<output_root>/models`` (``first_day``). That day trains from scratch (no
``--init_from``); every later day waits for, and continues from, the day before, so a missing day is never papered
over by a silent fresh start. The DAG and the backfill decide it alike, from the existing ``_SUCCESS`` markers
(``own_output_glob``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

SUCCESS_MARKER = "_SUCCESS"
# transforms.schemas.INPUT_TABLES; not imported, so that this module needs neither pyarrow nor Beam.
INPUT_TABLES = ("watch_events", "search_events", "videos")

BEAM = "beam"          # a Beam pipeline: ``python -m <module>`` with Beam-style argv, ``run(argv)``, any runner
PROGRAM = "program"    # a single-machine program (model training): its own argv, no runner options

# Artifacts shared by many days; the default directory of each under --output_root (pipelines.options.artifact_paths).
ARTIFACTS = ("sid_model", "query_tokenizer", "feature_transform")
# Groups of shared options (pipelines.options.TokenMindsOptions dests), for what each job reads.
DAYS = ("date", "start_date", "end_date")
SOURCE = ("source", "input_root", "bq_project", "bq_dataset", "bq_temp_dataset")


def partition_dir(root: str, name: str, date: dt.date) -> str:
    """``<root>/<name>/date=YYYY-MM-DD`` (the layout of transforms.schemas.partition_dir)."""
    return f"{str(root).rstrip('/')}/{name}/date={date.isoformat()}"


def day(date: dt.date, offset: int) -> dt.date:
    return date + dt.timedelta(days=offset)


@dataclasses.dataclass(frozen=True)
class Input:
    """Output of ``task`` for the day ``offset`` days from the consumer's data date."""

    task: str
    offset: int = 0
    required: bool = True  # False: used when present (a first day has no previous snapshot); not waited for
    why: str = ""
    # The task's own output of an earlier day that it is bootstrapped without: required, except on the task's first
    # day (no output of the task exists for any earlier day), when the task starts fresh (see ``first_day``).
    bootstrap: bool = False


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    module: str                      # ``python -m <module>``
    kind: str                        # BEAM or PROGRAM
    date_offset: int                 # data date = processing day + date_offset
    inputs: Tuple[Input, ...]
    outputs: Callable[[str, dt.date], Tuple[str, ...]]      # (output_root, data date) -> dirs, each gets _SUCCESS
    arguments: Callable[[dt.date, str], List[str]]          # (data date, output_root) -> the task's own argv
    artifacts: Tuple[str, ...] = ()  # shared artifacts whose versions decide the output (ARTIFACTS)
    # Shared options (pipelines.options.TokenMindsOptions dests) whose values decide this task's output; artifact
    # paths are left out on purpose: the artifacts' content versions stand for them.
    fingerprint_options: Tuple[str, ...] = ()
    # Shared options (TokenMindsOptions dests) the task's job reads; the job rejects any other shared option, so
    # the plan passes a task only these (its pipelines.<job>.JOB takes them from here).
    reads: Tuple[str, ...] = ()
    waits_for_landing: bool = False  # waits for the raw input partitions of its day (landing_paths)
    # Flags of ``arguments`` that name the bootstrap input: left out on the task's first day (a fresh start).
    first_day_drops: Tuple[str, ...] = ()
    description: str = ""

    @property
    def sequential(self) -> bool:
        """Reads its own output of the previous day, so its days run in date order."""
        return any(i.task == self.name and i.offset < 0 for i in self.inputs)

    @property
    def bootstrapped(self) -> bool:
        """Has a first day without its previous output (``Input.bootstrap``)."""
        return any(i.bootstrap for i in self.inputs)


# ---------------------------------------------------------------------------------------------------------------
# The tasks.
# ---------------------------------------------------------------------------------------------------------------
def _validate_outputs(root: str, date: dt.date) -> Tuple[str, ...]:
    validated = f"{root.rstrip('/')}/validated"
    return tuple(partition_dir(validated, t, date) for t in INPUT_TABLES) + (
        partition_dir(root, "validation_runs", date),)


def _daily_args(date: dt.date, root: str) -> List[str]:
    return [f"--date={date.isoformat()}", f"--output_root={root}"]


def model_dir(root: str, date: dt.date) -> str:
    """The checkpoint trained through day ``date``'s examples."""
    return partition_dir(root, "models", date)


def _train_args(date: dt.date, root: str) -> List[str]:
    return [f"--examples={partition_dir(root, 'examples', date)}", f"--init_from={model_dir(root, day(date, -1))}",
            f"--output={model_dir(root, date)}"]


def _refresh_args(date: dt.date, root: str) -> List[str]:
    return _daily_args(date, root) + [f"--model={model_dir(root, day(date, -1))}"]


TASKS: Tuple[Task, ...] = (
    Task(name="validate_inputs", module="pipelines.validate_inputs", kind=BEAM, date_offset=0, inputs=(),
         outputs=_validate_outputs, arguments=_daily_args,
         fingerprint_options=("source", "input_root", "bq_project", "bq_dataset", "embedding_dim"),
         reads=DAYS + SOURCE + ("output_root", "embedding_dim"), waits_for_landing=True,
         description="check day D's landed input tables; dead-letter bad rows"),
    Task(name="assign_sids", module="pipelines.assign_sids", kind=BEAM, date_offset=0,
         inputs=(Input("validate_inputs", 0, why="the day's validated videos"),
                 Input("assign_sids", -1, required=False, why="yesterday's SIDs carry over")),
         outputs=lambda root, date: (partition_dir(root, "video_sids", date),), arguments=_daily_args,
         artifacts=("sid_model",), fingerprint_options=("validated_root", "embedding_dim"),
         reads=DAYS + ("output_root", "validated_root", "sid_model", "embedding_dim"),
         description="SIDs for videos new on day D"),
    Task(name="update_histories", module="pipelines.update_histories", kind=BEAM, date_offset=0,
         inputs=(Input("validate_inputs", 0, why="the day's validated events"),
                 Input("assign_sids", 0, why="every video's SID as of D"),
                 Input("update_histories", -1, required=False, why="the snapshot day D folds into")),
         outputs=lambda root, date: (partition_dir(root, "histories", date),), arguments=_daily_args,
         artifacts=("sid_model",), fingerprint_options=("validated_root",),
         reads=DAYS + ("output_root", "validated_root"), description="fold day D into the user history snapshots"),
    Task(name="build_examples", module="pipelines.build_examples", kind=BEAM, date_offset=-1,
         inputs=(Input("update_histories", -1, required=False, why="history before the day"),
                 Input("update_histories", 0, why="the day"),
                 Input("update_histories", 1, why="the 24 h look-ahead window")),
         outputs=lambda root, date: (partition_dir(root, "examples", date),), arguments=_daily_args,
         artifacts=ARTIFACTS, fingerprint_options=("seed",), reads=DAYS + ARTIFACTS + ("output_root", "seed"),
         description="training examples of day D-1 (its look-ahead window closes with day D)"),
    Task(name="train", module="tokenminds_model.train", kind=PROGRAM, date_offset=-1,
         inputs=(Input("build_examples", 0, why="the day's examples"),
                 Input("train", -1, bootstrap=True,
                       why="the checkpoint training continues from (none on the first day: a fresh start)")),
         outputs=lambda root, date: (model_dir(root, date),), arguments=_train_args, first_day_drops=("init_from",),
         description="continue training on day D-1's examples"),
    Task(name="refresh_users", module="pipelines.refresh_users", kind=BEAM, date_offset=0,
         inputs=(Input("train", -1, why="the model trained through day D-1"),
                 Input("update_histories", 0, why="the users' histories as of D")),
         outputs=lambda root, date: (partition_dir(root, "user_representations", date),),
         arguments=_refresh_args, artifacts=ARTIFACTS, fingerprint_options=(),
         reads=DAYS + ARTIFACTS + ("output_root", "bq_project"), description="user embeddings and tokens as of day D"),
)
TASK_NAMES: Tuple[str, ...] = tuple(t.name for t in TASKS)
_BY_NAME: Dict[str, Task] = {t.name: t for t in TASKS}


def get_task(name: str) -> Task:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the daily plan has {', '.join(TASK_NAMES)}") from None


def sequential_tasks() -> Tuple[str, ...]:
    return tuple(t.name for t in TASKS if t.sequential)


def independent_tasks() -> Tuple[str, ...]:
    return tuple(t.name for t in TASKS if not t.sequential)


# ---------------------------------------------------------------------------------------------------------------
# Dates and dependencies.
# ---------------------------------------------------------------------------------------------------------------
def data_date(task: Task, processing_day: dt.date) -> dt.date:
    """The day whose data ``task`` processes in the DAG run of ``processing_day``."""
    return day(processing_day, task.date_offset)


def processing_day_of(task: Task, date: dt.date) -> dt.date:
    """The DAG run that processes ``task`` for data date ``date``."""
    return day(date, -task.date_offset)


def input_run_offset(task: Task, dependency: Input) -> int:
    """Which DAG run produces ``dependency``: 0 the same run, -1 the previous one, ..."""
    producer = get_task(dependency.task)
    return task.date_offset + dependency.offset - producer.date_offset


def same_run_upstream(task: Task) -> Tuple[str, ...]:
    """Tasks of the same DAG run whose output ``task`` reads: its upstream edges in the DAG."""
    names = []
    for dependency in task.inputs:
        if input_run_offset(task, dependency) == 0 and dependency.task not in names:
            names.append(dependency.task)
    return tuple(names)


def earlier_run_inputs(task: Task) -> Tuple[Input, ...]:
    """Inputs produced by earlier DAG runs (a previous day's snapshot, SIDs or checkpoint)."""
    return tuple(i for i in task.inputs if input_run_offset(task, i) < 0)


def resolve_inputs(task: Task, date: dt.date) -> List[Tuple[Input, dt.date]]:
    """(input, the input's data date) for ``task`` on data date ``date``."""
    return [(i, day(date, i.offset)) for i in task.inputs]


def check_plan(tasks: Sequence[Task] = TASKS) -> None:
    """Plan invariants: names unique, inputs known, every input produced by an earlier run or an earlier task."""
    seen: List[str] = []
    for task in tasks:
        if task.name in seen:
            raise ValueError(f"task {task.name} is listed twice")
        if task.kind not in (BEAM, PROGRAM):
            raise ValueError(f"task {task.name}: kind must be {BEAM!r} or {PROGRAM!r}")
        for dependency in task.inputs:
            offset = input_run_offset(task, dependency)
            if dependency.bootstrap and not (dependency.task == task.name and dependency.offset < 0
                                             and dependency.required):
                raise ValueError(f"task {task.name}: only a required earlier output of the task itself can be its "
                                 "bootstrap input")
            if offset > 0:
                raise ValueError(f"task {task.name} reads {dependency.task} from a later DAG run")
            if offset == 0 and dependency.task not in seen:
                raise ValueError(f"task {task.name} reads {dependency.task}, which runs after it")
        seen.append(task.name)


# ---------------------------------------------------------------------------------------------------------------
# Paths and arguments.
# ---------------------------------------------------------------------------------------------------------------
def output_dirs(task: Task, date: dt.date, output_root: str) -> Tuple[str, ...]:
    return task.outputs(output_root, date)


def success_paths(task: Task, date: dt.date, output_root: str) -> Tuple[str, ...]:
    """The ``_SUCCESS`` markers ``task`` writes (last) for data date ``date``."""
    return tuple(f"{d}/{SUCCESS_MARKER}" for d in output_dirs(task, date, output_root))


def landing_paths(date: dt.date, input_root: str, marker: str = SUCCESS_MARKER) -> Tuple[str, ...]:
    """Markers the raw export writes into day D's input partitions (Parquet sources), waited for by validate."""
    return tuple(f"{partition_dir(input_root, t, date)}/{marker}" for t in INPUT_TABLES)


def sensor_paths(task: Task, processing_day: dt.date, output_root: str, input_root: Optional[str] = None,
                 landing_marker: str = SUCCESS_MARKER, first_day: bool = False) -> List[str]:
    """Every ``_SUCCESS`` the task waits for in the DAG run of ``processing_day``: its required inputs, whether
    produced earlier in the same run or by an earlier run (but not its bootstrap input on its ``first_day``).
    ``validate_inputs`` waits for the raw partitions' landing markers when the source is Parquet files
    (``input_root``); with a BigQuery source it waits for nothing."""
    date = data_date(task, processing_day)
    paths: List[str] = []
    if task.waits_for_landing and input_root:
        paths += landing_paths(date, input_root, landing_marker)
    for dependency, input_date in resolve_inputs(task, date):
        if dependency.required and not (first_day and dependency.bootstrap):
            paths += [p for p in success_paths(get_task(dependency.task), input_date, output_root) if p not in paths]
    return paths


class _AnyDate:
    """Stands for every date in a rendered path (``date=*``)."""

    @staticmethod
    def isoformat() -> str:
        return "*"


def own_output_glob(task: Task, output_root: str) -> Tuple[str, ...]:
    """Glob patterns of the ``_SUCCESS`` markers of every day of ``task`` (``<root>/models/date=*/_SUCCESS``)."""
    return success_paths(task, _AnyDate(), output_root.rstrip("/"))  # type: ignore[arg-type]


def dates_of(paths: Iterable[str]) -> List[dt.date]:
    """The ``date=YYYY-MM-DD`` days named by ``paths`` (sorted, unique)."""
    found = set()
    for path in paths:
        match = re.search(r"/date=(\d{4}-\d{2}-\d{2})(?:/|$)", str(path))
        if match:
            found.add(dt.date.fromisoformat(match.group(1)))
    return sorted(found)


def first_day(task: Task, date: dt.date, existing: Iterable[dt.date]) -> bool:
    """Whether data date ``date`` is ``task``'s first day: the task has a bootstrap input and none of its outputs
    exists for an earlier day (``existing``: the days whose output is complete, from ``own_output_glob``). Only then
    does it start fresh; on any later day its previous output is required."""
    return task.bootstrapped and not any(d < date for d in existing)


def shared_args_for(task: Task, common: Sequence[str]) -> List[str]:
    """The shared job options in ``common`` that ``task`` reads (``--name=value`` or ``--name value`` tokens)."""
    kept, keep = [], False
    for token in common:
        if token.startswith("--"):
            keep = token[2:].split("=", 1)[0] in task.reads
        if keep:
            kept.append(token)
    return kept


def render_args(task: Task, date: dt.date, output_root: str, common: Sequence[str] = (),
                first_day: bool = False) -> List[str]:
    """The task's argv for data date ``date``: its own arguments (on its ``first_day`` without the flags naming its
    bootstrap input), then (Beam tasks) the shared job options in ``common`` (``--source``, ``--input_root``,
    ``--sid_model``, ...) that it reads. Runner options are not part of the plan."""
    own = task.arguments(date, output_root.rstrip("/"))
    if first_day:
        own = [a for a in own if not (a.startswith("--") and a[2:].split("=", 1)[0] in task.first_day_drops)]
    return own + (shared_args_for(task, common) if task.kind == BEAM else [])


def args_to_options(argv: Sequence[str]) -> Dict[str, object]:
    """``["--date=D", "--full_depth_sids"]`` -> ``{"date": "D", "full_depth_sids": True}``, the form Airflow's Beam
    operators take (a True value renders as a bare flag, a list as a repeated flag)."""
    options: Dict[str, object] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"expected --name[=value], got {token!r}")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            else:
                value = True
        if name in options:
            previous = options[name]
            options[name] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            options[name] = value
        i += 1
    return options


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """One task of one DAG run, rendered."""

    name: str
    module: str
    kind: str
    date: dt.date                    # the data date it processes
    args: Tuple[str, ...]
    upstream: Tuple[str, ...]        # same-run tasks it follows
    waits_for: Tuple[str, ...]       # _SUCCESS markers (sensor paths)
    produces: Tuple[str, ...]        # _SUCCESS markers it writes
    sequential: bool


def daily_run(processing_day: dt.date, output_root: str, common: Sequence[str] = (),
              tasks: Optional[Sequence[str]] = None, input_root: Optional[str] = None,
              first_days: Sequence[str] = ()) -> List[TaskRun]:
    """The DAG run of ``processing_day``, rendered, in execution order (optionally a subset of the tasks);
    ``first_days``: the bootstrapped tasks for which this run is their first day."""
    selected = [get_task(n) for n in (tasks or TASK_NAMES)]
    selected.sort(key=lambda t: TASK_NAMES.index(t.name))
    names = {t.name for t in selected}
    runs = []
    for task in selected:
        date = data_date(task, processing_day)
        first = task.name in first_days and task.bootstrapped
        runs.append(TaskRun(
            name=task.name, module=task.module, kind=task.kind, date=date,
            args=tuple(render_args(task, date, output_root, common, first_day=first)),
            upstream=tuple(u for u in same_run_upstream(task) if u in names),
            waits_for=tuple(sensor_paths(task, processing_day, output_root, input_root, first_day=first)),
            produces=success_paths(task, date, output_root), sequential=task.sequential))
    return runs


def format_run(runs: Sequence[TaskRun]) -> str:
    lines = []
    for run in runs:
        lines.append(f"{run.name} ({run.date}, {'sequential' if run.sequential else 'independent per date'})"
                     f"  after: {', '.join(run.upstream) or '-'}")
        lines.append(f"    python -m {run.module} {' '.join(run.args)}")
        lines += [f"    waits for {p}" for p in run.waits_for]
        lines += [f"    writes    {p}" for p in run.produces]
    return "\n".join(lines)


check_plan()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Print the daily DAG run of a processing day.")
    parser.add_argument("--date", required=True, help="The processing day D, YYYY-MM-DD.")
    parser.add_argument("--output_root", required=True)
    parser.add_argument("--input_root", default=None, help="Parquet input root (for validate's landing sensor).")
    parser.add_argument("--first_days", default="",
                        help="Comma-separated bootstrapped tasks (train) for which D is their first day.")
    args, common = parser.parse_known_args(argv)
    common = ([f"--input_root={args.input_root}"] if args.input_root else []) + common
    runs = daily_run(dt.date.fromisoformat(args.date), args.output_root, common, input_root=args.input_root,
                     first_days=[n.strip() for n in args.first_days.split(",") if n.strip()])
    print(format_run(runs))


if __name__ == "__main__":
    main()
