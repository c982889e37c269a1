"""The run folder's own records of training, for people who use no tracker: ``metrics.jsonl`` (one line per logged
step; a resumed run's re-logged steps replace the earlier run's), the sample grids in ``samples/step_*.png`` and
``loss_curves.png`` at the end.

A record that cannot be written (a full disk, ...) is a warning, once per file, and training goes on:
checkpoints, which do stop the run when they cannot be written, are what a resume needs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Optional

from ..errors import first_line
from ..files import LOSS_CURVES_FILE, METRICS_FILE, SAMPLES_DIR, write_atomic


class RunRecords:
    """The main process's writer of the records in ``run_dir``."""

    def __init__(self, run_dir: Path, logger: logging.Logger):
        self.run_dir, self.log = run_dir, logger
        self._warned: set[str] = set()

    def write(self, write: Callable[[], None], what: str) -> None:
        """Run ``write``, which writes the record ``what``: a failed write is a warning, once per record."""
        try:
            write()
        except OSError as exc:
            if what not in self._warned:
                self._warned.add(what)
                self.log.warning("could not write %s in %s (%s); training goes on", what, self.run_dir,
                                 exc.strerror or first_line(exc))

    def high_step(self) -> int:
        """The highest step of metrics.jsonl and samples/: what an earlier run sent to its tracker, at most."""
        high = 0
        try:
            for row in read_metrics(self.run_dir / METRICS_FILE):
                high = max(high, row["step"])
            for png in (self.run_dir / SAMPLES_DIR).glob("step_*.png"):
                if png.stem[5:].isdigit():
                    high = max(high, int(png.stem[5:]))
        except OSError:
            pass
        return high

    def forget_metrics_after(self, step: int) -> None:
        """Drop the lines of steps after ``step``, which this run logs again."""
        def forget() -> None:
            dropped = keep_metrics_up_to(self.run_dir / METRICS_FILE, step)
            if dropped:
                self.log.info("metrics.jsonl: dropped %d line(s) after step %d (or cut short), which this run logs "
                              "again", dropped, step)

        self.write(forget, "metrics.jsonl")

    def append_metrics(self, metrics: dict[str, float], step: int) -> None:
        def append() -> None:
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

        self.write(append, "metrics.jsonl")

    def save_grid(self, grid, step: int) -> Path:
        """A sample grid (an (H, W) uint8 array) as ``samples/step_<step>.png``; its path, written or not."""
        from ..images import save_png

        path = self.run_dir / SAMPLES_DIR / f"step_{step:06d}.png"

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(grid, path)

        self.write(write, "samples/")
        return path

    def plot_loss_curves(self) -> None:
        self.write(lambda: plot_loss_curves(self.run_dir / METRICS_FILE, self.run_dir / LOSS_CURVES_FILE),
                   "loss_curves.png")


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl (a line cut short by a killed process is left out)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def keep_metrics_up_to(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl atomically with only its complete lines of steps <= ``step`` (a resumed run logs
    the later ones again); returns the number of lines dropped."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.decode(errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines) or (data and not data.endswith(b"\n")):
        write_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def plot_loss_curves(metrics_file: Path, out: Path) -> Optional[Path]:
    """The losses and D outputs over steps, and the in-training distances (FMD, FD-SSL) when evaluation ran, as a
    PNG for people who use no tracker. A step logged twice (a resumed run) is plotted with its last values."""
    train, distances = {}, {"eval/fmd": {}, "eval/fd_ssl": {}}
    for row in read_metrics(metrics_file):  # a line cut short by a killed process is left out
        if "loss_d" in row:
            train[row["step"]] = row
        for key, seen in distances.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                seen[row["step"]] = value
    evaluated = any(distances.values())
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(train)
    rows = [train[s] for s in steps]
    fig, axes = plt.subplots(1, 3 if evaluated else 2, figsize=(15 if evaluated else 10, 3.5))
    ax_loss, ax_d = axes[:2]
    for key in ("loss_d", "loss_g"):
        ax_loss.plot(steps, [r.get(key) for r in rows], label=key)
    for key in ("d_real", "d_fake"):
        ax_d.plot(steps, [r.get(key) for r in rows], label=key)
    ax_loss.set(xlabel="iteration", title="losses")
    ax_d.set(xlabel="iteration", title="mean D output", ylim=(0, 1))
    for key, seen in distances.items():
        if seen:
            eval_steps = sorted(seen)
            axes[2].plot(eval_steps, [seen[s] for s in eval_steps], "o-", label=key)
            axes[2].set(xlabel="iteration", title="in-training evaluation (lower is better)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
