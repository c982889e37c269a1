"""Faults survived and bad input refused: each case of docs/reliability.md has its test here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mednist_gan import checkpoint as ckpt
from mednist_gan.data import list_images
from mednist_gan.errors import TrainingError
from mednist_gan.training.trainer import Trainer

from helpers import CONFIGS, REPO, debug_config, file_hashes, run_cli, run_overrides, tmpfs, train_cmd


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]

# ----------------------------------------------------------------------------- helpers

LONG = ["train.epochs=3", "train.max_steps=10", "checkpoint.every_steps=2", "checkpoint.keep=10",
        "export.at_end=false"]


def _train_cmd(run: Path, mednist_root: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mednist_gan.train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}",
            f"data.root={mednist_root}", f"data.cache_dir={cache}", *LONG, *extra]


def _start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **(env or {})))


def _wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.kill()
    pytest.fail(f"never saw {pattern!r}:\n{''.join(lines)[-3000:]}")


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.find_latest(run)
    return {**load_file(str(latest / "model.safetensors")), **{f"D.{k}": v for k, v in
                                                              load_file(str(latest / "model_1.safetensors")).items()}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mednist_root) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    result = subprocess.run(_train_cmd(run, mednist_root, run.parent / "cache"), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run


# ----------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.parametrize("when", ["before the first checkpoint", "during a save", "after a save"])
def test_kill_9_then_same_command_resumes_to_bitwise_equal_weights(tmp_path, mednist_root, uninterrupted, when):
    run = tmp_path / "run"
    cmd = _train_cmd(run, mednist_root, tmp_path / "cache")
    if when == "during a save":
        # Killed after the state files of step 4 are written but before the checkpoint is published.
        proc = _start(cmd, env={"MEDNIST_GAN_CRASH_AT": "save:4"})
        proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL
        assert (run / "checkpoints" / ".tmp-step_000004").is_dir()
        assert ckpt.find_latest(run).name == "step_000002"
    else:
        proc = _start(cmd)
        _wait_for_line(proc, r"step 1 loss_d" if when.startswith("before") else r"checkpoint saved: .*step_000004")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    restarted = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stdout[-3000:]
    if when != "before the first checkpoint":
        assert "resumed from" in restarted.stdout
    assert not list((run / "checkpoints").glob(".tmp-*"))
    a, b = _final_weights(uninterrupted), _final_weights(run)
    assert ckpt.find_latest(run).name == "step_000010"
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after kill -9 {when}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_write_a_checkpoint_then_exit_cleanly(tmp_path, mednist_root, sig):
    run = tmp_path / "run"
    proc = _start(_train_cmd(run, mednist_root, tmp_path / "cache", "checkpoint.every_steps=null"))
    _wait_for_line(proc, r"step 3 loss_d")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-2000:]
    assert f"stopped by {sig.name}" in out and "Traceback" not in out
    latest = ckpt.find_latest(run)
    assert latest is not None and ckpt.read_meta(latest)["state"]["step"] >= 3
    ckpt.verify_safe(latest)


def test_second_ctrl_c_exits_at_once_without_corrupting(tmp_path, mednist_root):
    run = tmp_path / "run"
    proc = _start(_train_cmd(run, mednist_root, tmp_path / "cache", "train.max_steps=30", "train.epochs=20"))
    _wait_for_line(proc, r"checkpoint saved: .*step_000004")
    proc.send_signal(signal.SIGINT)
    _wait_for_line(proc, r"received SIGINT")
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 130 and "interrupted" in out
    latest = ckpt.find_latest(run)
    ckpt.verify_safe(latest)
    assert ckpt.read_meta(latest)["state"]["step"] >= 4


def test_one_rank_dying_stops_the_other_in_bounded_time_and_the_run_resumes(tmp_path, mednist_root):
    run = tmp_path / "run"
    launch = [*train_cmd(2), "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}",
              f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", *LONG,
              "train.collective_timeout_s=60"]
    env = {"OMP_NUM_THREADS": "1"}
    proc = _start(launch, env=env)
    _wait_for_line(proc, r"checkpoint saved: .*step_000002")
    workers = subprocess.run(["pgrep", "-f", f"mednist_gan.train.*run_dir={run}"], capture_output=True, text=True)
    pids = sorted(int(p) for p in workers.stdout.split() if int(p) != proc.pid)
    assert len(pids) >= 2, workers.stdout
    os.kill(pids[-1], signal.SIGKILL)  # the newest worker: rank 1
    start = time.monotonic()
    out, _ = proc.communicate(timeout=240)
    assert time.monotonic() - start < 180
    assert proc.returncode != 0
    assert "exitcode  : -9" in out or "Signals.SIGKILL" in out or "SIGKILL" in out
    restarted = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=600,
                               env=dict(os.environ, **env))
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert "resumed from" in restarted.stdout and ckpt.find_latest(run).name == "step_000010"


def test_a_hung_rank_makes_the_other_give_up_after_the_collective_timeout(tmp_path, mednist_root):
    """A process that stops answering (frozen, not dead: the launcher sees nothing) is given up on."""
    run = tmp_path / "run"
    launch = [*train_cmd(2), "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}",
              f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=30",
              "train.max_steps=200", "checkpoint.every_steps=2", "export.at_end=false", "train.collective_timeout_s=15"]
    proc = _start(launch, env={"OMP_NUM_THREADS": "1"})
    _wait_for_line(proc, r"checkpoint saved: .*step_000002")
    workers = subprocess.run(["pgrep", "-f", f"python.*-m mednist_gan.train.*run_dir={run}"], capture_output=True,
                             text=True)
    frozen = max(int(p) for p in workers.stdout.split())
    os.kill(frozen, signal.SIGSTOP)
    try:
        start = time.monotonic()
        out, _ = proc.communicate(timeout=180)
        assert time.monotonic() - start < 150
    finally:
        with contextlib.suppress(ProcessLookupError):  # the launcher may have ended it already
            os.kill(frozen, signal.SIGKILL)
    assert proc.returncode != 0
    assert "lost contact with another training process" in out and "train.collective_timeout_s=15" in out
    ckpt.verify_safe(ckpt.find_latest(run))


# ----------------------------------------------------------------------------- non-finite losses


class _PoisonAt:
    """Make the real batch of one step NaN, as a corrupt input or an exploding update would."""

    def __init__(self, trainer: Trainer, step: int):
        self.trainer, self.step, self.original = trainer, step, trainer.gan_step.prepare_reals

    def __call__(self, batch):
        real = self.original(batch)
        return real * float("nan") if self.trainer.state.step + 1 == self.step else real


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(debug_overrides, tmp_path):
    trainer = Trainer(debug_config(debug_overrides, "train.max_steps=4", "checkpoint.every_steps=2",
                                   "log.every_steps=10"))
    trainer.gan_step.prepare_reals = _PoisonAt(trainer, 3)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 \(loss_d=nan"):
        trainer.fit()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step_000002"]
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_000002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_updates_can_be_skipped(debug_overrides, tmp_path):
    trainer = Trainer(debug_config(debug_overrides, "train.max_steps=4", "train.nonfinite=skip", "export.at_end=false"))
    trainer.gan_step.prepare_reals = _PoisonAt(trainer, 2)
    state = trainer.fit()
    # the five D updates of step 2 (G's loss stayed finite)
    assert state.step == 4 and trainer.gan_step.skipped_updates == 5
    weights = load_file(str(ckpt.find_latest(tmp_path / "run") / "model_1.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert "non-finite loss, update skipped" in (tmp_path / "run" / "train.log").read_text()


# ----------------------------------------------------------------------------- disk full


@pytest.fixture()
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "8m") as mount:
        yield mount


def test_disk_full_while_saving_is_a_clear_error_and_the_previous_checkpoint_loads(small_disk, mednist_root,
                                                                                   tmp_path):
    run = small_disk / "run"
    result = subprocess.run(_train_cmd(run, mednist_root, tmp_path / "cache"), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "could not write checkpoint" in err[0] and "No space left on device" in err[0]
    assert "Traceback" not in result.stderr
    latest = ckpt.find_latest(run)
    assert latest is not None and not list((run / "checkpoints").glob(".tmp-*"))
    ckpt.verify_safe(latest)
    generated = run_cli("generate", "--model", str(latest), "--num-samples", "2", "--output-dir",
                        str(tmp_path / "png"))
    assert generated.returncode == 0, generated.stderr


# ----------------------------------------------------------------------------- bad data


def _folder_with(tmp_path: Path, mednist_root: Path, name: str, make) -> Path:
    root = tmp_path / "data"
    folder = root / "Hand"
    folder.mkdir(parents=True)
    for f in list_images(mednist_root / "Hand")[:20]:
        shutil.copy(f, folder / f.name)
    make(folder / name, mednist_root / "Hand" / "000000.jpeg")
    return root


BAD_FILES = {
    "truncated.jpeg": lambda dst, src: dst.write_bytes(src.read_bytes()[:300]),
    "random.jpeg": lambda dst, src: dst.write_bytes(np.random.default_rng(0).bytes(2000)),
    "small.jpeg": lambda dst, src: Image.open(src).resize((32, 32)).save(dst),
    "rgb.png": lambda dst, src: Image.open(src).convert("RGB").save(dst),
}
EXPECTED = {
    "truncated.jpeg": "truncated.jpeg: cannot be read as an image",
    "random.jpeg": "random.jpeg: cannot be read as an image",
    "small.jpeg": "small.jpeg: expected a 64x64 image, got 32x32",
    "rgb.png": "rgb.png: expected a single-channel (grayscale) image",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_is_named_in_one_line_or_skipped_and_counted(tmp_path, mednist_root, name):
    root = _folder_with(tmp_path, mednist_root, name, BAD_FILES[name])
    (root / "Hand" / "notes.txt").write_text("not an image, and not an image name: ignored")
    common = ["train", "--config", str(CONFIGS / "debug.yaml"), f"data.root={root}", "data.cache_dir=null",
              "train.max_steps=1", "export.at_end=false"]
    result = run_cli(*common, f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(root / "Hand" / name) in lines[0] and EXPECTED[name] in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
    skipped = run_cli(*common, f"run_dir={tmp_path / 'run2'}", "data.bad_files=skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 unusable image(s)" in skipped.stdout and name in skipped.stdout


def test_more_processes_than_images_is_refused(tmp_path, mednist_root):
    launch = [*train_cmd(2), "--config", str(CONFIGS / "debug.yaml"), f"run_dir={tmp_path / 'run'}",
              f"data.root={mednist_root}", "data.limit=1", "train.batch_size=2", f"data.cache_dir={tmp_path / 'c'}"]
    result = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert "1 images cannot feed 2 processes" in result.stderr


def test_a_batch_larger_than_the_data_set_is_refused(tmp_path, mednist_root):
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={tmp_path / 'run'}",
                     f"data.root={mednist_root}", "train.batch_size=1000", f"data.cache_dir={tmp_path / 'c'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "train.batch_size=1000 is larger than the data set (64 images in" in result.stderr
    assert "use a batch of at most 64" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_key_suggestion_and_missing_config_file_via_cli(tmp_path):
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), "train.batchsize=4")
    assert result.returncode == 2 and "did you mean train.batch_size?" in result.stderr
    missing = run_cli("train", "--config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "none.yaml does not exist" in missing.stderr


def test_export_of_a_different_architecture_names_the_first_mismatch(tmp_path):
    state = {"linear.weight": torch.zeros(10, 10)}
    bad = tmp_path / "model.pt"
    torch.save(state, bad)
    result = run_cli("generate", "--model", str(bad), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "linear.weight has shape (10, 10), this generator needs (4096, 64)" in result.stderr


def test_pickle_with_code_as_model_is_refused_and_nothing_runs(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"linear.weight": Exploit()}, f)
    result = run_cli("generate", "--model", str(bad), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2 and str(bad) in result.stderr
    assert not marker.exists()


def test_truncated_checkpoint_file_is_named_and_not_resumed(debug_overrides, tmp_path):
    from mednist_gan.errors import CheckpointError
    from mednist_gan.training.trainer import train

    train(debug_config(debug_overrides, "train.max_steps=2", "export.at_end=false"))
    latest = ckpt.find_latest(tmp_path / "run")
    data = (latest / "optimizer.bin").read_bytes()
    (latest / "optimizer.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*optimizer.bin: \d+ bytes, \d+ when written"):
        Trainer(debug_config(debug_overrides)).fit()


def _short_train_cmd(run: Path, mednist_root: Path, cache: Path, *extra: str) -> list[str]:
    """configs/debug.yaml's 4 steps as a process, checkpointing at 2 and 4, without an export."""
    return [sys.executable, "-m", "mednist_gan.train", "--config", str(CONFIGS / "debug.yaml"),
            *run_overrides(run, mednist_root, cache, *extra)]


