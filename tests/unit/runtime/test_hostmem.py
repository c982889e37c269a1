"""Freed host memory stays in the process: a repeated large allocation stops page-faulting."""

from __future__ import annotations

import mmap
import platform
import subprocess
import sys

import pytest

from helpers import CONFIGS, REPO

# Twenty rounds of what a training step does with its activations: allocate and fill two large tensors
# (64 and 32 MiB, above glibc's largest mmap threshold), keep a small result, free the large ones.
# Prints the minor page faults of each of the last ten rounds. glibc needs a few rounds to settle on reusable
# free blocks, and now and then grows its heap once more later (measured on glibc 2.36: rounds 1-5 fault;
# one of rounds 6-10 may grow the heap by 64 MiB; CI saw one 32 MiB growth within rounds 16-20), so the test
# asks that most late rounds fault nothing, where default malloc faults every round in full.
# Transparent huge pages off for the probe (prctl PR_SET_THP_DISABLE): where a machine sets them to
# "always", one fault maps 2 MiB and the counts would say nothing about the allocator.
PROBE = """
import ctypes, resource, sys, torch
ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)
mode = sys.argv[1]
if mode == "direct":
    from mednist_gan.runtime.host_memory import keep_freed_host_memory
    print("applied", keep_freed_host_memory())
elif mode.startswith("config"):
    from mednist_gan.config import load_config
    from mednist_gan.runtime.accelerator import make_accelerator
    keep = mode == "config-on"
    make_accelerator(load_config(sys.argv[2], [f"runtime.keep_host_memory={keep}", "log.tracker=none"]))
faults = []
for i in range(20):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.empty(16 * 2**20).fill_(1.0), torch.empty(8 * 2**20).fill_(1.0)
    kept = a[:100] + b[:100]
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print("faults", *faults[10:])
"""

PAGES_PER_ROUND = 96 * 2**20 // mmap.PAGESIZE


def reused(faults: list[int]) -> bool:
    """Most late rounds fault (almost) nothing: at most 2 of 10 above 5% of a round's pages, and all 10 together
    less than two rounds' worth."""
    return sum(f > 0.05 * PAGES_PER_ROUND for f in faults) <= 2 and sum(faults) < 2 * PAGES_PER_ROUND


def faulted_every_round(faults: list[int]) -> bool:
    return all(f >= 0.9 * PAGES_PER_ROUND for f in faults)


pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning applies to glibc only")


def _faults(*args: str) -> tuple[list[int], str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(f) for f in out.stdout.split("faults")[-1].split()], out.stdout


def test_default_malloc_faults_a_large_tensor_back_in_every_time():
    faults, _ = _faults("none")
    assert faulted_every_round(faults), faults


def test_keep_freed_host_memory_reuses_the_pages():
    faults, out = _faults("direct")
    assert "applied True" in out
    assert reused(faults), faults


def test_training_setup_applies_it_unless_the_config_turns_it_off():
    on, _ = _faults("config-on", str(CONFIGS / "debug.yaml"))
    off, _ = _faults("config-off", str(CONFIGS / "debug.yaml"))
    assert reused(on), on
    assert faulted_every_round(off), off
