"""The run directory (resolved config, git revision, plain-text log) and console logging of the main process."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .config import Config
from .errors import first_line, output_error

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def git_revision(cwd: Optional[Path] = None) -> Optional[str]:
    """The checkout's commit (with ``-dirty`` when modified), or None outside a git checkout."""
    here = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(run_dir: Path, cfg: Config) -> Optional[str]:
    """Main process: the resolved config and git revision, written before training starts."""
    from .checkpoint import write_text_atomic

    revision = git_revision()
    try:
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        write_text_atomic(run_dir / "git_revision.txt", (revision or "unknown (not a git checkout)") + "\n")
    except OSError as exc:
        raise output_error("run_dir", run_dir, exc) from None
    return revision


def setup_logging(run_dir: Optional[Path], is_main: bool) -> logging.Logger:
    """Log lines go to the console and ``<run_dir>/train.log`` on the main process; others stay quiet."""
    logger = logging.getLogger("mednist_gan")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    logger.addHandler(console)
    if is_main and run_dir is not None:
        from .checkpoint import ensure_writable_folder

        ensure_writable_folder(run_dir, "run_dir")
        try:
            file_handler = logging.FileHandler(run_dir / "train.log")
        except OSError as exc:
            raise output_error("run_dir", run_dir, exc) from None
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(file_handler)
    return logger


# ----------------------------------------------------------------------------- experiment tracking

def tracker_dir(cfg: Config) -> Path:
    """Where W&B and TensorBoard write: ``log.dir``, or ``<run_dir>/tracker``."""
    return Path(cfg.log.dir) if cfg.log.dir else cfg.run_path / "tracker"


