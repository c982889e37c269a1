"""What the commands show on a terminal while they work, and nowhere else."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True):
    """A tqdm bar on stderr when it is a terminal; nothing at all otherwise (logs, pipes, tests)."""
    from tqdm import tqdm

    # disable=None: tqdm shows the bar only when its stream (stderr) is a terminal
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False, dynamic_ncols=True)
