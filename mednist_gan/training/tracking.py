"""Experiment tracking on the main process through Accelerate's trackers (W&B offline-first with an online
fallback, TensorBoard, MLflow, ...): metrics, sample grids, the config and the exported generator, guarded so that
a tracker never stops training. The run folder's own records are ``records``; W&B's step axis is ``wandb_step``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

from ..config import Config
from ..errors import ConfigError, first_line
from ..files import PROVENANCE_FILE, TRACKER_DIR, WANDB_RUN_ID_FILE, write_atomic
from .records import RunRecords
from .wandb_step import WandbStepAxis

_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


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

    Goes through Accelerate's trackers (any of ``TRACKERS``, created by the main process only) and also
    writes the run folder's own records (``records.RunRecords``) for people who use none. A configured tracker
    that is not installed is a ConfigError before training starts (``check_tracker_installed``); one that fails
    to start or to log is reported once and switched off: tracking never stops training.

    A resumed run logs the steps after its checkpoint again: ``metrics.jsonl`` keeps one line per step (the
    re-run's), and W&B, whose steps must increase, gets a step axis that only grows across restarts
    (``wandb_step.WandbStepAxis``).
    """

    def __init__(self, cfg: Config, accelerator, run_dir: Path, logger: logging.Logger):
        self.cfg, self.acc, self.run_dir, self.log = cfg, accelerator, run_dir, logger
        self.is_main = accelerator.is_main_process
        self.started = False  # start() ran: the run got past its resume checks and writes its records
        self.active = False
        self.offline_wandb: Optional[Path] = None  # the W&B folder of a run kept offline, to say how to sync it
        self.records = RunRecords(run_dir, logger)
        self.wandb_steps = WandbStepAxis(self.records, logger)

    # -- start

    def start(self, resumed_step: Optional[int] = None) -> None:
        """``resumed_step``: the step of the checkpoint this run resumed from, 0 for a fresh run: the records of
        later steps, which this run logs again, are dropped. None (unknown) keeps every record."""
        self.started = True
        local_high = self.records.high_step() if self.is_main else 0
        if self.is_main and resumed_step is not None:
            self.records.forget_metrics_after(resumed_step)
        kind = self.cfg.log.tracker
        if kind == "none":
            return
        if kind == "wandb":
            self._start_wandb(resumed_step, local_high)
        else:
            self._try_start({kind: self._init_kwargs(kind)}, kind)

    def _init_kwargs(self, kind: str) -> dict:
        """Where each tracker writes by default: under ``tracker_dir`` (Aim and TensorBoard get it from Accelerate)."""
        log_cfg, where = self.cfg.log, tracker_dir(self.cfg)
        if kind == "mlflow":
            if self.is_main and not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri(f"sqlite:///{(where / 'mlflow.db').resolve()}")
            return {"run_name": log_cfg.run_name or self.cfg.name, "logging_dir": str((where / "mlflow").resolve())}
        if kind == "dvclive":
            return {"dir": str(where / "dvclive")}
        return {}

    def _flat_config(self) -> dict:
        """The config as trackers take it: one level, lists as text, a mapping as one key per entry
        (``data.class_weights.Hand``)."""
        flat = {}
        for key, value in self.cfg.flat().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{name}": entry for name, entry in value.items()})
            else:
                flat[key] = str(value) if isinstance(value, list) else value
        return flat

    def _start_wandb(self, resumed_step: Optional[int], local_high: int) -> None:
        log_cfg = self.cfg.log
        mode = os.environ.get("WANDB_MODE") or log_cfg.mode
        wandb_dir = Path(os.environ.get("WANDB_DIR") or tracker_dir(self.cfg))
        run_id = self._wandb_run_id(wandb_dir)
        kwargs = {
            "entity": os.environ.get("WANDB_ENTITY") or log_cfg.entity,
            "name": log_cfg.run_name or self.cfg.name,
            "group": log_cfg.group,
            "tags": list(log_cfg.tags) or None,
            "dir": str(wandb_dir),
            "id": run_id,
            "resume": "allow",
        }
        settings = _wandb_settings(log_cfg.online_timeout)
        if self._try_start({"wandb": dict(kwargs, mode=mode, settings=settings)}, "W&B", quiet=mode == "online"):
            self.log.info("W&B run %s (%s) in %s", run_id, mode, wandb_dir)
            self.offline_wandb = wandb_dir if mode == "offline" else None
        elif mode == "online":
            self.log.warning("W&B could not start online within %ds (no network or no login): falling back to "
                             "offline; upload later with `wandb sync %s/wandb/offline-run-*`",
                             log_cfg.online_timeout, wandb_dir)
            if self._try_start({"wandb": dict(kwargs, mode="offline", settings=_wandb_settings())}, "W&B"):
                self.log.info("W&B run %s (offline) in %s", run_id, wandb_dir)
                self.offline_wandb = wandb_dir
        if self.active and self.is_main:
            self._guard(lambda: self.wandb_steps.start(self.acc.get_tracker("wandb", unwrap=True), run_id, resumed_step,
                                                       local_high), "set up its step axis")

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
        self.records.append_metrics(metrics, step)
        if self.active:
            self._guard(lambda: self.acc.log(*self._tracker_step(metrics, step)), "log metrics")

    def _tracker_step(self, values: dict, step: int) -> tuple[dict, int]:
        """The values and step for the tracker: W&B gets its own increasing step and ``train/step``."""
        if self.cfg.log.tracker != "wandb":
            return values, step
        return self.wandb_steps.log_values(values, step)

    def log_samples(self, pictures, step: int, columns: Optional[int] = None,
                    labels: Optional[list[str]] = None) -> Path:
        """Main process: a grid of upright uint8 pictures (``columns`` a row, e.g. one row per class named by
        ``labels``), as PNG in samples/ and to the tracker."""
        from ..images import image_grid

        grid = image_grid(pictures, columns, labels=labels)
        path = self.records.save_grid(grid, step)
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

    def _guard(self, fn, what: str) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            self.log.warning("tracker failed to %s (%s: %s); tracking switched off, training goes on", what,
                             type(exc).__name__, first_line(exc))
            self.active = False
            self._end_quietly()

    def _end_quietly(self) -> None:
        """End the trackers of a run whose tracking failed, so that a later run in this process starts its own
        (an unfinished W&B run would be taken up by the next one)."""
        try:
            self.acc.end_training()
        except Exception:  # noqa: BLE001 - the backend that failed may fail again
            if self.cfg.log.tracker == "wandb":
                _wandb_teardown()

    # -- end

    def finish(self) -> None:
        if self.active:
            self._guard(self.acc.end_training, "finish")
            self.active = False
            if self.is_main and self.offline_wandb is not None:
                runs = sorted((self.offline_wandb / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
                if runs:
                    self.log.info("W&B run saved offline; upload it with: wandb sync %s", runs[-1])
        if self.is_main and self.started:
            self.records.plot_loss_curves()


def _image_value(kind: str, grid):
    """One (H, W) uint8 grid in the form each tracker's ``log_images`` takes."""
    if kind == "tensorboard":
        return grid[None, None]  # SummaryWriter.add_images: N, C, H, W
    if kind in ("aim", "clearml"):
        return grid  # one image per key
    return [grid]  # a list of images per key (W&B, SwanLab)


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
