"""The pass/fail bookkeeping of the Python check scripts (helm_check.py, check_compose.py):
each check prints one line, and the run fails if any did."""

from __future__ import annotations

import sys

failures: list[str] = []
passes = 0


def check(cond: bool, what: str) -> bool:
    global passes
    if cond:
        passes += 1
        print(f"  ok   {what}")
    else:
        failures.append(what)
        print(f"  FAIL {what}")
    return cond


def summary() -> int:
    """Print the totals and the failed checks; the exit status."""
    print(f"{passes} passed, {len(failures)} failed")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0
