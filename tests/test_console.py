"""The console of a run: quiet at the default verbosity, everything with --verbose; the Dataflow dry-run report."""
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import console
from tests.helpers import DAY, MULTIPROCESS, search, video, watch, write_partition

REPO = Path(__file__).resolve().parents[1]

# What must never reach the console of a default run: native log lines (absl/TensorFlow prefix), absl's banner,
# CUDA probing, and the third-party Python warnings this project knows to be harmless.
NOISE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|absl::InitializeLog|cuInit|cudart|oneDNN|tensorflow|"
                   r"Resource module is not available|semi_persistent_directory|You are passing instance dicts|"
                   r"No module named build|^(?:WARNING|INFO)[: ](?:root|absl|apache_beam)", re.IGNORECASE)
DRY_RUN = ["--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--project=my-project", "--region=us-central1",
           "--temp_location=gs://my-bucket/tmp", "--sdk_location=container"]


def run_python(*args, timeout=300):
    """A fresh interpreter in the repository, as a user's shell would start it (none of our variables preset)."""
    env = {k: v for k, v in os.environ.items() if k not in console.QUIET_ENVIRONMENT and k != console._FILTER_MARKER}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def noise(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if NOISE.search(line)]


def test_tensorflow_jax_and_beam_inference_start_quietly():
    # TensorFlow's load-time lines and cuInit (no GPU here), JAX, and Beam's RunInference memory probe, which logs
    # "Resource module is not available" whenever torch is missing.
    code = ("import pipelines, logging; logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
            "from apache_beam.ml.inference import base\n"
            "probe_warns = base.resource is None; base._get_current_process_memory_in_bytes()\n"
            "import tensorflow as tf, jax\n"
            "total = float(tf.reduce_sum(tf.ones(3))) + float(jax.numpy.ones(2).sum())\n"
            "print(f'total={total} probe_warns={probe_warns}')")
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total=5.0" in result.stdout
    assert noise(result) == [], noise(result)
    assert result.stderr.strip() == ""


def test_a_real_job_with_worker_processes_prints_only_its_summary(tmp_path):
    raw = tmp_path / "raw"
    write_partition(raw, "watch_events", DAY, [watch(), watch(user_id="u2", watch_time_s=-1.0)])
    write_partition(raw, "search_events", DAY, [search()])
    write_partition(raw, "videos", DAY, [video()])
    result = run_python("-m", "pipelines.validate_inputs", f"--date={DAY}", f"--input_root={raw}",
                        f"--output_root={tmp_path / 'out'}", *MULTIPROCESS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert noise(result) == [], noise(result)
    assert DAY.isoformat() in result.stdout  # the job's own summary


def test_verbose_keeps_the_defaults_of_every_library():
    code = ("import os, pipelines; from pipelines import console\n"
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), console._native_filter is not None)")
    assert run_python("-c", code).stdout.split() == ["2", "True"]
    assert run_python("-c", code, "--verbose").stdout.split() == ["None", "False"]
    warn = ("import pipelines, logging; logging.basicConfig()\n"
            "logging.warning('Resource module is not available for current platform, memory usage cannot be fetched.')")
    assert "Resource module" not in run_python("-c", warn).stderr
    assert "Resource module" in run_python("-c", warn, "--verbose").stderr


def test_strip_verbose_flag():
    assert console.strip_verbose_flag(["--date=2026-01-01", "--verbose", "--runner=X"]) == (
        ["--date=2026-01-01", "--runner=X"], True)
    assert console.strip_verbose_flag(["--date=2026-01-01"]) == (["--date=2026-01-01"], False)
    assert console.strip_verbose_flag(["--verbose=false"]) == ([], False)
    assert console.strip_verbose_flag(["--verbose=true", "--", "--verbose"]) == (["--", "--verbose"], True)
    with pytest.raises(ValueError, match="--verbose"):
        console.strip_verbose_flag(["--verbose=loud"])


@pytest.fixture
def logging_state():
    """configure_logging changes process-wide logging and environment state: put it back afterwards."""
    names = ["", "absl", "tensorflow", *console.PROJECT_LOGGERS, *console.NOISE_RECORDS]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    env = {k: os.environ.get(k) for k in console.QUIET_ENVIRONMENT}
    env_we_set = dict(console._env_we_set)
    yield
    for n, (level, filters) in saved.items():
        logger = logging.getLogger(n)
        logger.setLevel(level)
        logger.filters[:] = filters
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    console._env_we_set.clear()
    console._env_we_set.update(env_we_set)


