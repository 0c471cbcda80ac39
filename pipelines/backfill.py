"""Bulk backfills of the daily flow: a range of days, in dependency order, resumable, skipping what is up to date.

    python -m pipelines.backfill --start_date=2026-01-01 --end_date=2026-01-31 \
        --steps=validate_inputs,assign_sids,update_histories,build_examples \
        --output_root=gs://BUCKET/tokenminds [--input_root=gs://BUCKET/raw] [job options] [runner options] \
        [--dry_plan] [--force=STEP,...] [--adopt_existing] [--train_args="--steps=200 --batch_size=32"]

Runs the tasks of ``pipelines.daily_plan`` for every day of the range in the order the daily DAG would: for each
processing day, validate -> SIDs -> histories of day D, then the examples of day D-1 (whose look-ahead window closes
with day D). The sequential steps (SIDs, histories) therefore go day by day, and a day's examples are built once the
histories of D+1 exist; examples of the last day wait (are "deferred") until day end+1's snapshot exists.

Each (step, date) calls the job's ``run(argv)`` in-process (a ``program`` task such as training runs as a subprocess)
with ``--date=D --output_root=...``, the shared options (``--input_root``, ``--sid_model``, ...), the step's own
options (``--max_targets`` goes to build_examples only, ``--backfill_days`` to update_histories only) and the runner
options (``--runner``, ``--project``, ...: everything that is no job's option). A program step's own options (the
trainer's ``--steps``, ``--batch_size``, ...) are given as one quoted ``--<step>_args``, e.g. ``--train_args``.
Training's first day (no checkpoint under ``<output_root>/models`` before it) starts fresh, without
``--init_from``; later days continue from the day before (``daily_plan.first_day``, as in the daily DAG).

A (step, date) is skipped when it is up to date:
- every ``_SUCCESS`` of its output exists, and is the one this backfill recorded (not rewritten by another run since);
- its ledger ``<output_root>/_backfill/<step>/date=D.json`` holds the same fingerprint: a hash of the step's options
  (its own options and the shared ones its output depends on; runner options and paths under --output_root left
  out) and the versions of the artifacts it used (SID model, query tokenizer, feature transform), as its summary
  recorded them;
- nothing it reads is re-run in this backfill, and every input's ``_SUCCESS`` is the one it read last time.
The ledger is written after the job succeeded, so an interrupted backfill, run again, redoes only the (step, date)s
that did not finish, and what depends on them. ``--force=STEP`` re-runs a step regardless; ``--adopt_existing``
records outputs that are complete but were not written by the backfill (no ledger, or rewritten since: by the daily
DAG, say) as up to date with the current fingerprint instead of re-running them. ``--dry_plan`` prints the plan
and runs nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import difflib
import hashlib
import importlib
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipelines import daily_plan
from pipelines.daily_plan import BEAM, Task

DEFAULT_STEPS = ("validate_inputs", "assign_sids", "update_histories", "build_examples")
LEDGER_DIR = "_backfill"
LEDGER_FORMAT = "tokenminds.backfill_ledger/1"
OUTPUT_ROOT_TOKEN = "<output_root>"

RUN, SKIP, ADOPT, DEFERRED, BLOCKED = "run", "skip", "adopt", "deferred", "blocked"
# Flags the backfill sets itself, or that would make its bookkeeping wrong.
MANAGED_FLAGS = {
    "date": "the backfill passes --date per day; give --start_date/--end_date",
    "dry_run": "--dry_run would only translate each job while the ledger records it as done; use --dry_plan",
    "examples_output": "the backfill runs the standard layout under --output_root; --examples_output is not supported",
}
# (file in the artifact directory, key holding the content version)
ARTIFACT_VERSION_FILES = {
    "sid_model": ("config.json", "version"),
    "query_tokenizer": ("query_tokenizer.json", "version"),
    "feature_transform": ("transform_fn_metadata.json", "transform_fn_version"),
}


# ---------------------------------------------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.backfill", allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start_date", required=True, help="First day, YYYY-MM-DD.")
    parser.add_argument("--end_date", required=True, help="Last day (inclusive), YYYY-MM-DD.")
    parser.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                        help=f"Comma-separated tasks of the daily plan ({', '.join(daily_plan.TASK_NAMES)}).")
    parser.add_argument("--output_root", required=True, help="Root of every output (local path or gs://).")
    parser.add_argument("--dry_plan", action="store_true", help="Print the plan; run nothing, write nothing.")
    parser.add_argument("--force", default="", help="Comma-separated steps to re-run even when up to date.")
    parser.add_argument("--adopt_existing", action="store_true",
                        help="Record complete outputs the backfill did not write (no ledger, or rewritten since) "
                             "as up to date instead of re-running them.")
    for task in daily_plan.TASKS:
        if task.kind != BEAM:
            parser.add_argument(f"--{task.name}_args", default="",
                                help=f"{task.module}'s own options for every day of step {task.name}, one string.")
    args, passthrough = parser.parse_known_args(argv)
    args.output_root = args.output_root.rstrip("/")
    try:
        args.start, args.end = dt.date.fromisoformat(args.start_date), dt.date.fromisoformat(args.end_date)
    except ValueError as err:
        raise ValueError(f"--start_date/--end_date must be YYYY-MM-DD: {err}") from None
    if args.end < args.start:
        raise ValueError(f"--end_date {args.end} is before --start_date {args.start}")
    args.step_names = _names(args.steps)
    args.force_names = _names(args.force) if args.force else []
    if not args.step_names:
        raise ValueError("--steps names no step")
    return args, passthrough


def _names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        daily_plan.get_task(name)  # raises on an unknown name
    return [n for n in daily_plan.TASK_NAMES if n in names]  # plan order


def _flag_groups(tokens: Sequence[str]) -> List[List[str]]:
    """``--a=1 --b 2 --c`` -> [["--a=1"], ["--b", "2"], ["--c"]]."""
    groups: List[List[str]] = []
    for token in tokens:
        if token.startswith("--"):
            groups.append([token])
        elif groups:
            groups[-1].append(token)
        else:
            raise ValueError(f"unexpected argument {token!r}: options are --name=value")
    return groups


def _flag(group: Sequence[str]) -> str:
    return group[0][2:].split("=", 1)[0]


def _option_strings(option_classes) -> Dict[str, str]:
    """option name (without --) -> dest, for PipelineOptions subclasses."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for cls in option_classes:
        cls._add_argparse_args(parser)
    return {s[2:]: a.dest for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _registered_option_names() -> Optional[set]:
    """Every option some imported PipelineOptions subclass defines (Beam's and ours), or None if unknown."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

        names = set()
        for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
            parser = _BeamArgumentParser(allow_abbrev=False)
            cls._add_argparse_args(parser)
            names |= {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}
        return names
    except Exception:  # a private Beam API; the check is a convenience
        return None


@dataclasses.dataclass
class StepConfig:
    task: Task
    module: Any = None                       # the imported module (None for a program not importable here)
    option_classes: Tuple[type, ...] = ()    # its own PipelineOptions subclasses
    own_flags: Dict[str, str] = dataclasses.field(default_factory=dict)
    args: List[str] = dataclasses.field(default_factory=list)  # its own options from the command line


def load_steps(names: Sequence[str]) -> Dict[str, StepConfig]:
    from apache_beam.options.pipeline_options import PipelineOptions

    steps = {}
    for name in names:
        task = daily_plan.get_task(name)
        if importlib.util.find_spec(task.module) is None:
            raise ValueError(f"step {name}: module {task.module} is not available in this checkout yet")
        module = importlib.import_module(task.module)
        job = getattr(module, "JOB", None)
        classes = tuple(job.option_classes) if job is not None else tuple(
            obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, PipelineOptions) and obj is not PipelineOptions
            and obj.__module__ == module.__name__)
        if task.kind == BEAM and not hasattr(module, "run"):
            raise ValueError(f"step {name}: {task.module} has no run(argv)")
        steps[name] = StepConfig(task, module, classes, _option_strings(classes))
    return steps


def split_passthrough(passthrough: Sequence[str], steps: Dict[str, StepConfig]) -> Tuple[List[str], List[str]]:
    """Sorts the extra arguments: shared job options (every Beam step), each step's own options (that step only,
    into ``steps[name].args``), and runner options (every Beam step; never part of a fingerprint)."""
    from pipelines.options import TokenMindsOptions

    common_flags = _option_strings([TokenMindsOptions])
    owners: Dict[str, List[str]] = {}  # a flag may belong to several steps (the sequence options, say)
    for name, step in steps.items():
        for flag in step.own_flags:
            owners.setdefault(flag, []).append(name)
    other_steps = {}
    for name in daily_plan.TASK_NAMES:
        task = daily_plan.get_task(name)
        if name not in steps and task.kind == BEAM and importlib.util.find_spec(task.module) is not None:
            for flag in load_steps([name])[name].own_flags:
                other_steps.setdefault(flag, []).append(name)
    registered = _registered_option_names()
    known_job_flags = sorted(set(common_flags) | set(owners) | set(other_steps))
    common, runner = [], []
    for group in _flag_groups(passthrough):
        flag = _flag(group)
        if flag in MANAGED_FLAGS or flag in ("start_date", "end_date", "output_root"):
            raise ValueError(f"--{flag}: {MANAGED_FLAGS.get(flag, 'given twice')}")
        if flag in common_flags:
            if not any(common_flags[flag] in step.task.reads for step in steps.values() if step.task.kind == BEAM):
                print(f"warning: --{flag} is read by none of --steps; ignored", file=sys.stderr)
            common += group
        elif flag in owners:
            for name in owners[flag]:
                steps[name].args += group
        elif flag in other_steps:  # the same command line with fewer --steps: dropped, not an error
            print(f"warning: --{flag} is an option of {' and '.join(other_steps[flag])}, not among --steps; "
                  "ignored", file=sys.stderr)
        else:
            if registered is not None and flag not in registered:
                close = difflib.get_close_matches(flag, known_job_flags, n=1, cutoff=0.85)
                if close:
                    raise ValueError(f"unknown option --{flag}; did you mean --{close[0]}?")
                print(f"warning: --{flag} is no known pipeline option; passed to every Beam step as a runner "
                      "option (not fingerprinted)", file=sys.stderr)
            runner += group
    return common, runner


# ---------------------------------------------------------------------------------------------------------------
# Items, fingerprints, stamps and ledgers.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Item:
    """One (step, date) of the backfill."""

    task: Task
    date: dt.date
    argv: List[str]                      # the job's argv without runner options
    options: Dict[str, Any]              # what the fingerprint covers
    versions: Dict[str, Optional[str]]   # artifact versions it would use
    fingerprint: str
    first_day: bool = False              # the task's first day: it starts without its bootstrap input
    action: str = ""
    reason: str = ""
    status: str = ""
    seconds: Optional[float] = None

    @property
    def step(self) -> str:
        return self.task.name

    @property
    def key(self) -> Tuple[str, dt.date]:
        return (self.task.name, self.date)


@dataclasses.dataclass
class BackfillResult:
    items: List[Item]
    dry_plan: bool

    def actions(self) -> Dict[Tuple[str, dt.date], str]:
        return {item.key: item.action for item in self.items}

    def ran(self) -> List[Tuple[str, dt.date]]:
        return [item.key for item in self.items if item.status == "ok"]


def _relative(value: Any, output_root: str) -> Any:
    if isinstance(value, str) and (value == output_root or value.startswith(output_root + "/")):
        return OUTPUT_ROOT_TOKEN + value[len(output_root):]
    if isinstance(value, list):
        return [_relative(v, output_root) for v in value]
    return value


def fingerprint_options(step: StepConfig, argv: Sequence[str], output_root: str) -> Dict[str, Any]:
    """The options that decide the step's output, canonical (defaults filled in, flag order and spelling
    irrelevant, paths under --output_root relative to it, so a copied output tree keeps its ledgers)."""
    task = step.task
    if task.kind != BEAM:
        return {"argv": [f"{a.partition('=')[0]}={_relative(a.partition('=')[2], output_root)}" if "=" in a else a
                         for a in argv]}
    from pipelines.options import TokenMindsOptions

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    TokenMindsOptions._add_argparse_args(parser)
    for cls in step.option_classes:
        cls._add_argparse_args(parser)
    values = vars(parser.parse_known_args(list(argv))[0])
    keep = {"date", *step.own_flags.values(), *task.fingerprint_options}
    return {k: _relative(values[k], output_root) for k in sorted(keep) if k in values}


def fingerprint(task: Task, options: Dict[str, Any], versions: Dict[str, Optional[str]]) -> str:
    material = {"step": task.name, "module": task.module, "options": options, "versions": versions}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifact_versions(common: Sequence[str], output_root: str) -> Tuple[Dict[str, Optional[str]], Dict[str, str]]:
    """Content version of each shared artifact (None where it is missing), from its metadata file; and its path."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import artifact_paths
    from transforms import outputs

    paths = dict(zip(daily_plan.ARTIFACTS, artifact_paths(PipelineOptions(list(common) +
                                                                          [f"--output_root={output_root}"]))))
    versions = {}
    for name, (filename, key) in ARTIFACT_VERSION_FILES.items():
        try:
            versions[name] = str(outputs.read_json_file(outputs.join(paths[name], filename))[key])
        except Exception:
            versions[name] = None
    return versions, paths


