"""Stopping a run on purpose without losing it: SIGTERM / SIGINT, and non-finite losses.

The CLI installs the handlers for the whole run (`StopSignals`), so a signal never ends
metarun with a traceback or silently:

- while training, the first signal only sets a flag: the trainer finishes the step it is
  in, writes `last.pt` at that step, flushes the logs and stops with an error that says how
  to resume;
- a second signal stops at once (`Interrupted` is raised where the program is), losing at
  most the step in progress: the trainer puts back what that step had changed and writes
  `last.pt` at the step before; the update itself (from the optimizer's first write to the
  step count) is never cut in half: a signal arriving inside it takes effect right after;
- outside the training loop (loading data, validation of a resumed step, the final test,
  `mode=test`, `mode=predict`) the first signal stops at once: nothing there is lost.

The process ends with status 128 + the signal's number, as shells report it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from metarun.runners import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt, not an error)
    """Raised from a signal handler to stop now; a BaseException, so that no `except
    Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_active: StopSignals | None = None


class StopSignals:
    """Context manager: SIGTERM and SIGINT stop the run, at once or after the step."""

    def __init__(self) -> None:
        self.signum: int | None = None  # a stop requested after the current step
        self.after_step = False  # inside the training loop: the first signal waits
        self.committing = False  # inside an update: every signal waits
        self.deferred: int | None = None  # a signal that arrived while committing
        self.previous: dict = {}
        self.outer: StopSignals | None = None

    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        self.outer, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        _active = self.outer

    def handle(self, signum: int, frame) -> None:
        if self.after_step and self.signum is None:
            self.signum = signum
            # straight to the terminal, not through logging: the handler may have interrupted
            # a write to the same stream, and a buffered stream refuses a reentrant write
            # ("--- Logging error ---"); the stop itself is logged when it happens
            notice = (
                f"received {signal.Signals(signum).name}: writing a checkpoint after this "
                "step, then stopping (Ctrl-C again to stop at once)\n"
            )
            with contextlib.suppress(OSError):
                os.write(2, notice.encode())
            return
        if self.committing:
            self.deferred = self.deferred or signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def training(self):
        """The first signal waits for the end of the step (see the module docstring)."""
        self.after_step = True
        try:
            yield self
        finally:
            self.after_step = False

    @contextlib.contextmanager
    def shielded(self):
        """Signals wait until the block is done (then the first one raises Interrupted)."""
        was, self.committing = self.committing, True
        try:
            yield
        finally:
            self.committing = was
        if not was:
            self.raise_deferred()

    def begin_commit(self, *args) -> None:
        """An optimizer step pre-hook: from here to `end_commit` signals wait."""
        self.committing = True

    def end_commit(self) -> None:
        self.committing = False
        self.raise_deferred()

    def raise_deferred(self) -> None:
        if self.deferred is not None:
            signum, self.deferred = self.deferred, None
            raise Interrupted(signum)

    def requested(self, parallel: bool = False) -> int | None:
        """The signal to stop for after this step, or None; with several processes, any
        rank's signal stops every rank at the same step."""
        if not parallel:
            return self.signum
        return distributed.max_over_ranks(self.signum or 0) or None


@contextlib.contextmanager
def stop_signals():
    """The StopSignals in force (the CLI's), or new ones for a run started from Python."""
    if _active is not None:
        yield _active
        return
    with StopSignals() as signals:
        yield signals