class Tracking:
    """Experiment tracking on the main process: metrics, sample grids, config, artifacts.

    Goes through Accelerate's trackers (W&B or TensorBoard, created by the main process only) and
    also writes ``metrics.jsonl``, ``samples/step_*.png`` and a final ``loss_curves.png`` into the run
    directory for people who use neither. A tracker that fails to start or to log is reported once and
    switched off: tracking never stops training.
    """

    def __init__(self, cfg: Config, accelerator, run_dir: Path, logger: logging.Logger):
        self.cfg, self.acc, self.run_dir, self.log = cfg, accelerator, run_dir, logger
        self.is_main = accelerator.is_main_process
        self.active = False
        self._warned: set[str] = set()

    # -- start

    def start(self) -> None:
        kind = self.cfg.log.tracker
        if kind == "none":
            return
        if kind == "wandb":
            self._start_wandb()
        else:
            self._try_start({"tensorboard": {}}, "TensorBoard")

    def _flat_config(self) -> dict:
        flat = {}

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[f"{prefix}{key}"] = value if not isinstance(value, list) else str(value)

        walk(self.cfg.to_dict(), "")
        return flat

    def _start_wandb(self) -> None:
        lc = self.cfg.log
        mode = os.environ.get("WANDB_MODE") or lc.mode
        wandb_dir = Path(os.environ.get("WANDB_DIR") or tracker_dir(self.cfg))
        run_id = self._wandb_run_id(wandb_dir)
        kwargs = {
            "entity": os.environ.get("WANDB_ENTITY") or lc.entity,
            "name": lc.run_name or self.cfg.name,
            "group": lc.group,
            "tags": list(lc.tags) or None,
            "dir": str(wandb_dir),
            "id": run_id,
            "resume": "allow",
        }
        if self._try_start({"wandb": dict(kwargs, mode=mode, settings=_wandb_settings(lc.online_timeout))}, "W&B",
                           quiet=mode == "online"):
            self.log.info("W&B run %s (%s) in %s", run_id, mode, wandb_dir)
            return
        if mode == "online":
            self.log.warning("W&B could not start online within %ds (no network or no login): falling back to "
                             "offline; upload later with `wandb sync %s/wandb/offline-run-*`",
                             lc.online_timeout, wandb_dir)
            if self._try_start({"wandb": dict(kwargs, mode="offline")}, "W&B"):
                self.log.info("W&B run %s (offline) in %s", run_id, wandb_dir)

    def _wandb_run_id(self, wandb_dir: Path) -> Optional[str]:
        """One W&B run id per run directory, so a resumed run continues the same W&B run."""
        id_file = self.run_dir / "wandb_run_id.txt"
        if not self.is_main:
            return None
        if id_file.exists():
            try:
                run_id = id_file.read_text().strip()
                if _WANDB_ID.fullmatch(run_id):
                    return run_id
                reason = f"not a W&B run id: {run_id[:40]!r}"
            except (OSError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {first_line(exc, 80)}"
            self.log.warning("%s is unreadable (%s): this run logs to a new W&B run", id_file, reason)
        import secrets

        from .checkpoint import write_text_atomic

        run_id = secrets.token_hex(4)
        write_text_atomic(id_file, run_id + "\n")
        wandb_dir.mkdir(parents=True, exist_ok=True)
        return run_id

    def _try_start(self, init_kwargs: dict, label: str, quiet: bool = False) -> bool:
        if self.is_main:
            tracker_dir(self.cfg).mkdir(parents=True, exist_ok=True)
        project = os.environ.get("WANDB_PROJECT") if "wandb" in init_kwargs else None
        try:  # Accelerate creates the tracker on the main process only; every process makes this call
            self.acc.init_trackers(project or self.cfg.log.project, config=self._flat_config(),
                                   init_kwargs=init_kwargs)
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            self.acc.trackers.clear()
            if "wandb" in init_kwargs:
                _wandb_teardown()
            if not quiet:
                self.log.warning("%s tracking disabled: it failed to start (%s: %s)", label, type(exc).__name__,
                                 first_line(exc))
            return False
        self.active = True
        return True

    # -- during training

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        def append() -> None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

        self._local(append, "metrics.jsonl")
        if self.active:
            self._guard(lambda: self.acc.log(metrics, step=step), "log metrics")

    def log_samples(self, pictures, step: int) -> Path:
        """Main process: a grid of upright uint8 pictures, as PNG in samples/ and to the tracker."""
        from .images import image_grid, save_png

        grid = image_grid(pictures)
        path = self.run_dir / "samples" / f"step_{step:06d}.png"

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(grid, path)

        self._local(write, "samples/")
        if self.active:
            self._guard(lambda: self._tracker_image(grid, step), "log sample grid")
        return path

    def _tracker_image(self, grid, step: int) -> None:
        if self.cfg.log.tracker == "wandb":
            import wandb

            self.acc.get_tracker("wandb", unwrap=True).log({"samples": wandb.Image(grid, caption=f"step {step}")},
                                                           step=step)
        else:
            self.acc.get_tracker("tensorboard", unwrap=True).add_image("samples", grid[None], step, dataformats="CHW")

    def log_artifact(self, export_dir: Path) -> None:
        if not (self.is_main and self.active and self.cfg.log.tracker == "wandb" and self.cfg.log.artifact):
            return

        def upload() -> None:
            import wandb

            artifact = wandb.Artifact(f"{self.cfg.name}-generator", type="model",
                                      metadata=json.loads((export_dir / "export.json").read_text()))
            for name in ("model.pt", "mednist_gan.ts", "export.json"):
                artifact.add_file(str(export_dir / name))
            self.acc.get_tracker("wandb", unwrap=True).log_artifact(artifact)

        self._guard(upload, "upload the exported generator")

    def _local(self, fn, what: str) -> None:
        """A file of the run directory's own records: a failed write (full disk, ...) is a warning, once per
        file; checkpoints, which do stop the run when they cannot be written, are what a resume needs."""
        try:
            fn()
        except OSError as exc:
            if what not in self._warned:
                self._warned.add(what)
                self.log.warning("could not write %s in %s (%s); training goes on", what, self.run_dir,
                                 exc.strerror or first_line(exc))

    def _guard(self, fn, what: str) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            self.log.warning("tracker failed to %s (%s: %s); tracking switched off, training goes on", what,
                             type(exc).__name__, first_line(exc))
            self.active = False

    # -- end

    def finish(self) -> None:
        if self.active:
            self._guard(self.acc.end_training, "finish")
            self.active = False
        if self.is_main:
            self._local(lambda: plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curves.png"),
                        "loss_curves.png")


def _wandb_teardown() -> None:
    """Release a W&B run that failed half-way, so that its id can be used again (e.g. offline)."""
    try:
        import wandb

        wandb.teardown()
    except Exception:  # noqa: BLE001
        pass


def _wandb_settings(timeout: int):
    import wandb

    return wandb.Settings(init_timeout=timeout, silent=True)


def plot_loss_curves(metrics_file: Path, out: Path) -> Optional[Path]:
    """The losses and D outputs over steps, as a PNG for people who do not use W&B."""
    if not metrics_file.is_file():
        return None
    rows = []
    for line in metrics_file.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if isinstance(row, dict) and "loss_d" in row and "step" in row:
            rows.append(row)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss_d", "loss_g"):
        ax_loss.plot(steps, [r.get(key) for r in rows], label=key)
    for key in ("d_real", "d_fake"):
        ax_d.plot(steps, [r.get(key) for r in rows], label=key)
    ax_loss.set(xlabel="iteration", title="losses")
    ax_d.set(xlabel="iteration", title="mean D output", ylim=(0, 1))
    for ax in (ax_loss, ax_d):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
