"""What a ``python -m pipelines.<job>`` run prints: the job's own progress and result lines, and real problems.

At the default verbosity the known, harmless noise of the libraries underneath is kept off the console; with
``--verbose`` nothing is hidden and the project's own loggers speak at INFO. Where each kind of noise comes from:

- **TensorFlow's C++ start-up lines** (``port.cc`` "oneDNN custom operations are on", ``cudart_stub.cc`` "Could not
  find cuda drivers", each behind absl's "All log messages before absl::InitializeLog()" banner, twice per process:
  ``libtensorflow_framework.so.2`` and ``_pywrap_profiler_plugin.so`` each link their own absl). They are logged by
  static initializers while the libraries load, before TensorFlow applies ``TF_CPP_MIN_LOG_LEVEL``, so no environment
  variable silences them (tensorflow/tensorflow#100442). They are dropped by a line filter on the process's stderr
  (file descriptor 2, below), which Beam's worker subprocesses (``--direct_running_mode=multi_processing``) inherit.
- **TensorFlow's later C++ INFO/WARNING lines** (``cpu_feature_guard.cc``'s CPU-instruction notice and the like):
  ``TF_CPP_MIN_LOG_LEVEL=2`` by default (``os.environ.setdefault`` when ``pipelines`` is imported, before TensorFlow
  or JAX can be, so worker subprocesses inherit it). ERROR and FATAL lines still show.
- **"failed call to cuInit"** (``cuda_platform.cc``, an ERROR, logged when TensorFlow creates its devices): dropped by
  the stderr filter, and only on a machine with no NVIDIA device (no ``/dev/nvidia<N>``, no NVIDIA kernel driver),
  where it can only mean "no GPU here"; on a GPU machine it is shown, since there it is a real error. Nothing here
  sets ``CUDA_VISIBLE_DEVICES`` or ``JAX_PLATFORMS``: a GPU (or TPU) machine keeps using its accelerator. (The line
  is TensorFlow's: the installed jaxlib has no CUDA plugin and probes nothing.)
- **"<python>: No module named build"**: Beam's stager, for a ``--setup_file`` job (dry runs included), first runs
  ``python -m build --sdist`` and without the ``build`` package falls back to ``setup.py sdist``; the failed try
  prints this through the inherited stderr. Dropped by the stderr filter.
- **"Resource module is not available for current platform"** (Beam 2.77 ``apache_beam/ml/inference/base.py``: one
  ``try`` imports ``resource`` together with ``model_manager``, which needs ``torch``; without torch ``resource`` is
  set to None and every RunInference model load logs this on the root logger, misleadingly: ``resource`` exists).
  Dropped by a ``logging.Filter`` on the root logger, and on the logger through which the local runner relays its
  worker subprocesses' records (``apache_beam.runners.portability.local_job_service``).
- **"No semi_persistent_directory found"** (Beam's ``sdk_worker_main``: a local worker subprocess has no
  semi-persistent directory, so no main session to load; this project does not use one): dropped on the relay logger.
- **"You are passing instance dicts and DatasetMetadata to TFT"** (tensorflow_transform's advice on its input
  format, logged through absl at every analysis): dropped by a filter on the ``absl`` logger.

Importing ``pipelines`` applies the defaults (``apply_console_defaults``): the variable (``os.environ.setdefault``:
what the user set wins) and the logging filters in any process; the stderr filter only in a process started as
``python -m pipelines.<job>`` or ``python -c`` (never under pytest, in a notebook or a script). ``--verbose`` on the
command line skips all three, and ``configure_logging(verbose=True)`` takes them back.

Dry runs: ``--runner=DataflowRunner --dry_run=True`` translates a job without submitting it. Beam 2.77 returns from
``DataflowRunner.run_pipeline`` before ``create_job``, which is where ``--dataflow_job_file`` is written, so Beam
writes no file on a dry run; ``report_dry_run`` writes it and prints one line naming the job, its transforms and the
file.

Use from an entry point::

    argv, verbose = console.strip_verbose_flag(sys.argv[1:] if argv is None else argv)
    console.configure_logging(verbose)            # before anything imports TensorFlow or JAX
    ...
    if is_dry_run(options):
        console.prepare_dry_run(options)          # per job: names the job and its JSON file
        pipeline = beam.Pipeline(options=options)
        build(pipeline)
        result = pipeline.run()
        console.report_dry_run(pipeline, options, result)
"""
from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

