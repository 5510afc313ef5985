"""Graceful stop on SIGTERM: finish the unit of work in flight, save it, exit with a distinct code.

Cluster schedulers preempt a job with SIGTERM and, after a grace period,
SIGKILL. A stage loop wrapped in :class:`GracefulStop` turns the first
SIGTERM into a flag; the loop checks it after each shard/step is written and
stops there by raising :class:`Preempted`. The CLI turns that into exit code
:data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` of sysexits.h: "try again later"),
so a job script can tell "preempted, rerun to resume" from success (0) and
failure (1, 2). A second SIGTERM while stopping restores the previous handler
and re-delivers the signal: the process ends at once, as if unhandled.

    with GracefulStop() as stop:
        for shard in todo:
            compute_and_write(shard)
            stop.check(f"after shard {shard}")   # raises Preempted when SIGTERM came
"""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL


class Preempted(Exception):
    """The process was asked to stop (SIGTERM) and stopped between units of work; rerun to resume."""

    exit_code = EXIT_PREEMPTED


class GracefulStop:
    """Context manager: SIGTERM sets :attr:`requested` instead of killing the process.

    Arguments:
        signals: the signals to catch (default SIGTERM only; Ctrl-C keeps raising KeyboardInterrupt).

    Outside the main thread (where Python cannot install handlers) it catches
    nothing, says so in the log, and :attr:`requested` stays False.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now, the way the signal would without us
            previous = self._previous.get(signum)
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signum = signum
        log.warning("received %s: finishing the work in flight, then stopping (send it again to stop now)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            log.debug("GracefulStop outside the main thread: signals keep their default handling")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def check(self, where: str = "") -> None:
        """Raise :class:`Preempted` when a stop was requested (call it after each unit of work is saved)."""
        if self.requested:
            name = signal.Signals(self.signum).name if self.signum is not None else "stop request"
            raise Preempted(f"stopped by {name}{' ' + where if where else ''}; finished work is saved, "
                            f"rerun the same command to resume")