def test_a_second_train_on_a_run_folder_in_use_is_refused_and_writes_nothing(tmp_path, mednist_root):
    run, cache = tmp_path / "run", tmp_path / "cache"
    first = subprocess.Popen(_short_train_cmd(run, mednist_root, cache), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:  # training has started: the lock is held
        lines.append(line)
        if "INFO training debug:" in line:
            break
    else:
        first.kill()
        pytest.fail("the first run never started training:\n" + "".join(lines)[-3000:])
    os.kill(first.pid, signal.SIGSTOP)  # holds still while the second one tries
    try:
        before = file_hashes(run, folders=True)
        second = subprocess.run(_short_train_cmd(run, mednist_root, cache, "train.max_steps=3"), cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        after = file_hashes(run, folders=True)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    rest, _ = first.communicate(timeout=600)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert second.stderr.strip() == (f"mednist-gan: error: run_dir {run} is in use by another training process (pid "
                                     f"{first.pid} on host {socket.gethostname()}); wait for it to finish, or choose "
                                     "another run_dir")
    assert after == before, "the refused run wrote to the run folder"
    assert first.returncode == 0, "".join(lines)[-2000:] + rest[-3000:]
    assert "training finished at step 4" in rest
    assert _metric_steps(run) == [1, 2, 3, 4]  # each step once
    assert (run / "train.log").read_text().count("INFO training debug:") == 1
    assert "max_steps: 4" in (run / "config.yaml").read_text()


def test_the_lock_file_of_a_killed_run_does_not_block_the_next_run(tmp_path, mednist_root):
    run, cache = tmp_path / "run", tmp_path / "cache"
    killed = subprocess.run(_short_train_cmd(run, mednist_root, cache), cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, MEDNIST_GAN_CRASH_AT="save:2"))  # SIGKILL mid-save
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    pid, host = (run / ".lock").read_text().split()
    assert host == socket.gethostname() and int(pid) != os.getpid()
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"),
                     *run_overrides(run, mednist_root, cache, "train.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _metric_steps(run) == [1, 2]
    assert ckpt.find_latest(run).name == "step_000002"