VERBOSE_FLAG = "--verbose"
PROJECT_LOGGERS = ("pipelines", "transforms", "data_sources", "tokenminds_model")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Environment defaults at the default verbosity, applied with setdefault before TensorFlow or JAX is imported.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2"}  # C++ INFO and WARNING off; ERROR and FATAL still shown

# Third-party log records known to be harmless here: {logger name: [message pattern]} ("" is the root logger).
_RELAYED_WORKER_LOGGER = "apache_beam.runners.portability.local_job_service"
NOISE_RECORDS: Dict[str, List[str]] = {
    "": [r"^Resource module is not available for current platform"],
    "absl": [r"^You are passing instance dicts and DatasetMetadata to TFT"],
    _RELAYED_WORKER_LOGGER: [r'^Worker: .*\bmessage: "Resource module is not available for current platform',
                             r'^Worker: .*\bmessage: "No semi_persistent_directory found'],
}

# Native (C++) lines dropped from stderr: absl's pre-InitializeLog banner and TensorFlow's static-initializer INFO
# lines. A log prefix is absl's ("I0101 12:00:00.000000  123 ") or TensorFlow's older one ("2026-01-01 12:00:00.000:
# I "), optionally followed by the source file's directory.
_ABSL_BANNER = r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"


def _native_line(severities: str, source: str) -> str:
    return (rf"(?:[{severities}]\d{{4}} [\d:.]+\s+\d+ |\d{{4}}-\d\d-\d\d [\d:.]+: [{severities}] )"
            rf"(?:\S*/)?{source}")


