"""Config keys that moved or were removed: files, overrides and recorded configs that use them still load, with a
warning naming the new key."""

from __future__ import annotations

import warnings
from typing import Any, Optional

# Keys that moved (new place) or were removed (None). Config files and overrides that use them still load,
# with a warning; checkpoints that recorded them still resume and export (``ModelConfig.from_record``).
LEGACY_KEYS: dict[str, Optional[str]] = {
    "model.cpu_mask_dropout": "runtime.cpu_mask_dropout",
    "model.cpu_phase_split": None,  # gained under 3% end to end (docs/benchmarks.md)
    "train.channels_last": "runtime.channels_last",
    "train.num_threads": "runtime.num_threads",
    "train.keep_host_memory": "runtime.keep_host_memory",
    "data.class_name": "data.classes",  # one class name -> a list of one
    "train.log_every": "log.every_steps",  # beside the other cadences: log.sample_every, eval.every_steps, ...
    "optim.foreach": "runtime.foreach",  # how Adam computes its update, not what it is
}


class ConfigWarning(UserWarning):
    """A config that still loads but should be updated."""


def move_legacy_key(old: str, value: Any) -> Optional[tuple[str, Any]]:
    """Where a moved key's value goes now (with a warning), or None for a removed key."""
    new = LEGACY_KEYS[old]
    if new is None:
        warnings.warn(f"config key {old} was removed (it changed nothing but speed); ignoring it", ConfigWarning, 3)
        return None
    warnings.warn(f"config key {old} is now {new}; please rename it", ConfigWarning, 3)
    return new, [value] if new == "data.classes" and isinstance(value, str) else value


def move_legacy_keys(data: dict) -> None:
    """Moved keys of one config file to their new place (a file that also sets the new key keeps its value)."""
    for old in LEGACY_KEYS:
        section, key = old.split(".")
        if not isinstance(data.get(section), dict) or key not in data[section]:
            continue
        moved = move_legacy_key(old, data[section].pop(key))
        if moved is not None:
            new_section, new_key = moved[0].split(".")
            data.setdefault(new_section, {}).setdefault(new_key, moved[1])
