"""Entry-point plumbing shared by every ``python -m pipelines.<job>``: logging, and clear errors for bad input.

Input and configuration problems (a missing partition, an unreadable file, a missing column, a checkpoint that does
not fit, a malformed option) are found by the driver before any worker starts. They are reported as one line naming
what is wrong, with exit status 2, instead of a stack trace; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence

from transforms.sources import InputContractError

EXPECTED_ERRORS = (InputContractError, FileNotFoundError, FileExistsError, ValueError)


def run_main(main: Callable[[Optional[List[str]]], None], argv: Optional[List[str]] = None) -> None:
    from pipelines import console

    try:
        argv, verbose = console.strip_verbose_flag(sys.argv[1:] if argv is None else argv)
        # Beam logs every stage at INFO; a job's own summary is printed, so the console shows warnings and up
        # (and the project's own INFO lines with --verbose).
        console.configure_logging(verbose)
        main(argv)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_staged(options, job: str, output_dirs: Sequence[str], build: Callable, summary_paths: Sequence[str],
               before_run: Callable = lambda day_outputs: None) -> List[dict]:
    """Builds and runs one Beam job whose outputs are staged and published only if it succeeds.

    ``build(pipeline, day_outputs)`` builds the job, writing every output under ``day_outputs.staged(final_dir)``
    (pre-flight checks belong there too: they raise before anything exists); ``before_run(day_outputs)`` writes
    files beside the shards; then the job runs, each run summary (``summary_paths``, final paths) must balance, and
    the staged partitions replace the final ones (``transforms.publish``). Until then no final output is touched,
    so a failed run leaves yesterday's good output exactly as it was. With ``--dry_run`` the job is only
    translated. Returns the summaries.
    """
    import apache_beam as beam

    from pipelines.options import is_dry_run
    from transforms import outputs
    from transforms.publish import DayOutputs

    day_outputs = DayOutputs(job, output_dirs)
    if is_dry_run(options):
        from pipelines import console

        console.prepare_dry_run(options)  # names the job and the file its JSON goes to
        pipeline = beam.Pipeline(options=options)
        build(pipeline, day_outputs)
        console.report_dry_run(pipeline, options, pipeline.run())
        return []
    day_outputs.check_replaceable()  # someone else's files under --output_root: fail before any work
    try:
        pipeline = beam.Pipeline(options=options)
        build(pipeline, day_outputs)
        before_run(day_outputs)
        pipeline.run().wait_until_finish()
        summaries = [outputs.read_json_file(day_outputs.staged(path)) for path in summary_paths]
        for summary in summaries:
            if not summary["totals"]["balanced"]:
                raise RuntimeError(f"row accounting failed for {summary.get('date')}: {summary['totals']}; "
                                   "nothing was published")
        day_outputs.publish()
    except BaseException:
        day_outputs.discard()
        raise
    return summaries


def run_per_day(options, dates, job: str, build_day: Callable, output_dirs: Callable, summary_path: Callable,
                before_run: Callable = lambda date, day_outputs: None) -> List[dict]:
    """One staged Beam job per day (``run_staged``), in date order: each day is published before the next is built,
    since sequential jobs read the day before. ``build_day(pipeline, date, day_outputs)``; ``output_dirs(date)`` the
    day's output partitions; ``summary_path(date)`` its run summary (a final path inside one of them)."""
    summaries = []
    for date in dates:
        summaries += run_staged(options, job, output_dirs(date),
                                build=lambda pipeline, day_outputs, date=date: build_day(pipeline, date, day_outputs),
                                summary_paths=[summary_path(date)],
                                before_run=lambda day_outputs, date=date: before_run(date, day_outputs))
    return summaries