def versions_from_summaries(task: Task, summaries: Any) -> Dict[str, str]:
    """The artifact versions a job's summary records it used (``sid_model_version``, ``versions``)."""
    found: Dict[str, str] = {}
    for summary in summaries if isinstance(summaries, list) else [summaries]:
        if not isinstance(summary, dict):
            continue
        if summary.get("sid_model_version"):
            found["sid_model"] = str(summary["sid_model_version"])
        for name, version in (summary.get("versions") or {}).items():
            found[{"transform_fn": "feature_transform"}.get(name, name)] = str(version)
    return {k: v for k, v in found.items() if k in task.artifacts}


def stamp(paths: Sequence[str]) -> Optional[str]:
    """Identity of a set of ``_SUCCESS`` markers (their modification times), or None if one is missing. A rerun
    rewrites the marker, so the stamp tells whether an output is the one a consumer read."""
    from apache_beam.io.filesystems import FileSystems

    times = []
    for path in paths:
        try:
            found = FileSystems.match([path])[0].metadata_list
        except Exception:
            return None
        if not found:
            return None
        times.append(f"{found[0].last_updated_in_seconds:.6f}")
    return ",".join(times)


def ledger_path(output_root: str, step: str, date: dt.date) -> str:
    return f"{output_root}/{LEDGER_DIR}/{step}/date={date.isoformat()}.json"