NATIVE_NOISE = [
    _ABSL_BANNER,
    _native_line("I", r"port\.cc:\d+\] oneDNN custom operations are on\."),
    _native_line("I", r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\."),
    # Beam's stager trying ``python -m build`` before ``setup.py sdist`` (a --setup_file job, dry runs included).
    r"\S*python[\d.]*: No module named build\s*$",
]
# Only where the machine has no NVIDIA device: there cuInit cannot succeed, and its failure says nothing new.
NATIVE_NOISE_WITHOUT_GPU = [_native_line("EW", r"cuda_(?:platform|driver|executor)\.cc:\d+\] failed call to cuInit")]

# Set in the environment while a filter is installed: "<st_dev>:<st_ino>" of the pipe that is then fd 2. A child
# process that finds its own fd 2 to be that same pipe is already filtered and installs no second filter.
_FILTER_MARKER = "TOKENMINDS_STDERR_FILTER"


# ---------------------------------------------------------------------------------------------------------------
# The command line and Python logging
# ---------------------------------------------------------------------------------------------------------------
def strip_verbose_flag(argv: Sequence[str]) -> Tuple[List[str], bool]:
    """``argv`` without ``--verbose``, and whether it was given.

    Accepts ``--verbose`` and ``--verbose=true|false`` (also 1/0, yes/no), anywhere before a bare ``--``; the last
    one wins. Any other ``--verbose=VALUE`` is a ``ValueError``. Returns a new list; ``argv`` is not modified.
    """
    rest: List[str] = []
    verbose = False
    for i, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg == VERBOSE_FLAG:
            verbose = True
            continue
        if arg.startswith(VERBOSE_FLAG + "="):
            value = arg.split("=", 1)[1].strip().lower()
            if value in ("1", "true", "yes"):
                verbose = True
            elif value in ("0", "false", "no"):
                verbose = False
            else:
                raise ValueError(f"{VERBOSE_FLAG} takes no value (or true/false), got {arg!r}")
            continue
        rest.append(arg)
    return rest, verbose


class KnownNoiseFilter(logging.Filter):
    """Drops the records whose message matches one of ``patterns`` (regular expressions, searched)."""

    def __init__(self, patterns: Sequence[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to hide
            return True
        return not any(p.search(message) for p in self.patterns)


def _logger(name: str) -> logging.Logger:
    if name == "absl":
        # absl-py creates its logger with its own Logger class; make sure it exists before we fetch it by name.
        try:
            import absl.logging  # noqa: F401
        except ImportError:
            pass
    return logging.getLogger(name)


def _set_noise_filters(enabled: bool) -> None:
    for name, patterns in NOISE_RECORDS.items():
        logger = _logger(name)
        for old in [f for f in logger.filters if isinstance(f, KnownNoiseFilter)]:
            logger.removeFilter(old)
        if enabled:
            logger.addFilter(KnownNoiseFilter(patterns))


def configure_logging(verbose: bool) -> None:
    """Sets up Python logging for a command-line run; call it first thing, with ``strip_verbose_flag``'s answer.

    Both modes: a root handler (``LOG_FORMAT``, on stderr) unless one exists; root, ``absl`` and ``tensorflow`` at
    WARNING (Beam logs every stage at INFO; a job prints its own summary).

    Default (``verbose=False``): the ``pipelines``/``transforms``/``tokenminds_model`` loggers inherit WARNING, and
    the records in ``NOISE_RECORDS`` are dropped.

    ``verbose=True``: the project's loggers at INFO, no record dropped, and the quiet defaults that importing
    ``pipelines`` applied are taken back (``restore_console_defaults``: environment variables it set are removed, the
    stderr filter is removed), so TensorFlow's C++ logging keeps its own defaults. Call it before TensorFlow or JAX
    is imported (the jobs import them lazily), since both read their logging variables once.

    Idempotent. Calling it again with the other value switches the logging part; the environment and the stderr
    filter are only ever taken back here, never re-applied (that is ``apply_console_defaults``).
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=LOG_FORMAT)
    root.setLevel(logging.WARNING)
    for name in ("absl", "tensorflow"):
        _logger(name).setLevel(logging.WARNING)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.NOTSET)
    _set_noise_filters(enabled=not verbose)
    if verbose:
        restore_console_defaults()


# ---------------------------------------------------------------------------------------------------------------
# Process defaults: environment variables and the native stderr filter
# ---------------------------------------------------------------------------------------------------------------
_env_we_set: Dict[str, str] = {}


def nvidia_device_present() -> bool:
    """Whether this machine has an NVIDIA device node or a loaded NVIDIA kernel driver."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/proc/driver/nvidia/version")


def native_noise_patterns() -> List[str]:
    """The stderr line patterns the native filter drops on this machine."""
    return NATIVE_NOISE + ([] if nvidia_device_present() else NATIVE_NOISE_WITHOUT_GPU)


def _started_from_command_line() -> bool:
    # While ``python -m pipelines.<job>`` locates its module (which imports this package), sys.argv[0] is "-m";
    # under ``python -c`` it is "-c". Under pytest, a notebook or a script it is a path or "".
    return sys.argv[:1] in (["-m"], ["-c"])


def apply_console_defaults(argv: Optional[Sequence[str]] = None,
                           native_filter: Optional[bool] = None) -> bool:
    """The quiet defaults, unless ``argv`` (default ``sys.argv[1:]``) asks for ``--verbose``. Returns whether applied.

    Called when ``pipelines`` is imported, before TensorFlow or JAX can be: sets ``QUIET_ENVIRONMENT`` with
    ``os.environ.setdefault`` (what the user set wins; worker subprocesses inherit the result), adds the
    ``NOISE_RECORDS`` logging filters (they drop only those records, so they are safe in any process), and installs
    the native stderr filter (``install_native_stderr_filter``) when ``native_filter`` is True, or when it is None
    and the process was started as ``python -m pipelines.<job>`` or ``python -c`` (never in pytest, a notebook or a
    script: their stderr is not ours to reroute).
    """
    try:
        _, verbose = strip_verbose_flag(sys.argv[1:] if argv is None else argv)
    except ValueError:
        verbose = False  # the entry point reports the bad flag
    if verbose:
        return False
    for name, value in QUIET_ENVIRONMENT.items():
        if name not in os.environ:
            os.environ[name] = value
            _env_we_set[name] = value
    _set_noise_filters(enabled=True)
    if native_filter or (native_filter is None and _started_from_command_line()):
        install_native_stderr_filter()
    return True


def restore_console_defaults() -> None:
    """Takes back what ``apply_console_defaults`` did: removes the variables it set (unless changed since), the
    logging filters and the native stderr filter. TensorFlow and JAX read their variables once, at import: this
    helps only before that."""
    _set_noise_filters(enabled=False)
    for name, value in list(_env_we_set.items()):
        if os.environ.get(name) == value:
            del os.environ[name]
        del _env_we_set[name]
    remove_native_stderr_filter()


# The filter runs in its own small process (``python -I -S -c``): it outlives a crashing driver, so a traceback or a
# fatal error is never lost, and it sees the writes of every process that inherited the pipe. Lines are split at
# "\n" and "\r" (progress bars); a partial line is passed on once the pipe has been idle 50 ms. On any error it falls
# back to copying bytes unchanged; if the real stderr is gone it keeps draining, so no writer ever blocks.
_FILTER_PROGRAM = r"""
import os, re, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = re.compile(sys.argv[1].encode())
out_ok = True
def write(data):
    global out_ok
    while data and out_ok:
        try:
            data = data[os.write(1, data):]
        except InterruptedError:
            continue
        except OSError:
            out_ok = False
pending = b""
try:
    while True:
        if pending and not select.select([0], [], [], 0.05)[0]:
            write(pending)
            pending = b""
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        parts = re.split(b"(?<=[\r\n])", pending + chunk)
        pending = parts.pop()
        write(b"".join(p for p in parts if not noise.match(p)))
except BaseException:
    pass
write(pending)
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    except OSError:
        break
    if not chunk:
        break
    write(chunk)
"""

_native_filter: Optional[Tuple[subprocess.Popen, int]] = None


def _fd2_identity() -> Optional[str]:
    try:
        st = os.fstat(2)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def install_native_stderr_filter(patterns: Optional[Sequence[str]] = None) -> bool:
    """Routes this process's file descriptor 2 through a line filter that drops ``patterns`` (regular expressions
    matched at the start of a line; default ``native_noise_patterns()``). Returns whether stderr is now filtered.

    Works below Python, so it catches what C++ libraries write as they load, and what Beam's worker subprocesses
    write (they inherit fd 2). ``sys.stderr`` is unchanged (it writes to fd 2). Removed at exit, after which the
    filter drains and ends; ``remove_native_stderr_filter`` removes it sooner. A no-op where fd 2 is already a filter
    installed by a parent process, or where no filter process can be started.
    """
    global _native_filter
    if _native_filter is not None:
        return True
    identity = _fd2_identity()
    if identity is None or not sys.executable:
        return False
    if os.environ.get(_FILTER_MARKER) == identity:
        return True
    pattern = "|".join(f"(?:{p})" for p in (native_noise_patterns() if patterns is None else patterns))
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    try:
        process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER_PROGRAM, pattern], stdin=read_end,
                                   stdout=saved, stderr=saved, start_new_session=True)
    except OSError:
        for fd in (read_end, write_end, saved):
            os.close(fd)
        return False
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    _native_filter = (process, saved)
    os.environ[_FILTER_MARKER] = _fd2_identity() or ""
    atexit.register(remove_native_stderr_filter)
    return True


