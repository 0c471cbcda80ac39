"""Run a job module with its garbage-collection time measured (and optionally under cProfile).

    python -m bench._gc_probe [--profile=OUT.pstats] pipelines.build_examples ARGS...
    python bench/_gc_probe.py ...           (the same; what bench.examples_pipeline runs, so that it works
                                             against another checkout's ``pipelines`` on ``PYTHONPATH``)

Runs ``MODULE`` exactly as ``python -m MODULE ARGS`` would (``runpy`` as ``__main__``), with a ``gc.callbacks``
hook that times every collection (thread CPU time of the collecting thread, and wall time) and, where the module
calls ``pipelines.cli.run_main``, the process CPU seconds spent before it (interpreter start-up and imports) and in
it. At exit it prints one line (after the job's own output)::

    RESULT {"bench": "gc_probe", "gc_cpu_s": ..., "process_cpu_s": ..., "gc_share": ..., ...}

``gc_share`` = GC CPU seconds / this process's CPU seconds (user + system, every thread, from start-up to exit).
Only this process is measured: SDK worker processes of a multi-process runner are not. The hook costs a couple of
clock reads per collection. With ``--profile`` the job (``run_main``, so not the imports before it) runs under
``cProfile`` (wall clock; it sees the thread that runs the job: with ``--runner=FnApiRunner`` in
one process, bundles run there) and the stats are dumped to OUT.pstats;
the GC figures of a profiled run are inflated by the profiler's own allocations, so take them from an unprofiled one.
"""
from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import time

def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def main(argv) -> int:
    profile_path = None
    if argv and argv[0].startswith("--profile="):
        profile_path, argv = argv[0].split("=", 1)[1], argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]

    stats = {"gc_cpu_s": 0.0, "gc_wall_s": 0.0, "collections": [0, 0, 0], "gc_cpu_s_by_generation": [0.0, 0.0, 0.0],
             "collected": 0, "uncollectable": 0, "longest_collection_s": 0.0}
    started = {}

    def on_gc(phase, info):
        if phase == "start":
            started["cpu"], started["wall"] = time.thread_time(), time.perf_counter()
            return
        if "cpu" not in started:
            return
        cpu = time.thread_time() - started.pop("cpu")
        wall = time.perf_counter() - started.pop("wall")
        generation = info.get("generation", 0)
        stats["gc_cpu_s"] += cpu
        stats["gc_wall_s"] += wall
        stats["collections"][generation] += 1
        stats["gc_cpu_s_by_generation"][generation] += cpu
        stats["collected"] += info.get("collected", 0)
        stats["uncollectable"] += info.get("uncollectable", 0)
        stats["longest_collection_s"] = max(stats["longest_collection_s"], wall)

    profiler = None
    if profile_path:
        import cProfile

        # The default (wall) clock: a thread-CPU clock is a system call per event, which triples the job's time and
        # inflates functions called often. Waits show up as the self time of lock ``acquire`` and the like.
        profiler = cProfile.Profile()

    marks, hooked = {}, False
    try:  # CPU before and inside the job's main, where the module goes through pipelines.cli.run_main
        from pipelines import cli

        original = cli.run_main

        def run_main(main_fn, argv=None):
            marks["called"] = _process_cpu()
            if profiler is not None:  # the job itself, not the imports before it
                profiler.enable()
            try:
                original(main_fn, argv)
            finally:
                if profiler is not None:
                    profiler.disable()
                marks["returned"] = _process_cpu()

        cli.run_main = run_main
        hooked = True
    except ImportError:
        pass

    gc.callbacks.append(on_gc)
    sys.argv = [module, *args]
    code = 0
    if profiler is not None and not hooked:
        profiler.enable()  # no run_main to hook: profile the whole module
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        if profiler is not None:
            profiler.disable()
        gc.callbacks.remove(on_gc)
    process_cpu = _process_cpu()
    if profiler is not None:
        profiler.dump_stats(profile_path)
    result = {"bench": "gc_probe", "module": module, "exit_code": code, "process_cpu_s": process_cpu,
              "gc_share": stats["gc_cpu_s"] / process_cpu if process_cpu > 0 else float("nan"),
              "gc_thresholds": list(gc.get_threshold()), "gc_frozen": gc.get_freeze_count(), **stats}
    if "called" in marks:
        result["import_cpu_s"] = marks["called"]
        result["main_cpu_s"] = marks.get("returned", process_cpu) - marks["called"]
    sys.stdout.flush()
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return code


def parse_result(log_text: str):
    """The probe's RESULT dict from a job's log (its last ``RESULT {"bench": "gc_probe"...`` line), or None."""
    for line in reversed(log_text.splitlines()):
        if line.startswith("RESULT {") and '"gc_probe"' in line:
            return json.loads(line[len("RESULT "):])
    return None


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run as a file: bench/ itself must not shadow top-level modules
    sys.exit(main(sys.argv[1:]))