def read_ledger(output_root: str, step: str, date: dt.date) -> Optional[dict]:
    from transforms import outputs

    try:
        ledger = outputs.read_json_file(ledger_path(output_root, step, date))
    except Exception:  # missing, or half-written by a crash: either way not a record of success
        return None
    return ledger if isinstance(ledger, dict) and ledger.get("format") == LEDGER_FORMAT else None


def _input_key(task_name: str, date: dt.date) -> str:
    return f"{task_name}/{date.isoformat()}"


def input_stamps(item: Item, output_root: str) -> Dict[str, Optional[str]]:
    return {_input_key(dep.task, date): stamp(daily_plan.success_paths(daily_plan.get_task(dep.task), date,
                                                                        output_root))
            for dep, date in daily_plan.resolve_inputs(item.task, item.date)}


def write_ledger(output_root: str, item: Item, versions: Dict[str, Optional[str]], inputs: Dict[str, Optional[str]],
                 runner: Sequence[str], started: float, seconds: Optional[float], adopted: bool = False) -> dict:
    from transforms import outputs

    ledger = {
        "format": LEDGER_FORMAT, "step": item.step, "date": item.date.isoformat(), "module": item.task.module,
        "fingerprint": fingerprint(item.task, item.options, versions), "options": item.options, "versions": versions,
        "argv": item.argv, "runner_args": list(runner), "inputs": inputs,
        "output": stamp(daily_plan.success_paths(item.task, item.date, output_root)),
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": None if seconds is None else round(seconds, 3), "adopted": adopted,
    }
    outputs.write_text_file(ledger_path(output_root, item.step, item.date),
                            json.dumps(ledger, indent=2, sort_keys=True) + "\n")
    return ledger


