"""What every benchmark prints: the machine line and the verdict against its target; the seed weights' path."""

from __future__ import annotations

from pathlib import Path

# The seed bundle's trained generator (../shared/upstream beside the repository), the baseline of the benchmarks.
SEED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "mednist_gan_bundle_model.pt"


def machine() -> str:
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    return f"machine: {where}, torch {torch.__version__}"


def verdict(label: str, value: float, target: float, at_least: bool = True, unit: str = "x") -> int:
    """Print the ratio with PASS/FAIL; return the exit code (1 on FAIL)."""
    ok = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    print(f"{label}: {value:.2f}{unit} (target {sign} {target:g}{unit}) {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


class _NoModules:
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """A ``FlopCounterMode`` for totals only: its per-module tracker's hooks break ``autograd.grad`` (R1)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModules()
    return counter
