"""The README's two commands are the ones CI and a new user run."""

from __future__ import annotations

import re

from helpers import CONFIGS, REPO


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = _bash_blocks()[1].strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_main_command_uses_shipped_config_and_export_paths():
    main_command = _bash_blocks()[0]
    assert "mednist-gan train --config configs/debug.yaml" in main_command
    assert "runs/debug/export/mednist_gan.ts" in main_command
    assert (CONFIGS / "debug.yaml").is_file()
