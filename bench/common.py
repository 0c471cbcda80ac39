"""Shared helpers for the benchmarks: run a job as a measured subprocess, print tables, the RESULT line.

``run_job("pipelines.update_histories", *args)`` runs ``python -m bench.common pipelines.update_histories args``,
which executes the job exactly as ``python -m pipelines.update_histories args`` would (``runpy`` as ``__main__``),
with ``pipelines.cli.run_main`` wrapped so that start-up and imports are timed apart from the job itself. The
parent measures, for the whole process tree (multi-process runners start SDK worker processes):

- ``wall_s``: the subprocess from start to exit; ``run_s``: the job's ``main`` alone (reported by the child);
  ``import_s``: from the wrapper's start to the job's ``run_main`` (imports; the interpreter's own start-up is in
  ``wall_s`` only);
- ``cpu_s``: user + system CPU seconds of every process of the tree (``os.wait4`` of the child, which includes the
  descendants it reaped, or the sum of the last CPU times polled per process, whichever is larger). On a shared
  machine CPU seconds are less sensitive to other load than wall time;
- ``peak_tree_rss_mib``: the peak of the summed RSS of the tree, polled every ``poll_s`` seconds (pages shared
  between processes count once per process); ``max_process_rss_mib``: the largest peak RSS of any one process of
  the tree (``VmHWM`` from ``/proc/PID/status``, the kernel's high-water mark, read at each poll).

``ru_maxrss`` (``os.wait4`` or ``getrusage(RUSAGE_CHILDREN)``) is not used for memory: Linux carries a process's
pre-``exec`` high-water mark over into ``ru_maxrss``, so a job started from this (large) benchmark process reports
at least this process's RSS at fork time, not its own peak.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
FNAPI = ["--runner=FnApiRunner"]
FNAPI_2PROC = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
RUNNERS = {"1 process": FNAPI, "2 processes": FNAPI_2PROC}


def child_env() -> Dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


class JobFailed(RuntimeError):
    pass


def run_job(module: str, *args: str, poll_s: float = 0.1, timeout_s: Optional[float] = None,
            extra_env: Optional[Dict[str, str]] = None, tree: Optional[str] = None) -> Dict[str, float]:
    """Runs ``module`` (a ``python -m`` entry point) with ``args`` in a measured subprocess; see the module doc.
    The result's ``log`` holds the job's stdout and stderr (SDK worker processes write theirs there too).

    ``tree``: another checkout of this project (e.g. an older commit, for a before/after comparison): the job runs
    with that directory as working directory and ``PYTHONPATH``, so ``module`` and everything it imports come from
    there; the wrapper is this file, run by path. ``module`` may also be the path of a ``.py`` file (run with
    ``runpy.run_path``), e.g. ``bench/_gc_probe.py``, which then runs the job module named in ``args``."""
    import psutil

    root_dir = Path(tree).resolve() if tree else REPO
    with tempfile.TemporaryDirectory(prefix="bench_job_") as scratch:
        timings_path = os.path.join(scratch, "timings.json")
        log_path = os.path.join(scratch, "log.txt")
        if tree:
            command = [PYTHON, str(Path(__file__).resolve()), module, timings_path, *args]
        else:
            command = [PYTHON, "-m", "bench.common", module, timings_path, *args]
        env = {**child_env(), "PYTHONPATH": str(root_dir), **(extra_env or {})}
        with open(log_path, "w") as log:
            started = time.perf_counter()
            process = subprocess.Popen(command, cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
            root = psutil.Process(process.pid)
            peak_tree, cpu_by_pid, hwm_by_pid, command_by_pid, status, usage = 0, {}, {}, {}, None, None
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                try:
                    tree = [root] + root.children(recursive=True)
                except psutil.Error:
                    tree = []
                rss = 0
                for member in tree:
                    try:
                        with member.oneshot():
                            rss += member.memory_info().rss
                            times = member.cpu_times()
                            ident = (member.pid, member.create_time())
                        cpu_by_pid[ident] = times.user + times.system
                        if ident not in command_by_pid:
                            command_by_pid[ident] = _short_command(member)
                        hwm_by_pid[ident] = max(hwm_by_pid.get(ident, 0), _vm_hwm_bytes(member.pid))
                    except (psutil.Error, OSError):
                        pass
                peak_tree = max(peak_tree, rss)
                if timeout_s and time.perf_counter() - started > timeout_s:
                    process.kill()
                time.sleep(poll_s)
            wall = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)
        log_text = Path(log_path).read_text(errors="replace")
        if process.returncode != 0:
            raise JobFailed(f"{module} {' '.join(args)} exited with {process.returncode}:\n{log_text[-4000:]}")
        timings = json.loads(Path(timings_path).read_text())
    waited_cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "run_s": timings["run_s"], "import_s": timings["import_s"],
            "cpu_s": max(waited_cpu, sum(cpu_by_pid.values())),
            "peak_tree_rss_mib": peak_tree / 2**20,
            "max_process_rss_mib": max(hwm_by_pid.values(), default=0) / 2**20,
            "processes_seen": len(cpu_by_pid),
            "process_commands": dict(collections.Counter(command_by_pid.values())), "log": log_text}


def _short_command(process) -> str:
    """'python -m module' (or the program's name) of a process, to tell the job from its SDK workers."""
    try:
        argv = process.cmdline()
    except Exception:  # noqa: BLE001 - psutil errors, or a process gone in between
        return "?"
    if "-m" in argv[:-1]:
        return "python -m " + argv[argv.index("-m") + 1]
    return os.path.basename(argv[0]) if argv else "?"


def _vm_hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(module: str, timings_path: str, argv: List[str]) -> None:
    """The subprocess side of :func:`run_job`: run ``module`` as ``python -m`` would (``runpy`` as ``__main__``).

    Every entry point ends in ``pipelines.cli.run_main(main)``; that function is wrapped here so the time spent
    before it (interpreter start-up, imports) and in it (the job) are told apart.
    """
    import runpy

    from pipelines import cli

    marks = {}
    original = cli.run_main

    def timed_run_main(main, argv=None):
        marks["called"] = time.perf_counter()
        try:
            original(main, argv)
        finally:
            marks["returned"] = time.perf_counter()

    cli.run_main = timed_run_main
    sys.argv = [module, *argv]
    code = 0
    try:
        if module.endswith(".py"):
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    if "returned" not in marks:
        raise RuntimeError(f"{module} did not call pipelines.cli.run_main")
    Path(timings_path).write_text(json.dumps({"import_s": marks["called"] - _STARTED,
                                              "run_s": marks["returned"] - marks["called"]}))
    sys.exit(code)


def print_table(headers: Sequence[str], rows: Sequence[Sequence], first_width: Optional[int] = None) -> None:
    """Left-aligned first column, right-aligned others; cells already formatted as strings."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) + 2 for i, h in enumerate(headers)]
    if first_width:
        widths[0] = max(widths[0], first_width)
    print(str(headers[0]).ljust(widths[0]) + "".join(str(h).rjust(w) for h, w in zip(headers[1:], widths[1:])))
    for row in cells:
        print(row[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])))


def machine_line() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPU cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(1/5/15 min; other work on the machine makes wall times noisy, CPU seconds less so)")


def result_line(bench: str, payload: Dict) -> str:
    return "RESULT " + json.dumps({"bench": bench, **payload}, default=_jsonable, sort_keys=True)


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    return float(value)


if __name__ == "__main__":
    _STARTED = time.perf_counter()
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run by path (run_job's ``tree``): bench/ itself must not shadow top-level modules
    _child(sys.argv[1], sys.argv[2], sys.argv[3:])


def synthetic_items(num_items: int, dim: int, seed: int):
    """A hierarchical synthetic catalogue (64 top clusters, 16 sub-clusters each, isotropic noise), float32
    ``[num_items, dim]``: every SID level has structure to find."""
    import numpy as np

    rng = np.random.default_rng(seed)
    top_centers = rng.normal(size=(64, dim)) * 2.0
    sub_offsets = rng.normal(size=(64, 16, dim)) * 0.7
    top = rng.integers(0, 64, num_items)
    sub = rng.integers(0, 16, num_items)
    return (top_centers[top] + sub_offsets[top, sub] + rng.normal(size=(num_items, dim)) * 0.3).astype(np.float32)