def remove_native_stderr_filter(timeout_s: float = 3.0) -> None:
    """Gives fd 2 back to the real stderr and waits (up to ``timeout_s``) for the filter to pass on what it holds.
    The filter ends once every process that inherited the pipe has closed it. A no-op without a filter."""
    global _native_filter
    if _native_filter is None:
        return
    process, saved = _native_filter
    _native_filter = None
    atexit.unregister(remove_native_stderr_filter)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os.dup2(saved, 2)
    os.close(saved)
    os.environ.pop(_FILTER_MARKER, None)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass  # a worker still holds the pipe; the filter keeps passing its lines on until it ends


# ---------------------------------------------------------------------------------------------------------------
# Dataflow dry runs
# ---------------------------------------------------------------------------------------------------------------
# Defaults chosen by prepare_dry_run, per options object: (the job name it generated or None, the job file). A value
# still equal to ours is ours to replace on the next call, so every job of a per-day loop gets its own name and file.
_dry_run_defaults: Dict[int, Tuple[str, str]] = {}
_job_files_written: set = set()


def is_dry_run(options) -> bool:
    from apache_beam.options.pipeline_options import TestOptions

    value = options.view_as(TestOptions).dry_run
    if isinstance(value, str):  # Beam declares --dry_run without a type: "--dry_run=False" arrives as "False"
        return value.strip().lower() not in ("", "0", "false", "no")
    return bool(value)


def _default_job_name() -> str:
    from apache_beam.runners.dataflow.internal import apiclient

    return apiclient.Job.default_job_name(None)


