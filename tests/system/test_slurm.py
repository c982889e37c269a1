"""The sbatch scripts on a real local SLURM cluster (slurm/local_cluster.sh: two slurmd nodes on this machine)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mednist_gan import checkpoint as ckpt

from helpers import REPO

pytestmark = pytest.mark.slurm
SLURM_CONF = Path(os.environ.get("SLURM_CONF", "/tmp/mednist-gan-slurm/slurm.conf"))


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    env = dict(os.environ, SLURM_CONF=str(SLURM_CONF))
    reason = None
    if not SLURM_CONF.is_file():
        reason = f"no local SLURM cluster ({SLURM_CONF} missing): run `slurm/local_cluster.sh start` as root"
    else:
        try:
            nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True,
                                   timeout=30).stdout.split("\n")
            up = [n for n in nodes if re.search(r"\b(idle|mix|alloc)", n)]
            if len(up) < 2:
                reason = f"local SLURM cluster has {len(up)} usable node(s), needs 2: {nodes}"
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"SLURM commands unavailable: {exc}"
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " - CI must start it")
        pytest.skip(reason)
    return env


def _sbatch(env: dict, script: str, log: Path, *overrides: str, sbatch_options: tuple[str, ...] = (),
            **knobs: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch_options, script, *overrides],
                            cwd=REPO, env=dict(env, **knobs), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _node_names(env: dict, usable_only: bool = False) -> list[str]:
    """This cluster's node names, from sinfo (slurm/local_cluster.sh's are node1 and node2; others differ)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, timeout=30)
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    # -N lists a node once per partition
    return sorted({row[0] for row in rows if not usable_only or re.match(r"(idle|mix|alloc)", row[1])})


