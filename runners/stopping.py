"""Stopping a run on purpose without losing it: SIGTERM / SIGINT, and non-finite losses.

A signal (a cluster pre-emption, Ctrl-C) only sets a flag; the trainer finishes the step
it is in, writes `last.pt` at that step, flushes the logs and stops with an error that
says how to resume. A second Ctrl-C stops at once (KeyboardInterrupt), losing the step.
"""

from __future__ import annotations

import logging
import signal
import threading

from metarun.runners import distributed

log = logging.getLogger("metarun")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT request a stop after the step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum
        log.warning(
            "received %s: writing a checkpoint after this step, then stopping "
            "(Ctrl-C again to stop at once)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def requested(self, parallel: bool = False) -> int | None:
        """The signal to stop for, or None; with several processes, any rank's signal
        stops every rank at the same step."""
        if not parallel:
            return self.signum
        return distributed.max_over_ranks(self.signum or 0) or None