def _changes(ledger: dict, item: Item) -> str:
    old = {**{f"--{k}": v for k, v in (ledger.get("options") or {}).items()},
           **{f"{k} version": v for k, v in (ledger.get("versions") or {}).items()}}
    new = {**{f"--{k}": v for k, v in item.options.items()},
           **{f"{k} version": v for k, v in item.versions.items()}}
    changed = [f"{k} {old.get(k)!r}->{new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(changed) or "step definition"


# ---------------------------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------------------------
def build_items(args: argparse.Namespace, steps: Dict[str, StepConfig], common: Sequence[str],
                versions: Dict[str, Optional[str]]) -> List[Item]:
    items = []
    days = [args.start + dt.timedelta(days=i) for i in range((args.end - args.start).days + 1)]
    for name, step in steps.items():
        # A bootstrapped step (training) starts fresh on its first day: the first day of the range when no output of
        # the step exists before it (the days after continue from this backfill's own output).
        existing = _output_dates(step.task, args.output_root) if step.task.bootstrapped else []
        for date in days:
            first = date == days[0] and daily_plan.first_day(step.task, date, existing)
            program_args = shlex.split(getattr(args, f"{name}_args", "") or "") if step.task.kind != BEAM else []
            argv = (daily_plan.render_args(step.task, date, args.output_root, common, first_day=first)
                    + list(step.args) + program_args)
            options = fingerprint_options(step, argv, args.output_root)
            used = {a: versions.get(a) for a in step.task.artifacts}
            items.append(Item(step.task, date, argv, options, used, fingerprint(step.task, options, used),
                              first_day=first))
    # The daily DAG's order: by processing day, then the plan's task order (every input comes earlier).
    items.sort(key=lambda it: (daily_plan.processing_day_of(it.task, it.date), daily_plan.TASK_NAMES.index(it.step)))
    return items


def _output_dates(task: Task, output_root: str) -> List[dt.date]:
    """The days whose output of ``task`` is complete (its ``_SUCCESS`` markers exist)."""
    from apache_beam.io.filesystems import FileSystems

    paths = []
    for pattern in daily_plan.own_output_glob(task, output_root):
        try:
            paths += [m.path for m in FileSystems.match([pattern])[0].metadata_list]
        except Exception:  # nothing matches (some filesystems raise instead of returning no match)
            pass
    return daily_plan.dates_of(paths)


def plan(items: List[Item], args: argparse.Namespace, artifact_dirs: Dict[str, str]) -> None:
    """Sets each item's action (run, skip, adopt, deferred, blocked) and why, in order: an item re-runs when
    something it reads re-runs earlier in the list."""
    by_key = {item.key: item for item in items}
    for item in items:
        item.action, item.reason = _decide(item, by_key, args, artifact_dirs)


def _decide(item: Item, by_key: Dict, args: argparse.Namespace, artifact_dirs: Dict[str, str]) -> Tuple[str, str]:
    root = args.output_root
    upstream_runs, waiting = [], []
    for dep, date in daily_plan.resolve_inputs(item.task, item.date):
        if item.first_day and dep.bootstrap:  # the first day: nothing to continue from, a fresh start
            continue
        producer = by_key.get((dep.task, date))
        if producer is not None:  # in this backfill: it comes first, and this item cannot go without it
            if producer.action in (DEFERRED, BLOCKED):
                waiting.append((producer.action, f"needs {dep.task} {date} ({producer.action})"))
            elif producer.action == RUN:
                upstream_runs.append(f"{dep.task} {date}")
            continue
        if dep.required and stamp(daily_plan.success_paths(daily_plan.get_task(dep.task), date, root)) is None:
            if date > args.end:
                waiting.append((DEFERRED, f"needs {dep.task} {date} ({dep.why}), after the range"))
            else:
                waiting.append((BLOCKED, f"needs {dep.task} {date} ({dep.why}): not complete, not in this backfill"))
    if waiting:  # deferred wins: such an item would not run in this backfill anyway
        return sorted(waiting, key=lambda w: w[0] != DEFERRED)[0]
    missing = [a for a in item.task.artifacts if item.versions.get(a) is None]
    if missing:
        return BLOCKED, "missing artifact " + ", ".join(f"{a} ({artifact_dirs[a]})" for a in missing)

    if item.step in args.force_names:
        return RUN, "forced (--force)"
    output = stamp(daily_plan.success_paths(item.task, item.date, root))
    if output is None:
        return RUN, "output incomplete (no _SUCCESS)"
    ledger = read_ledger(root, item.step, item.date)
    if ledger is None:
        if args.adopt_existing and not upstream_runs:
            return ADOPT, "complete, no ledger: adopted (--adopt_existing)"
        return RUN, "no ledger"
    if ledger.get("output") != output:
        if args.adopt_existing and not upstream_runs:
            return ADOPT, "rewritten outside this ledger: adopted (--adopt_existing)"
        return RUN, "output rewritten since the ledger was written"
    if ledger.get("fingerprint") != item.fingerprint:
        return RUN, f"fingerprint changed: {_changes(ledger, item)}"
    if upstream_runs:
        return RUN, f"input re-runs: {', '.join(upstream_runs)}"
    recorded = ledger.get("inputs") or {}
    changed = [key for key, now in input_stamps(item, root).items() if recorded.get(key) != now]
    if changed:
        return RUN, f"input changed since its run: {', '.join(changed)}"
    return SKIP, f"up to date ({item.fingerprint})"


def format_plan(items: Sequence[Item], args: argparse.Namespace, runner: Sequence[str]) -> str:
    lines = [f"backfill {args.start}..{args.end} under {args.output_root} (ledger {args.output_root}/{LEDGER_DIR})",
             f"steps: {', '.join(args.step_names)}; runner options: {' '.join(runner) or '(none)'}",
             f"  {'#':>3} {'step':<17} {'date':<10}  {'action':<8} reason"]
    for i, item in enumerate(items, 1):
        lines.append(f"  {i:>3} {item.step:<17} {item.date}  {item.action:<8} {item.reason}")
    counts = {a: sum(1 for it in items if it.action == a) for a in (RUN, SKIP, ADOPT, DEFERRED, BLOCKED)}
    lines.append("plan: " + ", ".join(f"{n} {a}" for a, n in counts.items() if n or a in (RUN, SKIP)))
    return "\n".join(lines)


def format_table(items: Sequence[Item]) -> str:
    lines = [f"  {'#':>3} {'step':<17} {'date':<10}  {'result':<9} {'seconds':>8}  fingerprint"]
    for i, item in enumerate(items, 1):
        seconds = "" if item.seconds is None else f"{item.seconds:.1f}"
        lines.append(f"  {i:>3} {item.step:<17} {item.date}  {item.status:<9} {seconds:>8}  {item.fingerprint}")
    counts: Dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    lines.append("result: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------------------------
def invoke(step: StepConfig, argv: Sequence[str], runner: Sequence[str]) -> Any:
    """Runs one (step, date): a Beam job in-process (its ``run(argv)``), a program as ``python -m``."""
    if step.task.kind == BEAM:
        module = importlib.import_module(step.task.module)  # looked up per call (tests replace run)
        return module.run(list(argv) + list(runner))
    subprocess.run([sys.executable, "-m", step.task.module, *argv], check=True)
    return None


def run(argv: Optional[Sequence[str]] = None) -> BackfillResult:
    args, passthrough = parse_args(argv)
    steps = load_steps(args.step_names)
    common, runner = split_passthrough(passthrough, steps)
    versions, artifact_dirs = artifact_versions(common, args.output_root)
    items = build_items(args, steps, common, versions)
    plan(items, args, artifact_dirs)
    print(format_plan(items, args, runner), flush=True)
    if args.dry_plan:
        print("dry plan: nothing was run")
        return BackfillResult(items, dry_plan=True)
    blocked = [it for it in items if it.action == BLOCKED]
    if blocked:
        raise ValueError("cannot run: " + "; ".join(f"{it.step} {it.date} {it.reason}" for it in blocked))

    to_run = [it for it in items if it.action == RUN]
    done = 0
    for item in items:
        if item.action in (SKIP, DEFERRED):
            item.status = {SKIP: "skipped", DEFERRED: "deferred"}[item.action]
            continue
        started = time.time()
        if item.action == ADOPT:
            write_ledger(args.output_root, item, item.versions, input_stamps(item, args.output_root), runner,
                         started, None, adopted=True)
            item.status = "adopted"
            continue
        done += 1
        print(f"[{done}/{len(to_run)}] {item.step} {item.date}: running", flush=True)
        inputs = input_stamps(item, args.output_root)
        try:
            summaries = invoke(steps[item.step], item.argv, runner)
            if stamp(daily_plan.success_paths(item.task, item.date, args.output_root)) is None:
                raise RuntimeError(f"{item.step} {item.date} finished without writing every _SUCCESS of "
                                   f"{daily_plan.output_dirs(item.task, item.date, args.output_root)}")
        except BaseException:
            item.status, item.seconds = "FAILED", time.time() - started
            for rest in items:
                if not rest.status:
                    rest.status = "not run"
            print(format_table(items), flush=True)
            print(f"backfill stopped at {item.step} {item.date}; run the same command again to resume", flush=True)
            raise
        item.seconds = time.time() - started
        used = {**item.versions, **versions_from_summaries(item.task, summaries)}
        if used != item.versions:
            print(f"warning: {item.step} {item.date} used artifact versions {used}, planned {item.versions}",
                  file=sys.stderr)
        write_ledger(args.output_root, item, used, inputs, runner, started, item.seconds)
        item.status = "ok"
        print(f"[{done}/{len(to_run)}] {item.step} {item.date}: ok ({item.seconds:.1f} s)", flush=True)
    print(format_table(items), flush=True)
    return BackfillResult(items, dry_plan=False)


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    from pipelines.cli import run_main

    run_main(main)
