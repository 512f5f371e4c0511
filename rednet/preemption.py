"""Preemption: SIGTERM and SIGUSR1 stop training after the current step, on every rank, with last.pt written.

SLURM warns a job before its time limit with the signal of `--signal` (SIGUSR1, or submitit's SIGUSR2) and
preempts or cancels it with SIGTERM, followed by SIGKILL after a grace time. The handler only records the signal;
the training loop asks after each optimizer step, the ranks agree on the same step, last.pt is written and train()
returns. Under submitit a time-limit warning then goes to submitit's own handler, which requeues the job (scontrol
requeue on SLURM, exit code 144 with the local executor); SIGTERM does not requeue (scancel sends it too).
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType, TracebackType

from rednet import distributed

_logger = logging.getLogger(__name__)


def _submitit_signal() -> signal.Signals | None:
    """The time-limit signal submitit registered for this job (USR2 unless SUBMITIT_PREEMPT_SIGNAL says else)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    from submitit import JobEnvironment

    return getattr(signal, "SIG" + JobEnvironment.USR_SIG)


class StopOnSignal:
    """Catch the stop signals for the duration of a `with` block; calling it tells the loop whether to stop.

    Example:
        with StopOnSignal() as stop:
            results = train(cfg, run_dir, should_stop=stop)
        if results.get("stopped"):
            requeue_under_submitit(stop.received)
    """

    def __init__(self, signals: tuple[signal.Signals, ...] | None = None) -> None:
        extra = _submitit_signal()
        self.signals = signals or tuple(dict.fromkeys([signal.SIGTERM, signal.SIGUSR1] + ([extra] if extra else [])))
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._announced = False

    def __enter__(self) -> StopOnSignal:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the step in progress finishes, and logging here could interleave with the interrupted code.
        self.received = signal.Signals(signum)

    def __call__(self) -> bool:
        """Whether any rank received a stop signal; the same answer on every rank (one tiny all-reduce).

        Every rank then also holds the same `received` (SIGTERM wins over a time-limit warning: no requeue).
        """
        signum = distributed.max_over_ranks(int(self.received or 0))
        if not signum:
            return False
        self.received = signal.Signals(signum)
        if not self._announced:
            self._announced = True
            _logger.warning("%s: stopping after this step, writing last.pt (resume=auto continues)", self.received.name)
        return True


def requeue_under_submitit(received: signal.Signals | None) -> None:
    """After a time-limit warning, let submitit checkpoint and requeue the job (rank 0 requeues, then exits).

    submitit's handler asks the launcher's `checkpoint()` for the resubmission (the same Hydra job, so the same run
    directory) and requeues it; the requeued run needs resume=auto to continue from last.pt.
    """
    submitit_signal = _submitit_signal()
    if submitit_signal is None or received in (None, signal.SIGTERM):
        return
    handler = signal.getsignal(submitit_signal)
    if callable(handler):
        _logger.info("handing %s to submitit: checkpoint and requeue", received.name)
        handler(submitit_signal, None)
