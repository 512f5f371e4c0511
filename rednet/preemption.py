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
import threading
import time
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

    Python runs a signal handler only when the main thread runs Python code: a rank blocked in a collective (a
    peer that never joins) would never see the signal. A watcher thread learns of each signal at once (through
    signal.set_wakeup_fd) and, when the main thread has not handled it within `blocked_exit_s` seconds, ends the
    process with status 128 + the signal's number: a stop signal always stops the process, gracefully when it can.

    Example:
        with StopOnSignal() as stop:
            results = train(cfg, run_dir, should_stop=stop)
        if results.get("stopped"):
            requeue_under_submitit(stop.received)
    """

    def __init__(self, signals: tuple[signal.Signals, ...] | None = None, blocked_exit_s: float = 30.0) -> None:
        extra = _submitit_signal()
        self.signals = signals or tuple(dict.fromkeys([signal.SIGTERM, signal.SIGUSR1] + ([extra] if extra else [])))
        self.received: signal.Signals | None = None
        self.blocked_exit_s = blocked_exit_s
        self._previous: dict[signal.Signals, object] = {}
        self._announced = False
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopOnSignal:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._wakeup = os.pipe()
        os.set_blocking(self._wakeup[1], False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="StopOnSignal", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        os.write(self._wakeup[1], b"\0")  # 0 is no signal: it ends the watcher
        self._watcher.join()
        for fd in self._wakeup:
            os.close(fd)

    def _watch(self) -> None:
        stop_signals = {int(sig) for sig in self.signals}
        while True:
            for signum in os.read(
                self._wakeup[0], 64
            ):  # the numbers of the signals received, written by Python's C handler
                if signum == 0:
                    return
                if signum in stop_signals and self.received is None:
                    threading.Thread(target=self._exit_if_unhandled, args=(signum,), daemon=True).start()

    def _exit_if_unhandled(self, signum: int) -> None:
        deadline = time.monotonic() + self.blocked_exit_s
        while self.received is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.received is None and self._previous:  # (the block may have ended meanwhile)
            name = signal.Signals(signum).name
            os.write(2, f"{name} not handled for {self.blocked_exit_s:.0f} s (blocked outside Python, e.g. in a "
                     "collective another rank never joined): exiting now\n".encode())  # fmt: skip
            os._exit(128 + signum)

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