def _hostnames(env: dict, nodelist: str) -> list[str]:
    """A SLURM node list (``node[1-2]``, ``n1,n2``) expanded to node names."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _job_state(env: dict, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "GONE"


def _wait(env: dict, job: str, timeout: float = 420) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(env, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE"):
            return state
        time.sleep(2)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} did not finish within {timeout} s (state {_job_state(env, job)})")


def _overrides(tmp_path: Path, mednist_root: Path, run: Path, *extra: str) -> list[str]:
    return [f"run_dir={run}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", *extra]


def test_single_node_script_trains_two_processes_and_exports(slurm_env, tmp_path, mednist_root):
    run, log = tmp_path / "run", tmp_path / "single.out"
    job = _sbatch(slurm_env, "slurm/train_single_node.sbatch", log, *_overrides(tmp_path, mednist_root, run),
                  CONFIG="configs/debug.yaml", NPROC_PER_NODE="2")
    assert _wait(slurm_env, job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "process group: world size 2" in text and "training finished at step 4" in text
    assert (run / "export" / "model.pt").is_file() and (run / "export" / "mednist_gan.ts").is_file()


def test_multi_node_script_forms_one_group_across_two_nodes(slurm_env, tmp_path, mednist_root):
    run, log = tmp_path / "run", tmp_path / "multi.out"
    job = _sbatch(slurm_env, "slurm/train_multi_node.sbatch", log,
                  *_overrides(tmp_path, mednist_root, run, "log.tracker=wandb"),
                  CONFIG="configs/debug.yaml", NPROC_PER_NODE="1")
    assert _wait(slurm_env, job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    # The job ran on two different nodes of this cluster, whatever the cluster calls them.
    allocated = re.search(r" job \d+ on (\S+) \(main ", text)
    assert allocated, text[-3000:]
    nodes = _hostnames(slurm_env, allocated.group(1))
    assert len(set(nodes)) == 2 and set(nodes) <= set(_node_names(slurm_env)), (nodes, _node_names(slurm_env))
    assert "node 0/2" in text and "node 1/2" in text  # each node's launch line, machine rank from SLURM_NODEID
    assert "process group: world size 2, ranks 0@node0 1@node1" in text
    assert text.count("training finished at step 4") == 1
    exports = list(run.rglob("mednist_gan.ts"))
    assert exports == [run / "export" / "mednist_gan.ts"]
    assert len(list((run / "tracker" / "wandb").glob("offline-run-*"))) == 1


def _wait_for_step(log: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and f" step {step} " in log.read_text()):
        assert time.monotonic() < deadline, f"job never reached step {step}"
        time.sleep(0.5)


def _preempt_and_wait_for_the_requeue(env: dict, job: str, log: Path) -> None:
    # The warning SLURM sends before the time limit (--signal=B:USR1@120), sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    deadline = time.monotonic() + 300
    pending_since = None
    while ", restart 1" not in log.read_text():  # the requeued batch script's first line
        if _job_state(env, job) == "PENDING":
            # Requeued: skip the scheduler's requeue back-off, but only once the node has cleaned up the
            # first run (a start within the same second is refused: "Job credential revoked").
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since > 10:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)
        assert time.monotonic() < deadline, "job was not requeued:\n" + log.read_text()[-3000:]
        time.sleep(1)


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_end(slurm_env, tmp_path, mednist_root):
    # Two jobs at once on a local "cluster" whose two nodes share this machine's cores: one thread each,
    # or OpenMP threads spinning on shared cores slow every step many times over.
    # Both jobs (and the requeued run) on one node: the weights are compared bit for bit, and the nodes of
    # another cluster need not round alike (another CPU kind, other kernels).
    knobs = dict(CONFIG="configs/debug.yaml", NPROC_PER_NODE="1", OMP_NUM_THREADS="1",
                 sbatch_options=(f"--nodelist={_node_names(slurm_env, usable_only=True)[0]}",))
    extra = ("train.epochs=20", "train.max_steps=30", "checkpoint.every_steps=null", "export.at_end=false")
    straight = _sbatch(slurm_env, "slurm/train_single_node.sbatch", tmp_path / "straight.out",
                       *_overrides(tmp_path, mednist_root, tmp_path / "straight", *extra), **knobs)
    log = tmp_path / "preempted.out"
    job = _sbatch(slurm_env, "slurm/train_single_node.sbatch", log,
                  *_overrides(tmp_path, mednist_root, tmp_path / "preempted", *extra), **knobs)
    _wait_for_step(log, 5)
    _preempt_and_wait_for_the_requeue(slurm_env, job, log)
    assert _wait(slurm_env, job) == "COMPLETED", log.read_text()[-3000:]
    assert _wait(slurm_env, straight) == "COMPLETED"
    text = log.read_text()
    assert "received SIGUSR1: saving a checkpoint" in text and "requeueing job" in text
    saved = re.search(r"stopped by SIGUSR1 at \S+step_(\d+)", text)
    assert saved and 5 <= int(saved.group(1)) < 30
    assert f"resumed from {tmp_path / 'preempted' / 'checkpoints' / ('step_' + saved.group(1))}" in text
    a, b = ckpt.find_latest(tmp_path / "straight"), ckpt.find_latest(tmp_path / "preempted")
    assert a.name == b.name == "step_000030"
    assert ckpt.read_meta(a)["state"] == ckpt.read_meta(b)["state"]
    # Deterministic CPU training: the preempted job ends with the uninterrupted job's weights, bit for bit.
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _trainer_pid(run: Path, rank: int, timeout: float = 60) -> int:
    """The trainer process of global ``rank`` writing to ``run`` (the local cluster's nodes are this machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                args = (proc / "cmdline").read_bytes().decode().split("\0")
                if "mednist_gan.train" not in args or f"run_dir={run}" not in args:
                    continue
                env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
            except OSError:
                continue
            if "LOCAL_RANK" in env and env.get("RANK") == str(rank):  # a trainer, not its launcher
                return int(proc.name)
        time.sleep(0.5)
    pytest.fail(f"no trainer process of rank {rank} for {run}")


@pytest.mark.parametrize("script,knobs", [("slurm/train_single_node.sbatch", {"NPROC_PER_NODE": "2"}),
                                          ("slurm/train_multi_node.sbatch", {"NPROC_PER_NODE": "1"})],
                         ids=["one node, 2 processes", "2 nodes"])
def test_a_killed_process_restarts_inside_the_job_which_completes(slurm_env, tmp_path, mednist_root, script, knobs):
    """The scripts' elastic restarts (MAX_RESTARTS=3): no requeue, the processes restart and resume."""
    run, log = tmp_path / "run", tmp_path / "elastic.out"
    extra = ("train.epochs=4", "train.max_steps=16", "checkpoint.every_steps=2", "export.at_end=false")
    job = _sbatch(slurm_env, script, log, *_overrides(tmp_path, mednist_root, run, *extra),
                  CONFIG="configs/debug.yaml", OMP_NUM_THREADS="1", **knobs)
    deadline = time.monotonic() + 300
    while not (log.is_file() and re.search(r"checkpoint saved: \S*step_000002", log.read_text())):
        assert _job_state(slurm_env, job) in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s:\n" + log.read_text()[-3000:]
        time.sleep(0.5)
    os.kill(_trainer_pid(run, rank=1), signal.SIGKILL)
    assert _wait(slurm_env, job, timeout=300) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "elastic: up to 3 restart(s)" in text
    assert re.search(r"resumed from \S*step_0000\d\d", text), text[-3000:]
    assert ", restart 1" not in text  # restarted inside the job: SLURM did not requeue it
    assert "training finished at step 16" in text and ckpt.find_latest(run).name == "step_000016"


def test_preempted_elastic_job_requeues_and_is_not_restarted_by_the_launcher(slurm_env, tmp_path, mednist_root):
    """Two processes under the elastic launcher (the scripts' MAX_RESTARTS=3): on the preemption warning
    the launcher passes the signal on and stops with the processes; SLURM requeues, nothing restarts."""
    run, log = tmp_path / "run", tmp_path / "preempted.out"
    extra = ("train.epochs=20", "train.max_steps=30", "checkpoint.every_steps=null", "export.at_end=false")
    job = _sbatch(slurm_env, "slurm/train_single_node.sbatch", log, *_overrides(tmp_path, mednist_root, run, *extra),
                  CONFIG="configs/debug.yaml", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    _wait_for_step(log, 5)
    _preempt_and_wait_for_the_requeue(slurm_env, job, log)
    assert _wait(slurm_env, job) == "COMPLETED", log.read_text()[-3000:]
    first, requeued = re.split(r"\S+ job \d+ on \S+, restart 1\n", log.read_text(), maxsplit=1)
    assert "elastic: up to 3 restart(s)" in first and "requeueing job" in first
    saved = re.search(r"stopped by SIGUSR1 at \S+step_(\d+)", first)
    assert saved and 5 <= int(saved.group(1)) < 30, first[-3000:]
    assert "resumed from" not in first and first.count("process group: world size 2") == 1  # no elastic restart
    assert f"resumed from {run / 'checkpoints' / ('step_' + saved.group(1))}" in requeued
    assert "training finished at step 30" in requeued and ckpt.find_latest(run).name == "step_000030"


SWEEP = """\
base: {base}
overrides: [data.root={root}, data.cache_dir={cache}, train.epochs=10, eval.num_samples=8, eval.keep_best=false,
            log.tracker=wandb]
sweep_dir: {sweep_dir}
trials: 6
budget: {{max_steps: 6, eval_every_steps: 3}}
sampler: {{kind: tpe, seed: 0}}
pruner: {{kind: median, startup_trials: 1}}
enqueue:  # four sound trials first; the fifth diverges (a learning rate of 1) and is pruned at its first evaluation
  - {{optim.g_lr: 2.0e-4, train.loss: bce}}
  - {{optim.g_lr: 2.0e-4, train.loss: ns}}
  - {{optim.g_lr: 4.0e-4, train.loss: hinge}}
  - {{optim.g_lr: 1.0e-4, train.loss: ns}}
  - {{optim.g_lr: 1.0, train.loss: bce}}
params:
  optim.g_lr: {{low: 1.0e-4, high: 1.0, log: true}}
  train.loss: {{choices: [bce, ns, hinge]}}
"""


def test_sweep_array_shares_one_journal_prunes_resumes_a_preempted_trial_and_reports(slurm_env, tmp_path,
                                                                                     mednist_root):
    """slurm/sweep.sbatch as an array of two tasks on the two nodes, two trials side by side in each
    (TRIALS_PER_GPU=2 on CPU); task 0 gets SLURM's warning mid-trial, checkpoints, is requeued and finishes
    the same trials from their checkpoints; the report lists every trial once and exports the best one."""
    import optuna
    from optuna.trial import TrialState

    from mednist_gan.generator.loader import open_generator
    from mednist_gan.sweep.spec import load_sweep
    from mednist_gan.sweep.study import make_storage

    from helpers import CONFIGS, run_cli
    from wandb_records import config as wandb_config
    from wandb_records import read_records

    started = time.monotonic()
    sweep_dir, space = tmp_path / "sweep", tmp_path / "tiny.yaml"
    space.write_text(SWEEP.format(base=CONFIGS / "debug.yaml", root=mednist_root, cache=tmp_path / "cache",
                                  sweep_dir=sweep_dir))
    logs = [tmp_path / "task_0.out", tmp_path / "task_1.out"]
    # One whole node per task (all its cores), so that the tasks run on both nodes.
    cores = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], env=slurm_env, capture_output=True, text=True,
                           timeout=30).stdout.split()
    array = _sbatch(slurm_env, "slurm/sweep.sbatch", tmp_path / "task_%a.out", str(space),
                    sbatch_options=("--array=0-1", f"--cpus-per-task={min(map(int, cores))}"), TRIALS_PER_GPU="2")
    task0, task1 = f"{array}_0", f"{array}_1"

    # SLURM's preemption warning for task 0 once one of its trials has trained two iterations.
    deadline = time.monotonic() + 300
    while True:
        text = logs[0].read_text() if logs[0].is_file() else ""
        mine = [int(n) for n in re.findall(r"trial (\d+): new", text)]
        trial_logs = [sweep_dir / "trials" / f"trial_{n:04d}" / "train.log" for n in mine]
        if any(p.is_file() and " step 2 " in p.read_text() for p in trial_logs):
            break
        assert time.monotonic() < deadline, "task 0 never got a trial to step 2:\n" + text[-3000:]
        time.sleep(0.5)
    _preempt_and_wait_for_the_requeue(slurm_env, task0, logs[0])
    assert _wait(slurm_env, task0) == "COMPLETED", logs[0].read_text()[-3000:]
    assert _wait(slurm_env, task1) == "COMPLETED", logs[1].read_text()[-3000:]
    swept = time.monotonic() - started

    first, requeued = re.split(r"\S+ job \d+ \(sweep worker [^)]*\) on \S+, restart 1\n", logs[0].read_text(),
                               maxsplit=1)
    nodes = {re.search(r"\) on (\S+), restart 0", log.read_text()).group(1) for log in logs}
    assert len(nodes) == 2 and nodes <= set(_node_names(slurm_env)), nodes  # one task on each node
    assert "up to 2 at a time here" in first and "requeueing job" in first
    interrupted = [int(n) for n in re.findall(r"trial (\d+): stopped by a signal after its checkpoint", first)]
    assert interrupted and set(interrupted) <= set(mine), first[-3000:]

    study = optuna.load_study(study_name="tiny", storage=make_storage(load_sweep(space).storage))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), \
        [(t.number, t.state) for t in trials]
    # Two workers shared one journal: each trial was claimed once (a trial's log says how it started, once).
    for t in trials:
        log = (sweep_dir / "trials" / f"trial_{t.number:04d}" / "train.log").read_text()
        assert log.count(f"training tiny-trial_{t.number:04d}:") == (2 if t.number in interrupted else 1), log
    # The diverging trial was pruned at its first evaluation: a checkpoint after the next iteration, then its end.
    pruned = trials[4]
    assert pruned.state == TrialState.PRUNED and pruned.last_step == 3 and pruned.params["optim.g_lr"] == 1.0
    pruned_log = (sweep_dir / "trials" / "trial_0004" / "train.log").read_text()
    assert "trial 4 pruned by the median pruner at step 3" in pruned_log and "ended early at" in pruned_log
    assert ckpt.find_latest(sweep_dir / "trials" / "trial_0004").name == "step_000004"
    assert not (sweep_dir / "trials" / "trial_0004" / "export").exists()
    # The interrupted trials: checkpoint on the warning, resumed from it after the requeue, run to the end.
    for n in interrupted:
        run = sweep_dir / "trials" / f"trial_{n:04d}"
        log = (run / "train.log").read_text()
        saved = re.search(rf"trial {n} stopped by SIGUSR1 at (\S+?);", first)
        assert saved and Path(saved.group(1)).parent == run / "checkpoints", first[-3000:]
        assert "received SIGUSR1: saving a checkpoint" in log and re.findall(r"resumed from (\S+)", log) == [
            saved.group(1)], log
    assert re.search(rf"trial ({'|'.join(map(str, interrupted))}): (resuming it|taking it over)",
                     requeued + logs[1].read_text())
    # Every trial an ordinary W&B run (offline here), grouped by the sweep, with its parameters in its config.
    for t in trials:
        offline = sorted((sweep_dir / "trials" / f"trial_{t.number:04d}" / "tracker" / "wandb").glob("offline-run-*"))
        records = read_records(next(offline[-1].glob("run-*.wandb")))
        assert next(r.run.run_group for r in records if r.WhichOneof("record_type") == "run") == "tiny"
        assert wandb_config(records)["optim.g_lr"] == pytest.approx(t.params["optim.g_lr"])

    report = run_cli("sweep-report", str(space), env={"SLURM_CONF": str(SLURM_CONF)})
    assert report.returncode == 0, report.stderr
    print(f"\n{report.stdout}sweep of 6 trials on 2 array tasks (with one preemption and requeue): {swept:.0f} s")
    table = [line.split() for line in report.stdout.splitlines()[2:8]]
    assert sorted(int(row[0]) for row in table) == list(range(6)), report.stdout  # every trial once
    assert {row[1] for row in table} <= {"complete", "pruned"}
    best = study.best_trial
    assert table[0][:2] == [str(best.number), "complete"]
    exported = sweep_dir / "report" / "best_trial"
    provenance = json.loads((exported / "export.json").read_text())
    assert provenance["sweep"]["trial"] == best.number and provenance["step"] == 6
    for name in ("mednist_gan.ts", "mednist_gan.pt2", "model.pt"):
        opened = open_generator(exported / name)
        generate, latent_size = opened.network, opened.latent_size
        assert generate(torch.randn(2, latent_size)).shape == (2, 1, 64, 64)
    assert (sweep_dir / "report" / "history.png").stat().st_size > 1000
    assert len((sweep_dir / "report" / "leaderboard.csv").read_text().splitlines()) == 7