def prepare_dry_run(options) -> Optional[str]:
    """Before ``pipeline.run()`` of a dry run: chooses where the translated job's JSON goes. Returns that path, or
    None when ``options`` is not a dry run (then nothing is changed).

    A ``--dataflow_job_file`` the user gave is kept. Otherwise the job gets a name now if it has none
    (``--job_name``, generated as Beam would: ``beamapp-<user>-<time>-<random>``) and the file is
    ``<tempfile.gettempdir()>/<job_name>.json``; both are set on ``options``. Called again on the same options (one
    job per day), it replaces the name and file it chose itself, so each job gets its own. With
    ``--template_location`` (exclusive with ``--dataflow_job_file`` in Beam) the path is returned but not set.

    Raises ValueError if ``--runner`` names a runner other than Dataflow's: only DataflowRunner honours
    ``--dry_run``; any other runner would run the job for real.
    """
    from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, StandardOptions

    if not is_dry_run(options):
        return None
    runner = options.view_as(StandardOptions).runner
    if runner is not None and "dataflow" not in str(runner).lower():
        raise ValueError(f"--dry_run only translates a job with --runner=DataflowRunner; {runner} would run it")
    debug, cloud = options.view_as(DebugOptions), options.view_as(GoogleCloudOptions)
    our_name, our_path = _dry_run_defaults.get(id(options), (None, None))
    if debug.dataflow_job_file and debug.dataflow_job_file != our_path:
        return debug.dataflow_job_file
    if not cloud.job_name or cloud.job_name == our_name:
        cloud.job_name = our_name = _default_job_name()
    path = os.path.join(tempfile.gettempdir(), f"{cloud.job_name}.json")
    if cloud.template_location:
        return path
    debug.dataflow_job_file = path
    _dry_run_defaults[id(options)] = (our_name, path)
    return path


def _translated_job(pipeline, result):
    job = getattr(result, "job", None)
    if job is None:
        job = getattr(getattr(pipeline, "runner", None), "job", None)
    if job is None or not hasattr(job, "proto_pipeline"):
        raise ValueError("no translated Dataflow job: report_dry_run follows pipeline.run() with "
                         "--runner=DataflowRunner --dry_run=True")
    return job


def transform_counts(proto_pipeline) -> Tuple[int, int]:
    """(transforms, primitive transforms) of a runner-API pipeline proto. Transforms counts every named transform,
    composites included, leaving out only an unnamed synthetic root (no URN); primitives are those with no
    subtransforms (what runs as a step)."""
    transforms = proto_pipeline.components.transforms
    roots = set(proto_pipeline.root_transform_ids)
    named = [t for tid, t in transforms.items() if not (tid in roots and not t.spec.urn)]
    return len(named), sum(1 for t in named if not t.subtransforms)


def _write_text(path: str, text: str) -> None:
    if "://" in path:
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(path) as f:
            f.write(text.encode("utf-8"))
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def report_dry_run(pipeline, options, result=None, file=None) -> str:
    """After ``pipeline.run()`` of a DataflowRunner dry run: writes the translated job's JSON and prints one line.

    The line (to ``file``, default stdout) and the return value::

        dry run: Dataflow job <job name> translated, not submitted: <N> transforms (<P> primitive); job JSON: <path>

    The JSON is ``{"job": <the Dataflow Job message as Beam built it>, "pipeline": <the runner-API pipeline proto
    Dataflow runs, as JSON>}`` (with Runner v2 the Job message itself carries no steps: the pipeline proto is the
    job). It goes to ``--dataflow_job_file`` (the user's, or ``prepare_dry_run``'s default; local or any Beam
    filesystem), or, when that is unset, to ``<tempfile.gettempdir()>/<job name>.json``; a default path this
    process already wrote gets a ``-2``, ``-3``... suffix instead of being overwritten.

    The job is ``result.job`` when ``result`` (what ``pipeline.run()`` returned) is given, else the one the pipeline's
    runner kept. Raises ValueError when there is none (not a DataflowRunner dry run).
    """
    from apache_beam.options.pipeline_options import DebugOptions
    from google.protobuf import json_format

    job = _translated_job(pipeline, result)
    name = job.proto.name
    path = options.view_as(DebugOptions).dataflow_job_file
    if not path or path == _dry_run_defaults.get(id(options), (None, None))[1]:
        path = path or os.path.join(tempfile.gettempdir(), f"{name}.json")
        stem = path[:-len(".json")] if path.endswith(".json") else path
        n = 1
        while path in _job_files_written:
            n += 1
            path = f"{stem}-{n}.json"
    document = {"job": json.loads(job.json()), "pipeline": json_format.MessageToDict(job.proto_pipeline)}
    _write_text(path, json.dumps(document, indent=1, sort_keys=True) + "\n")
    _job_files_written.add(path)
    total, primitive = transform_counts(job.proto_pipeline)
    line = (f"dry run: Dataflow job {name} translated, not submitted: {total} transforms ({primitive} primitive); "
            f"job JSON: {path}")
    print(line, file=file or sys.stdout, flush=True)
    return line
