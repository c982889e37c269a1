"""The run directory (its lock, resolved config, git revision, plain-text log) and console logging of the main process."""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..config import Config
from ..errors import ConfigError, OutputError, first_line, output_error
from ..files import (CONFIG_FILE, GIT_REVISION_FILE, LOCK_FILE, LOG_FILE, LOSS_CURVES_FILE, METRICS_FILE,
                    PROVENANCE_FILE, SAMPLES_DIR, TRACKER_DIR, WANDB_RUN_ID_FILE, WANDB_STEP_FILE, write_atomic)

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
    revision = git_revision()
    try:
        write_atomic(run_dir / CONFIG_FILE, cfg.to_yaml())
        write_atomic(run_dir / GIT_REVISION_FILE, (revision or "unknown (not a git checkout)") + "\n")
    except OSError as exc:
        raise output_error("run_dir", run_dir, exc) from None
    return revision


_locked: dict[Path, int] = {}  # run directories this process trains in: the descriptor holding each lock


def lock_run_dir(run_dir: Path) -> None:
    """Main process, before it writes anything there: hold ``<run_dir>/.lock`` for as long as it trains in
    ``run_dir`` (``unlock_run_dir``, or the end of the process: the kernel releases the lock of a killed
    process, so a lock file left behind never blocks). Another process that holds it: one line, exit 2."""
    key = Path(run_dir).resolve()
    if key in _locked:  # this process already trains here (a Trainer made again on the same run_dir)
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error("run_dir", run_dir, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, host, *_ = os.read(fd, 256).decode(errors="replace").split() + ["?", "?"]
        os.close(fd)
        raise OutputError(f"run_dir {run_dir} is in use by another training process (pid {pid} on host {host}); "
                          "wait for it to finish, or choose another run_dir") from None
    except OSError as exc:  # a file system without flock (e.g. Lustre mounted without it): train unguarded
        logging.getLogger("mednist_gan").warning(
            "run_dir %s cannot be locked (%s): make sure no other training process uses it", run_dir,
            exc.strerror or first_line(exc))
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError as exc:
        os.close(fd)
        raise output_error("run_dir", run_dir, exc) from None
    _locked[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Let other processes train in ``run_dir`` again (the lock file stays: the lock is on it, not its existence)."""
    fd = _locked.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def setup_logging(run_dir: Optional[Path], is_main: bool) -> logging.Logger:
    """Log lines go to the console, and on the main process to ``<run_dir>/train.log`` from ``open_log_file``
    on (the lines before it are kept until then); the other processes log warnings only."""
    logger = logging.getLogger("mednist_gan")
    for handler in list(logger.handlers):  # an earlier run in this process: close its train.log
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    logger.addHandler(console)
    if is_main and run_dir is not None:  # flushLevel above every level: held until open_log_file
        logger.addHandler(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))
    return logger


def open_log_file(logger: logging.Logger, run_dir: Path) -> None:
    """Main process, once the run may write to ``run_dir``: append the lines so far, and those to come, to train.log."""
    try:
        file_handler = logging.FileHandler(run_dir / LOG_FILE, errors="backslashreplace")  # non-UTF-8 file names
    except OSError as exc:
        raise output_error("run_dir", run_dir, exc) from None
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(file_handler)
        held.close()  # writes its lines to train.log
        logger.removeHandler(held)
    logger.addHandler(file_handler)


def close_log_file(logger: logging.Logger) -> None:
    """At the end of a run: later lines of this process (an export, another run) do not go to its train.log."""
    for handler in [h for h in logger.handlers if isinstance(h, (logging.FileHandler, logging.handlers.MemoryHandler))]:
        logger.removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------- experiment tracking

def tracker_dir(cfg: Config) -> Path:
    """Where W&B and TensorBoard write: ``log.dir``, or ``<run_dir>/tracker``."""
    return Path(cfg.log.dir) if cfg.log.dir else cfg.run_path / TRACKER_DIR


# Accelerate's trackers (accelerate.utils.LoggerType less "all"): the modules each one imports (any one of
# a tuple's alternatives will do) and the pip command that installs them.
TRACKERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "wandb": (("wandb",),),
    "tensorboard": (("torch.utils.tensorboard", "tensorboardX"),),
    "mlflow": (("mlflow",),),
    "aim": (("aim",),),
    "comet_ml": (("comet_ml",),),
    "clearml": (("clearml",),),
    "dvclive": (("dvclive",),),
    "swanlab": (("swanlab",),),
    "trackio": (("trackio",),),
}
# The local MLflow store (used unless MLFLOW_TRACKING_URI says otherwise) is a SQLite database.
_MLFLOW_LOCAL_STORE = (("sqlalchemy",), ("alembic",))


def tracker_install_hint(kind: str) -> str:
    return "pip install wandb" if kind == "wandb" else f'pip install "mednist-gan[{kind}]"'


def check_tracker_installed(kind: str) -> None:
    """A one-line ConfigError when ``log.tracker`` names a tracker whose package cannot be imported, or that
    Accelerate would leave out (it drops an unavailable tracker silently): call before training starts."""
    if kind == "none":
        return
    needs = TRACKERS[kind]
    if kind == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        needs = needs + _MLFLOW_LOCAL_STORE
    import importlib

    for alternatives in needs:
        failure = None
        for module in alternatives:
            try:
                importlib.import_module(module)
                failure = None
                break
            except Exception as exc:  # noqa: BLE001 - ImportError, or a package broken on import
                failure = failure or f"{type(exc).__name__}: {first_line(exc, 100)}"
        if failure is not None:
            raise ConfigError(f"log.tracker={kind}: {' or '.join(alternatives)} cannot be imported ({failure}); "
                              f"install it with `{tracker_install_hint(kind)}`, or set log.tracker=none")
    import accelerate.utils

    if not getattr(accelerate.utils, f"is_{kind}_available")():
        raise ConfigError(f"log.tracker={kind}: Accelerate does not find a version of {kind} it supports; "
                          f"reinstall it with `{tracker_install_hint(kind)}`, or set log.tracker=none")


class Tracking:
    """Experiment tracking on the main process: metrics, sample grids, config, artifacts.

    Goes through Accelerate's trackers (any of ``TRACKERS``, created by the main process only) and
    also writes ``metrics.jsonl``, ``samples/step_*.png`` and a final ``loss_curves.png`` into the run
    directory for people who use none. A configured tracker that is not installed is a ConfigError when
    ``runtime.make_accelerator`` makes the Accelerator; one that fails to start or to log is reported once and switched off: tracking
    never stops training.

    A resumed run logs the steps after its checkpoint again: ``metrics.jsonl`` keeps one line per step
    (the re-run's), and W&B, whose steps must increase, gets its own step counter that only grows across
    restarts (its high-water mark in ``wandb_step.txt``), with the training step as the x-axis metric
    ``train/step``.
    """

    def __init__(self, cfg: Config, accelerator, run_dir: Path, logger: logging.Logger):
        self.cfg, self.acc, self.run_dir, self.log = cfg, accelerator, run_dir, logger
        self.is_main = accelerator.is_main_process
        self.started = False  # start() ran: the run got past its resume checks and writes its records
        self.active = False
        self._warned: set[str] = set()
        self._wandb_offset = 0  # W&B step = training step + offset
        self._wandb_high = 0  # the highest W&B step this W&B run may have received
        self._wandb_id: Optional[str] = None

    # -- start

    def start(self, resumed_step: Optional[int] = None) -> None:
        """``resumed_step``: the step of the checkpoint this run resumed from, 0 for a fresh run: the records of
        later steps, which this run logs again, are dropped. None (unknown) keeps every record."""
        self.started = True
        local_high = self._local_high_step() if self.is_main else 0
        if self.is_main and resumed_step is not None:
            self._local(lambda: self._forget_metrics_after(resumed_step), "metrics.jsonl")
        kind = self.cfg.log.tracker
        if kind == "none":
            return
        if kind == "wandb":
            self._start_wandb(resumed_step, local_high)
        else:
            self._try_start({kind: self._init_kwargs(kind)}, kind)

    def _forget_metrics_after(self, step: int) -> None:
        dropped = keep_metrics_up_to(self.run_dir / METRICS_FILE, step)
        if dropped:
            self.log.info("metrics.jsonl: dropped %d line(s) after step %d (or cut short), which this run logs again",
                          dropped, step)

    def _local_high_step(self) -> int:
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

    def _init_kwargs(self, kind: str) -> dict:
        """Where each tracker writes by default: under ``tracker_dir`` (Aim and TensorBoard get it from Accelerate)."""
        lc, where = self.cfg.log, tracker_dir(self.cfg)
        if kind == "mlflow":
            if self.is_main and not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri(f"sqlite:///{(where / 'mlflow.db').resolve()}")
            return {"run_name": lc.run_name or self.cfg.name, "logging_dir": str((where / "mlflow").resolve())}
        if kind == "dvclive":
            return {"dir": str(where / "dvclive")}
        return {}

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

    def _start_wandb(self, resumed_step: Optional[int], local_high: int) -> None:
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
        elif mode == "online":
            self.log.warning("W&B could not start online within %ds (no network or no login): falling back to "
                             "offline; upload later with `wandb sync %s/wandb/offline-run-*`",
                             lc.online_timeout, wandb_dir)
            if self._try_start({"wandb": dict(kwargs, mode="offline", settings=_wandb_settings())}, "W&B"):
                self.log.info("W&B run %s (offline) in %s", run_id, wandb_dir)
        if self.active and self.is_main:
            self._guard(lambda: self._wandb_steps(run_id, resumed_step, local_high), "set up its step axis")

    def _wandb_steps(self, run_id: str, resumed_step: Optional[int], local_high: int) -> None:
        """W&B drops a step lower than one it has: continue above the highest step any earlier run of this
        run directory may have sent, and plot everything against the training step ``train/step``."""
        run = self.acc.get_tracker("wandb", unwrap=True)
        high = max(self._wandb_high_mark(run_id, local_high), int(getattr(run, "step", 0) or 0))
        self._wandb_id, self._wandb_high = run_id, high
        self._wandb_offset = high - (resumed_step if resumed_step is not None else 0)
        run.define_metric("train/step")
        run.define_metric("*", step_metric="train/step")
        if high:
            self.log.info("W&B steps continue above %d (training step + %d); x-axis: train/step", high,
                          self._wandb_offset)

    def _wandb_high_mark(self, run_id: str, local_high: int) -> int:
        path = self.run_dir / WANDB_STEP_FILE
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

    def _wandb_run_id(self, wandb_dir: Path) -> Optional[str]:
        """One W&B run id per run directory, so a resumed run continues the same W&B run."""
        id_file = self.run_dir / WANDB_RUN_ID_FILE
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

        run_id = secrets.token_hex(4)
        write_atomic(id_file, run_id + "\n")
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
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

        self._local(append, "metrics.jsonl")
        if self.active:
            self._guard(lambda: self.acc.log(*self._tracker_step(metrics, step)), "log metrics")

    def _tracker_step(self, values: dict, step: int) -> tuple[dict, int]:
        """The values and step for the tracker: W&B gets its own increasing step and ``train/step``."""
        if self.cfg.log.tracker != "wandb":
            return values, step
        wandb_step = step + self._wandb_offset
        if wandb_step > self._wandb_high:  # recorded before W&B can have it: an upper bound after any kill
            self._wandb_high = wandb_step
            self._local(lambda: write_atomic(self.run_dir / WANDB_STEP_FILE, f"{self._wandb_id} {wandb_step}\n"),
                        WANDB_STEP_FILE)
        return {**values, "train/step": step}, wandb_step

    def log_samples(self, pictures, step: int, columns: Optional[int] = None) -> Path:
        """Main process: a grid of upright uint8 pictures (``columns`` a row, e.g. one row per class), as PNG in
        samples/ and to the tracker."""
        from ..images import image_grid, save_png

        grid = image_grid(pictures, columns)
        path = self.run_dir / SAMPLES_DIR / f"step_{step:06d}.png"

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(grid, path)

        self._local(write, "samples/")
        if self.active:
            self._guard(lambda: self._tracker_image(grid, step), "log sample grid")
        return path

    def _tracker_image(self, grid, step: int) -> None:
        kind = self.cfg.log.tracker
        if kind == "wandb":
            import wandb

            values, wandb_step = self._tracker_step({"samples": wandb.Image(grid, caption=f"step {step}")}, step)
            self.acc.get_tracker("wandb", unwrap=True).log(values, step=wandb_step)
            return
        tracker = self.acc.get_tracker(kind)
        if hasattr(tracker, "log_images"):  # Accelerate's generic image logging; trackers without it get none
            tracker.log_images({"samples": _image_value(kind, grid)}, step=step)

    def log_artifact(self, export_dir: Path) -> None:
        if not (self.is_main and self.active and self.cfg.log.tracker == "wandb" and self.cfg.log.artifact):
            return

        def upload() -> None:
            import wandb

            artifact = wandb.Artifact(f"{self.cfg.name}-generator", type="model",
                                      metadata=json.loads((export_dir / PROVENANCE_FILE).read_text()))
            for name in ("model.pt", "mednist_gan.pt2", "mednist_gan.ts", PROVENANCE_FILE):
                if (export_dir / name).is_file():  # exports before 0.2 have no .pt2
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
        if self.is_main and self.started:
            self._local(lambda: plot_loss_curves(self.run_dir / METRICS_FILE, self.run_dir / LOSS_CURVES_FILE),
                        "loss_curves.png")


def _image_value(kind: str, grid):
    """One (H, W) uint8 grid in the form each tracker's ``log_images`` takes."""
    if kind == "tensorboard":
        return grid[None, None]  # SummaryWriter.add_images: N, C, H, W
    if kind in ("aim", "clearml"):
        return grid  # one image per key
    return [grid]  # a list of images per key (W&B, SwanLab)


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


def _wandb_teardown() -> None:
    """Release a W&B run that failed half-way, so that its id can be used again (e.g. offline)."""
    try:
        import wandb

        wandb.teardown()
    except Exception:  # noqa: BLE001
        pass


def _wandb_settings(timeout: Optional[int] = None):
    """Quiet, and the run file written every quarter second (W&B's default is 15 s): a killed process loses
    only what it logged in its last moments, which the resumed run logs again (its checkpoint is older)."""
    import wandb

    kwargs = {"silent": True} if timeout is None else {"init_timeout": timeout, "silent": True}
    try:
        return wandb.Settings(**kwargs, x_transaction_log_flush_interval=0.25)
    except Exception:  # noqa: BLE001 - a W&B version without the setting
        return wandb.Settings(**kwargs)


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
