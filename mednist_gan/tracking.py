"""The run directory (resolved config, git revision, plain-text log) and console logging of the main process."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .config import Config

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


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
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    revision = git_revision()
    (run_dir / "git_revision.txt").write_text((revision or "unknown (not a git checkout)") + "\n")
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
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(file_handler)
    return logger
