"""What a user sees: progress bars on a terminal and only there; no warnings from the README's first command."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from helpers import REPO, run_cli

SHIPPED_TS = REPO / "mednist_gan" / "assets" / "generator" / "mednist_gan.ts"
SAMPLE_HAND = REPO / "mednist_gan" / "sample_data" / "Hand"
BAR = re.compile(r"\d+%\|")  # tqdm's "  40%|####      | 2/5"
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")  # the console's log line


def run_on_a_terminal(*args: str, timeout: int = 600, stdout_too: bool = False) -> tuple[int, str, str]:
    """``python -m mednist_gan ...`` with its stderr (and with ``stdout_too`` its stdout) on a pseudo-terminal, as
    in an interactive shell; returns the exit code, stdout (when piped) and what the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0 x 0
    proc = subprocess.Popen([sys.executable, "-m", "mednist_gan", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=slave if stdout_too else subprocess.PIPE, stderr=slave)
    os.close(slave)
    received = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    stdout = "" if stdout_too else proc.stdout.read().decode()
    return proc.wait(timeout=timeout), stdout, received.decode(errors="replace")


@pytest.mark.parametrize("command", ["generate", "evaluate", "train-classifier"])
def test_progress_bars_on_a_terminal_only(command, tmp_path, mednist_root):
    args = {
        "generate": ["generate", "--model", str(SHIPPED_TS), "--num-samples", "6", "--batch-size", "2",
                     "--output-dir", str(tmp_path / "out")],
        "evaluate": ["evaluate", "--model", str(SHIPPED_TS), "--num-samples", "20", "--out", str(tmp_path / "e.json")],
        "train-classifier": ["train-classifier", "--data-root", str(mednist_root), "--limit-per-class", "12",
                             "--epochs", "1", "--out", str(tmp_path / "c.pt")],
    }[command]
    rc, _, terminal = run_on_a_terminal(*args)
    assert rc == 0, terminal[-3000:]
    assert BAR.search(terminal), terminal[-3000:]
    desc = {"generate": "generate", "evaluate": "evaluate", "train-classifier": "epoch 1/1"}[command]
    assert desc in terminal
    # In a pipe or a log file (what tests and jobs see): no bar, nothing on stderr at all.
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    assert not BAR.search(result.stdout)


def test_log_lines_never_share_a_line_with_the_training_bar(tmp_path, mednist_root):
    """Training on a terminal: the bar (stderr) and the log lines (stdout) share it, each log line on its own line
    (a log line used to land on the bar: ``debug:  50%|#####     | 2/4 [00:01<00:01]12:00:01 INFO step 2 ...``)."""
    rc, _, terminal = run_on_a_terminal("train", "--config", "configs/debug.yaml", f"run_dir={tmp_path / 'run'}",
                                        f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                        "train.max_steps=6", "train.epochs=3", "export.at_end=false",
                                        stdout_too=True)
    assert rc == 0, terminal[-3000:]
    assert BAR.search(terminal), terminal[-3000:]
    log_lines = [line for line in terminal.split("\n") if LOG_LINE.search(line)]
    assert len(log_lines) >= 6, terminal[-3000:]  # the opening lines and a line per step
    for line in log_lines:
        shown = line.rstrip("\r").rsplit("\r", 1)[-1]  # what stays on the line after the last carriage return
        assert LOG_LINE.match(shown.lstrip("\x1b[A").strip()) and not BAR.search(shown), repr(line)


def _readme_first_command() -> str:
    command = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)[0].strip()
    steps = [step.strip() for step in command.split("&&")]
    return " && ".join(step for step in steps if not step.startswith("pip "))  # installing is done already


def test_readme_first_command_prints_no_warning(tmp_path):
    """The README's first command as a new user runs it (after installing), in a copy of the run directory:
    it succeeds and nothing it prints is a warning (evaluate printed SciPy's LinAlgWarning on the sample)."""
    run_dir = tmp_path / "runs" / "debug"
    command = _readme_first_command()
    assert command.startswith("mednist-gan train --config configs/debug.yaml")
    command = command.replace("runs/debug", str(run_dir)).replace(
        "mednist-gan train --config configs/debug.yaml",
        f"mednist-gan train --config configs/debug.yaml run_dir={run_dir}", 1)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert (run_dir / "evaluation.json").is_file() and (run_dir / "generated" / "grid.png").is_file()
    warnings = [line for line in output.splitlines() if re.search(r"warn", line, re.I)]
    assert not warnings, "\n".join(warnings)