def test_configure_logging_levels_and_filters(logging_state):
    def passes(logger_name, message):
        logger = logging.getLogger(logger_name)
        return logger.filter(logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, (), None))

    relayed = 'Worker: severity: WARN message: "No semi_persistent_directory found:  User registered objects"'
    console.configure_logging(verbose=False)
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("pipelines").getEffectiveLevel() == logging.WARNING
    assert not passes("", "Resource module is not available for current platform, memory usage cannot be fetched.")
    assert not passes(console._RELAYED_WORKER_LOGGER, relayed)
    assert not passes("absl", "You are passing instance dicts and DatasetMetadata to TFT which will not ...")
    assert passes("", "Resource usage is high")
    assert passes(console._RELAYED_WORKER_LOGGER, 'Worker: severity: ERROR message: "Traceback ..."')

    console.configure_logging(verbose=True)
    for name in console.PROJECT_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.INFO
    assert logging.getLogger("absl").level == logging.getLogger("tensorflow").level == logging.WARNING
    assert passes("", "Resource module is not available for current platform, memory usage cannot be fetched.")
    assert passes(console._RELAYED_WORKER_LOGGER, relayed)


# Lines as TensorFlow 2.21 writes them on this kind of machine.
NATIVE_LINES = {
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n": True,
    "I0000 00:00:1796086552.731694    4942 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors.\n": True,
    "I0000 00:00:1796086552.733071    4942 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.\n": True,
    "2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not find cuda drivers "
    "on your machine, GPU will not be used.\n": True,
    "/usr/bin/python3.11: No module named build\n": True,
    "E0000 00:00:1796086557.762113    4942 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)\n": "without GPU",
    "E0000 00:00:1796086557.762113    4942 op_kernel.cc:1857] OP_REQUIRES failed at conv_ops.cc:1068\n": False,
    "error: watch_events: no Parquet files for 2026-03-01\n": False,
}


@pytest.mark.parametrize("gpu", [False, True])
def test_native_noise_patterns(monkeypatch, gpu):
    monkeypatch.setattr(console, "nvidia_device_present", lambda: gpu)
    pattern = re.compile("|".join(f"(?:{p})" for p in console.native_noise_patterns()))
    for line, dropped in NATIVE_LINES.items():
        expected = (not gpu) if dropped == "without GPU" else dropped
        assert bool(pattern.match(line)) == expected, line


def tiny_pipeline(options):
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline | "Create" >> beam.Create([1, 2, 3]) | "Double" >> beam.Map(lambda x: 2 * x)
         | "Group" >> beam.GroupBy(lambda x: x % 2))
    return pipeline


def test_report_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    options = PipelineOptions(DRY_RUN)
    paths, lines = [], []
    for _ in range(2):  # a per-day loop over the same options: each job gets its own name and file
        path = console.prepare_dry_run(options)
        pipeline = tiny_pipeline(options)
        result = pipeline.run()
        line = console.report_dry_run(pipeline, options)
        job = result.job
        assert path == str(tmp_path / f"{job.proto.name}.json")
        total, primitive = console.transform_counts(job.proto_pipeline)
        assert 0 < primitive < total <= len(job.proto_pipeline.components.transforms)
        assert line == (f"dry run: Dataflow job {job.proto.name} translated, not submitted: {total} transforms "
                        f"({primitive} primitive); job JSON: {path}")
        document = json.loads(Path(path).read_text())
        assert document["job"]["name"] == job.proto.name
        names = {t["uniqueName"] for t in document["pipeline"]["components"]["transforms"].values()}
        assert {"Create", "Double", "Group"} <= names
        paths.append(path)
        lines.append(line)
    assert len(set(paths)) == 2
    assert capsys.readouterr().out.splitlines() == lines  # printed, one line per job

    given = tmp_path / "jobs" / "mine.json"
    options = PipelineOptions(DRY_RUN + [f"--dataflow_job_file={given}", "--job_name=my-job"])
    assert console.prepare_dry_run(options) == str(given)
    pipeline = tiny_pipeline(options)
    pipeline.run()
    assert console.report_dry_run(pipeline, options).endswith(f"job JSON: {given}")
    assert json.loads(given.read_text())["job"]["name"] == "my-job"


def test_prepare_dry_run_refuses_runners_that_would_run_the_job():
    assert console.prepare_dry_run(PipelineOptions(["--runner=FnApiRunner"])) is None
    assert console.prepare_dry_run(PipelineOptions(DRY_RUN[:1] + ["--dry_run=False"])) is None
    with pytest.raises(ValueError, match="DataflowRunner"):
        console.prepare_dry_run(PipelineOptions(["--runner=FnApiRunner", "--dry_run=True"]))
