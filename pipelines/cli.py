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
