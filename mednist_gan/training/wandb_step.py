"""W&B's own step axis, which only grows across restarts of one run folder.

W&B drops a step lower than one it has, and a resumed run logs the steps after its checkpoint again. So W&B
gets the training step plus an offset that continues above the highest step any earlier run of this run folder
may have sent (its high-water mark, recorded in ``wandb_step.txt`` before W&B can have it), and everything is
plotted against the training step, logged as the x-axis metric ``train/step``.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..errors import first_line
from ..files import WANDB_STEP_FILE, write_atomic
from .records import RunRecords


class WandbStepAxis:
    """W&B step = training step + ``offset``, never below ``high``, the highest W&B step this W&B run may have."""

    def __init__(self, records: RunRecords, logger: logging.Logger):
        self.records, self.log = records, logger
        self.offset = 0
        self.high = 0
        self.run_id: Optional[str] = None

    def start(self, run, run_id: str, resumed_step: Optional[int], local_high: int) -> None:
        """``run``: the started W&B run; ``resumed_step``: the step this run resumed from (None: unknown, taken as
        0); ``local_high``: the highest step of the run folder's own records."""
        high = max(self._high_mark(run_id, local_high), int(getattr(run, "step", 0) or 0))
        self.run_id, self.high = run_id, high
        self.offset = high - (resumed_step if resumed_step is not None else 0)
        run.define_metric("train/step")
        run.define_metric("*", step_metric="train/step")
        if high:
            self.log.info("W&B steps continue above %d (training step + %d); x-axis: train/step", high, self.offset)

    def _high_mark(self, run_id: str, local_high: int) -> int:
        path = self.records.run_dir / WANDB_STEP_FILE
        if not path.exists():  # a run directory from before the high-water mark: W&B step = training step
            return local_high
        try:
            recorded_id, high = path.read_text().split()
            if int(high) < 0:
                raise ValueError(f"negative step {high}")
            return int(high) if recorded_id == run_id else 0  # another id: this is a new W&B run
        except (OSError, ValueError) as exc:
            self.log.warning("%s is unreadable (%s: %s): W&B steps continue above step %d of the run directory's "
                             "records", path, type(exc).__name__, first_line(exc, 80), local_high)
            return local_high

    def log_values(self, values: dict, step: int) -> tuple[dict, int]:
        """The values (with ``train/step``) and the W&B step to log them at, for training step ``step``."""
        wandb_step = step + self.offset
        if wandb_step > self.high:  # recorded before W&B can have it: an upper bound after any kill
            self.high = wandb_step
            self.records.write(lambda: write_atomic(self.records.run_dir / WANDB_STEP_FILE,
                                                    f"{self.run_id} {wandb_step}\n"), WANDB_STEP_FILE)
        return {**values, "train/step": step}, wandb_step
