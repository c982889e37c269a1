"""Elastic restarts through launch/run.sh (MAX_RESTARTS): two CPU processes over gloo, one of them killed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mednist_gan import checkpoint as ckpt

from helpers import REPO

# 4 iterations per epoch (64 images, batch 16): 16 iterations, a checkpoint every 2.
STEPS = ["train.epochs=4", "train.max_steps=16", "checkpoint.every_steps=2", "checkpoint.keep=10",
         "export.at_end=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """``launch/run.sh`` in its own session, its output collected by a thread: every wait is bounded."""

    def __init__(self, tmp_path: Path, mednist_root: Path, *extra: str, **knobs: str):
        self.run, self.log = tmp_path / "run", tmp_path / "launch.log"
        env = dict(os.environ, NPROC_PER_NODE="2", MAIN_PORT=str(_free_port()), OMP_NUM_THREADS="1", **knobs)
        cmd = ["launch/run.sh", f"run_dir={self.run}", f"data.root={mednist_root}",
               f"data.cache_dir={tmp_path / 'cache'}", *STEPS, *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 240, after: int = 0) -> int:
        """Wait for a line matching ``pattern`` (among lines ``after`` on); return the index after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(after, len(self.lines)):
                if re.search(pattern, self.lines[i]):
                    return i + 1
            if self.proc.poll() is not None and not self.reader.is_alive():
                pytest.fail(f"exited {self.proc.returncode} before {pattern!r}:\n{self.text[-4000:]}")
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.text[-4000:]}")

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s later:\n{self.text[-4000:]}")
        self.reader.join(timeout=10)
        return self.proc.returncode

    def workers(self) -> dict[int, int]:
        """{local rank: pid} of the trainer processes the launcher (this process, after exec) started."""
        found = {}
        try:
            tasks = list(Path(f"/proc/{self.proc.pid}/task").iterdir())
        except OSError:  # the launcher has exited
            return found
        for task in tasks:
            with contextlib.suppress(OSError):
                for pid in map(int, (task / "children").read_text().split()):
                    with contextlib.suppress(OSError):
                        env = dict(kv.split("=", 1) for kv in
                                   Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
                        if "LOCAL_RANK" in env:
                            found[int(env["LOCAL_RANK"])] = pid
        return found

    def left_behind(self) -> list[int]:
        """Live processes of this launch's session (the launcher's and the trainers', started or restarted)."""
        pids = []
        for status in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = status.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
                if int(fields[3]) == self.proc.pid and fields[0] != "Z":
                    pids.append(int(status.parent.name))
        return pids

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for pid in self.left_behind():  # never leak a trainer process, whatever the test found
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reader.join(timeout=10)
        self.log.write_text(self.text)  # for a look after a failure


@pytest.fixture()
def launches():
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.close()


def _two_workers(launch: Launch, timeout: float = 30) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while len(workers := launch.workers()) < 2:
        assert time.monotonic() < deadline, f"launcher {launch.proc.pid} has no 2 workers: {workers}"
        time.sleep(0.2)
    return workers


@pytest.mark.parametrize("rank", [0, 1], ids=["rank 0 (writes the checkpoints)", "rank 1"])
def test_a_killed_process_restarts_the_group_which_resumes_and_finishes(tmp_path, mednist_root, launches, rank):
    launch = Launch(tmp_path, mednist_root, MAX_RESTARTS="2")
    launches.append(launch)
    seen = launch.wait_for(r"checkpoint saved: .*step_000002")
    before = _two_workers(launch)
    os.kill(before[rank], signal.SIGKILL)
    start = time.monotonic()
    # The launcher stops the other process, forms the group again and starts two new processes.
    seen = launch.wait_for(r"resumed from .*step_0000\d\d", timeout=180, after=seen)
    assert time.monotonic() - start < 120
    resumed = int(re.search(r"resumed from \S*step_(\d+)", launch.lines[seen - 1]).group(1))
    assert 2 <= resumed < 16
    assert launch.finish(timeout=240) == 0, launch.text[-4000:]
    text = launch.text
    assert "elastic: up to 2 restart(s), c10d rendezvous at 127.0.0.1:" in text
    assert text.count("process group: world size 2") == 2 and text.count("resumed from") == 1
    assert "training finished at step 16" in text
    assert ckpt.find_latest(launch.run).name == "step_000016"
    ckpt.verify_safe(ckpt.find_latest(launch.run))
    assert not launch.left_behind()


def test_restarts_are_bounded_by_max_restarts(tmp_path, mednist_root, launches):
    launch = Launch(tmp_path, mednist_root, "train.max_steps=200", "train.epochs=50", MAX_RESTARTS="1")
    launches.append(launch)
    seen = launch.wait_for(r"checkpoint saved: .*step_000002")
    os.kill(_two_workers(launch)[1], signal.SIGKILL)
    seen = launch.wait_for(r"resumed from", timeout=180, after=seen)
    launch.wait_for(r"epoch \d+ step \d+ ", after=seen)
    os.kill(_two_workers(launch)[1], signal.SIGKILL)  # the second death: no restart left
    start = time.monotonic()
    assert launch.finish(timeout=180) != 0
    assert time.monotonic() - start < 120
    assert launch.text.count("resumed from") == 1, launch.text[-4000:]
    assert "SIGKILL" in launch.text  # the launcher names the process that died and how


@pytest.mark.parametrize("whom", ["every process", "the launcher"])
def test_a_stop_signal_checkpoints_and_stops_without_restarting(tmp_path, mednist_root, launches, whom):
    """SLURM's preemption warning (SIGUSR1 to every process of the job step, or to the launcher alone)
    stops the run after a checkpoint; the elastic launcher does not take the exits for failures."""
    launch = Launch(tmp_path, mednist_root, "train.max_steps=200", "train.epochs=50", MAX_RESTARTS="2")
    launches.append(launch)
    launch.wait_for(r"checkpoint saved: .*step_000002")
    workers = _two_workers(launch)
    targets = [launch.proc.pid, *workers.values()] if whom == "every process" else [launch.proc.pid]
    for pid in targets:
        os.kill(pid, signal.SIGUSR1)
    start = time.monotonic()
    code = launch.finish(timeout=180)
    assert time.monotonic() - start < 120
    text = launch.text
    assert code != 0, text[-4000:]
    stopped = re.search(r"stopped by SIGUSR1 at (\S+step_(\d+)); run the same command again to resume", text)
    assert stopped, text[-4000:]
    assert "resumed from" not in text and text.count("process group: world size 2") == 1
    assert ckpt.find_latest(launch.run) == Path(stopped.group(1))
    time.sleep(1)  # the last processes' exit after the launcher's
    assert not launch.left_behind()  # every process is gone, none was started again


# ------------------------------------------------- the command run.sh builds, its usage, its old names


def _fake_accelerate(tmp_path: Path) -> dict:
    """An ``accelerate`` first on PATH that prints its arguments and the launcher's environment."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "accelerate"
    fake.write_text('#!/bin/bash\necho "ARGS $*"\nenv | grep -E "^(PET_|TORCH_ELASTIC_|TORCH_DISABLE_SHARE_)" | sort\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")


def _built(env: dict, *args: str, **knobs: str) -> subprocess.CompletedProcess:
    """run.sh with ``args`` (default: one override), and its knobs cleared of what this shell may have set."""
    inherited = ("PET_", "TORCH_ELASTIC_", "TORCH_DISABLE_SHARE_", "SLURM_JOB_ID", "RDZV_ID", "ACCELERATE_CONFIG")
    for key in [k for k in env if k.startswith(inherited)]:
        del env[key]
    return subprocess.run(["launch/run.sh", *(args or ["train.max_steps=1"])], cwd=REPO, env=dict(env, **knobs),
                          capture_output=True, text=True, timeout=60)


def test_without_max_restarts_the_launch_command_is_unchanged(tmp_path):
    out = _built(_fake_accelerate(tmp_path), NPROC_PER_NODE="2", MAIN_PORT="29555")
    assert out.returncode == 0, out.stderr
    args = re.search(r"^ARGS (.*)$", out.stdout, re.M).group(1)
    assert args == ("launch --config_file launch/accelerate_one_node.yaml --num_machines 1 --machine_rank 0 "
                    "--num_processes 2 --main_process_ip 127.0.0.1 --main_process_port 29555 -m mednist_gan.train "
                    "--config configs/debug.yaml train.max_steps=1")
    assert "PET_" not in out.stdout and "TORCH_" not in out.stdout and "elastic" not in out.stdout


def test_every_node_gets_the_same_rendezvous_endpoint_and_run_id(tmp_path):
    env = _fake_accelerate(tmp_path)
    outs = [_built(env, NUM_NODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1", MAIN_ADDR="host0",
                   MAIN_PORT="23456", MAX_RESTARTS="3", SLURM_JOB_ID="4242") for rank in (0, 1)]
    for rank, out in enumerate(outs):
        assert out.returncode == 0, out.stderr
        args = re.search(r"^ARGS (.*)$", out.stdout, re.M).group(1)
        assert (f"--config_file launch/accelerate_multi_node.yaml --num_machines 2 --machine_rank {rank} "
                "--num_processes 2 --main_process_ip host0 --main_process_port 23456 --max_restarts 3 "
                f"--rdzv_backend c10d --rdzv_conf is_host={str(rank == 0).lower()} "
                "-m mednist_gan.train") in args
        assert "PET_RDZV_ENDPOINT=host0:23456\n" in out.stdout and "PET_RDZV_ID=4242\n" in out.stdout
        assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1\n" in out.stdout
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n" in out.stdout
    # RDZV_ID names the run where SLURM does not.
    out = _built(env, NPROC_PER_NODE="2", MAX_RESTARTS="1", RDZV_ID="my-run")
    assert "PET_RDZV_ID=my-run\n" in out.stdout
    assert "--max_restarts 1 --rdzv_backend c10d --rdzv_conf is_host=true" in out.stdout


def test_bad_max_restarts_is_one_line_and_one_process_says_it_runs_once(tmp_path):
    env = _fake_accelerate(tmp_path)
    out = _built(env, NPROC_PER_NODE="2", MAX_RESTARTS="three")
    assert out.returncode == 2 and out.stderr == "launch/run.sh: error: MAX_RESTARTS=three: expected an integer >= 0\n"
    assert "ARGS" not in out.stdout
    # One process has no launcher to restart it: said once, then the trainer runs as before.
    fake_python = Path(env["PATH"].split(":")[0]) / "python"
    fake_python.write_text('#!/bin/bash\necho "PYTHON $*"\n')
    fake_python.chmod(0o755)
    out = _built(env, NPROC_PER_NODE="1", MAX_RESTARTS="3")
    assert out.returncode == 0, out.stderr
    assert "MAX_RESTARTS=3 has no effect on one process (no launcher): it runs once" in out.stdout
    assert "PYTHON -m mednist_gan.train --config configs/debug.yaml train.max_steps=1" in out.stdout


def _read_from_environment(script: str) -> set[str]:
    """The upper-case variables run.sh reads from its environment: every ``$NAME`` / ``${NAME`` outside
    comments and the usage text that the script either never sets or reads with a default (``${NAME:-``)."""
    code = re.sub(r"<<'USAGE'\n.*?^USAGE$", "", script, flags=re.S | re.M)
    code = re.sub(r"(^|\s)#.*$", "", code, flags=re.M)
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", code))
    assigned = set(re.findall(r"(?:^|[\s;(])(?:export\s+)?([A-Z_][A-Z0-9_]*)=", code, flags=re.M))
    defaulted = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):?[-=]", code))
    return {name for name in used if name not in assigned or name in defaulted} - {"BASH_SOURCE"}


def test_help_names_every_knob_with_its_default_and_starts_nothing(tmp_path):
    script = (REPO / "launch" / "run.sh").read_text()
    knobs = _read_from_environment(script)
    assert {"NPROC_PER_NODE", "NUM_NODES", "NODE_RANK", "MAIN_ADDR", "MAIN_PORT", "CONFIG", "ACCELERATE_CONFIG",
            "MAX_RESTARTS", "RDZV_ID", "SLURM_JOB_ID", "OMP_NUM_THREADS", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"} <= knobs
    env = _fake_accelerate(tmp_path)
    bindir = Path(env["PATH"].split(":")[0])
    for tool in ("python", "nvidia-smi"):  # anything started leaves a trace
        (bindir / tool).write_text(f'#!/bin/bash\necho "STARTED {tool} $*"\n')
        (bindir / tool).chmod(0o755)
    outs = [_built(env, "--help", NPROC_PER_NODE="2"), _built(env, "data.root=/x", "-h", MAX_RESTARTS="three")]
    for out in outs:
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert out.stdout.startswith("usage: launch/run.sh ")
        assert "ARGS" not in out.stdout and "STARTED" not in out.stdout and "[launch/run.sh]" not in out.stdout
    usage = outs[0].stdout
    assert outs[1].stdout == usage
    # Each knob has an entry (its name at the start of a line, continued by indented lines) that shows its
    # default: the literal one the script gives it, and ACCELERATE_CONFIG's three by scale.
    entry = r"^  ([A-Z_][A-Z0-9_]*)(?=[ \t]|$).*(?:\n {5,}\S.*)*"  # not NAME=value, as in the examples
    entries = {m.group(1): m.group(0) for m in re.finditer(entry, usage, re.M)}
    assert knobs <= entries.keys(), f"not in the usage: {sorted(knobs - entries.keys())}"
    defaults = dict(re.findall(r"\b([A-Z_][A-Z0-9_]*)=\$\{\1:-([^}$]+)\}", script))
    assert {"CONFIG", "MAIN_PORT", "MAX_RESTARTS", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"} <= defaults.keys()
    for name, default in defaults.items():
        assert f"[{default}" in entries[name], (name, default, entries[name])
    by_scale = re.findall(r"ACCELERATE_CONFIG=(launch/\S+\.yaml)", script)
    assert len(by_scale) == 3 and all(path in entries["ACCELERATE_CONFIG"] for path in by_scale)
    assert all((REPO / path).is_file() for path in by_scale)
    assert re.search(r"^  [A-Z_]+=\S+ .*launch/run\.sh \S+=", usage, re.M)  # an example with a knob and an override


@pytest.mark.parametrize("old, new", [
    ("launch/single_device.yaml", "launch/accelerate_single_device.yaml"),
    ("launch/one_node.yaml", "launch/accelerate_one_node.yaml"),
    ("launch/multi_node.yaml", "launch/accelerate_multi_node.yaml"),
    ("./launch/one_node.yaml", "./launch/accelerate_one_node.yaml"),
    (str(REPO / "launch" / "multi_node.yaml"), str(REPO / "launch" / "accelerate_multi_node.yaml")),
])
def test_an_old_launcher_config_name_is_one_line_naming_the_new_one(tmp_path, old, new):
    out = _built(_fake_accelerate(tmp_path), NPROC_PER_NODE="2", ACCELERATE_CONFIG=old)
    assert out.returncode == 2
    assert out.stderr == f"launch/run.sh: error: ACCELERATE_CONFIG={old} was renamed: use {new}\n"
    assert out.stdout == ""
    assert (REPO / new).is_file() and not (REPO / old).exists()


def test_a_launcher_config_of_ones_own_with_an_old_name_is_used(tmp_path):
    own = tmp_path / "launch" / "one_node.yaml"
    own.parent.mkdir()
    own.write_text((REPO / "launch" / "accelerate_one_node.yaml").read_text())
    out = _built(_fake_accelerate(tmp_path), NPROC_PER_NODE="2", ACCELERATE_CONFIG=str(own))
    assert out.returncode == 0, out.stderr
    assert f"ARGS launch --config_file {own} --num_machines 1 " in out.stdout
