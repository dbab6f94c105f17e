"""Opt-in stack dumps for a rank that stops making progress: `FOLOVLLM_HANG_DUMP_S=N`.

With NCCL a rank that waits for a peer does not fail: it blocks inside a CUDA call (the peer's
half of an all-reduce never arrives), where neither Ctrl-C nor a Python timeout reaches it, and the
collective's own timeout fires only after minutes. With the variable set, the driver and every
worker re-arm `faulthandler`'s timer at each step; a process that goes N seconds without starting
a step writes every thread's Python stack to stderr, again every N seconds, and keeps running. Side
by side, the driver's and the workers' stacks show which collective or which wait each one is in.

The timer is `faulthandler`'s, one per process (the process is the unit being watched); nothing else
is shared.
"""

from __future__ import annotations

import faulthandler
import os
import sys

HANG_DUMP_ENV = "FOLOVLLM_HANG_DUMP_S"


def hang_dump_seconds(environ: dict[str, str] | None = None) -> float | None:
    """The dump interval from the environment; None when unset, empty or 0 (off)."""
    value = (os.environ if environ is None else environ).get(HANG_DUMP_ENV, "").strip()
    if not value:
        return None
    seconds = float(value)
    if seconds < 0:
        raise ValueError(f"{HANG_DUMP_ENV} must be a number of seconds >= 0, got {value!r}")
    return seconds or None


def arm_hang_dump(seconds: float | None) -> None:
    """(Re)start the countdown: every thread's stack goes to stderr after `seconds` without another
    call, then every `seconds` after that. None: do nothing."""
    if seconds is not None:
        faulthandler.dump_traceback_later(seconds, repeat=True, file=sys.stderr, exit=False)


def disarm_hang_dump(seconds: float | None) -> None:
    if seconds is not None:
        faulthandler.cancel_dump_traceback_later()
