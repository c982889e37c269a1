"""Run control: when a training run stops, and how it says so.

Stop signals (SLURM's warning, SIGTERM, Ctrl-C) become a checkpoint and exit code 3; an early end that
the caller asks for (a sweep's pruner) becomes a checkpoint and ``EndedEarly``; a lost peer becomes one
clear error; a failed write is diagnosed in words; fault-injection points let the tests kill a process
at a chosen place. Exit codes: 0 done, 1 training failure, 2 bad input (see errors.py),
3 stopped by a signal after its checkpoint, 130 a second Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from ..errors import TrainingError, first_line

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT) if s is not None)
PREEMPTED_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130

log = logging.getLogger("mednist_gan")


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; re-running the command resumes it."""

    def __init__(self, signame: str, checkpoint: Path):
        super().__init__(f"stopped by {signame} at {checkpoint}; run the same command again to resume")
        self.checkpoint = checkpoint


class EndedEarly(Exception):
    """Training ended before its last step because the caller asked (``StopRequest.end_early``), after a checkpoint."""

    def __init__(self, reason: str, checkpoint: Path):
        super().__init__(f"ended early at {checkpoint}: {reason}")
        self.reason, self.checkpoint = reason, checkpoint


class CatchStopSignals:
    """For the duration of a ``with`` block, the stop signals call ``self._on_signal(signum)``; the handlers
    before it are restored after. ``signal_name`` is the last signal's name (None before one)."""

    signal_name: Optional[str] = None
    _old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, lambda signum, frame: self._on_signal(signum))
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _on_signal(self, signum: int) -> None:
        raise NotImplementedError


class StopRequest(CatchStopSignals):
    """Catches stop signals for the duration of a ``with`` block; ``requested`` agrees across processes.

    The first signal asks for a checkpoint after the current iteration; a second Ctrl-C stops at once.
    ``end_early`` asks for the same without a signal (a sweep's pruner, from the main process).
    """

    def __init__(self):
        self.early_end: Optional[str] = None  # why the run ends before its last step, when asked to

    def _on_signal(self, signum: int) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        if first:  # a sweep worker repeats its SIGUSR1 until its trials have stopped
            log.warning("received %s: saving a checkpoint after this iteration", self.signal_name)

    def end_early(self, reason: str) -> None:
        """Ask for a checkpoint after the next iteration and the end of the run, which raises ``EndedEarly``."""
        self.early_end = reason
        log.info("ending the run early, after a checkpoint: %s", reason)

    def requested(self, accelerator) -> bool:
        """True on every process as soon as any process was signalled or asked to end early (one tiny
        collective with several)."""
        flags = (self.signal_name is not None, self.early_end is not None)
        if accelerator.num_processes == 1:
            return any(flags)
        flag_t = torch.tensor([float(f) for f in flags], device=accelerator.device)
        signalled, ended = (accelerator.reduce(flag_t, reduction="sum") > 0).tolist()
        if signalled and self.signal_name is None:
            self.signal_name = "a signal on another process"
        if ended and self.early_end is None:
            self.early_end = "asked on another process"
        return signalled or ended


@contextmanager
def peers_lost(latest_checkpoint, timeout_s: int):
    """A collective that fails or times out (another process died or hangs) becomes one clear error.

    ``latest_checkpoint`` is called only then, to name where the same command will resume from.
    """
    try:
        yield
    except RuntimeError as exc:  # gloo reports timeouts and closed peers as plain RuntimeErrors
        text = str(exc)
        if not (isinstance(exc, torch.distributed.DistError) or any(
                marker in text for marker in ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset"))):
            raise
        raise TrainingError(f"lost contact with another training process (no answer within train.collective_timeout_s="
                            f"{timeout_s} s, or it died: {first_line(exc, 160)}); "
                            f"run the same command again to resume from {latest_checkpoint()}") from exc


def write_failure(exc: Exception, folder: Path) -> str:
    """Why a write into ``folder`` failed, in words (a full disk is often reported as a bare RuntimeError)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device"
    except OSError:
        pass
    return first_line(exc) or type(exc).__name__


def crash_point(where: str, step: int) -> None:
    """Fault injection for the crash tests: MEDNIST_GAN_CRASH_AT=save:<step> kills the process there."""
    if os.environ.get("MEDNIST_GAN_CRASH_AT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
