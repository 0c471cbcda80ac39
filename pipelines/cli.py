"""Entry-point plumbing shared by every ``python -m pipelines.<job>``: logging, and clear errors for bad input.

Input and configuration problems (a missing partition, an unreadable file, a missing column, a checkpoint that does
not fit, a malformed option) are found by the driver before any worker starts. They are reported as one line naming
what is wrong, with exit status 2, instead of a stack trace; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, List, Optional

from transforms.sources import InputContractError

EXPECTED_ERRORS = (InputContractError, FileNotFoundError, FileExistsError, ValueError)


def run_main(main: Callable[[Optional[List[str]]], None], argv: Optional[List[str]] = None) -> None:
    # Beam logs every stage at INFO; a job's own summary is printed, so the console shows warnings and up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(sys.argv[1:] if argv is None else argv)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_per_day(options, dates, build_day: Callable, summary_path: Callable, clear_dirs: Callable = lambda d: (),
                before_run: Callable = lambda d: None) -> List[dict]:
    """One Beam job per day, in date order (for jobs where each day builds on the one before).

    For each day: empty its output partitions (``clear_dirs``; a rerun replaces the day), ``before_run`` (files
    written beside the shards), build the pipeline (``build_day(pipeline, date)``), run it, wait, and check that its
    run summary (``summary_path(date)``) balances. With ``--dry_run`` the job is only translated: no output is touched.
    Returns the summaries.
    """
    import apache_beam as beam

    from pipelines.options import is_dry_run
    from transforms import outputs

    summaries = []
    for date in dates:
        if not is_dry_run(options):
            for directory in clear_dirs(date):
                outputs.clear_output_dir(directory)
            before_run(date)
        pipeline = beam.Pipeline(options=options)
        build_day(pipeline, date)
        result = pipeline.run()
        if is_dry_run(options):
            continue
        result.wait_until_finish()
        summary = outputs.read_json_file(summary_path(date))
        if not summary["totals"]["balanced"]:
            raise RuntimeError(f"row accounting failed for {date}: {summary['totals']}")
        summaries.append(summary)
    return summaries
