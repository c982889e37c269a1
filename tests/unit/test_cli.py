"""The command line as a new user meets it: help that answers, the version, and the shipped scorers kept safe."""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys

import pytest
import yaml

from mednist_gan import __version__
from mednist_gan.cli import _parser, main
from mednist_gan.config import Config
from mednist_gan.quality import classifier, encoder

from helpers import REPO, run_cli


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"mednist-gan": parser, **sub.choices}


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mednist-gan {__version__}"


@pytest.mark.parametrize("name", list(commands()))
def test_every_option_says_what_it_does_and_its_default(name):
    parser = commands()[name]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{name} {action.option_strings[0]}: no help text"
        shown = action.default is not None and action.default is not False and action.default != []
        if shown and action.default != argparse.SUPPRESS:
            assert "default" in action.help or f"(default: {action.default})" in " ".join(text.split()), \
                f"{name} {action.option_strings[0]}: its default {action.default!r} is not shown"
    assert not re.search(r"#\d|\bissue\b", text, re.I), f"{name} --help cites an issue"


def test_config_help_spells_values_as_yaml():
    lines = [line for line in run_cli("config-help").stdout.splitlines() if not line.startswith("    ")]
    values = dict(line.split(": ", 1) for line in lines)
    assert values["run_dir"] == "null" and values["data.download"] == "false"
    assert {key: yaml.safe_load(text) for key, text in values.items()} == Config().flat()


def test_output_cut_short_by_a_pager_is_not_an_error():
    result = subprocess.run(f"{sys.executable} -m mednist_gan config-help | head -1", shell=True, cwd=REPO,
                            capture_output=True, text=True)
    assert result.stdout.startswith("name: ") and result.stderr == ""


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SHIPPED = {"train-classifier": classifier, "train-encoder": encoder}


@pytest.mark.parametrize("command", list(SHIPPED))
def test_the_shipped_scorers_are_replaced_only_when_asked(command, tmp_path, mednist_root, monkeypatch, capsys):
    shipped = SHIPPED[command]
    before = {path: sha256(path) for path in (shipped.WEIGHTS_FILE, shipped.CARD_JSON)}
    assert main([command, "--data-root", str(mednist_root), "--out", str(shipped.WEIGHTS_FILE)]) == 2
    assert "pass --replace-shipped to replace it" in capsys.readouterr().err
    name = command.removeprefix("train-")
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs" / name / f"{name}.pt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's weights")
    assert main([command, "--data-root", str(mednist_root)]) == 2
    assert capsys.readouterr().err.strip() == (f"mednist-gan: error: runs/{name}/{name}.pt exists (an earlier "
                                               f"{command}); pass --out to name another file, or that one to "
                                               "replace it")
    assert earlier.read_bytes() == b"an earlier run's weights"
    assert {path: sha256(path) for path in before} == before


def test_default_outputs_are_ignored_by_git():
    paths = ["runs/debug/train.log", "outputs/sample_0000.png", "sweeps/quality/optuna.journal", "evaluation.json"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split() == paths, result.stderr


FAILING = {
    "train": ["train", "--config", str(REPO / "configs" / "debug.yaml"), "train.batchsize=2"],
    "generate": ["generate", "--model", "missing.pt"],
    "generate --class": ["generate", "--class", "Knee"],
    "evaluate": ["evaluate", "--model", "missing.pt"],
    "export": ["export", "--checkpoint", "missing", "--out", "exported"],
    "sweep": ["sweep", str(REPO / "configs" / "sweeps" / "quality.yaml"), "train.batchsize=2"],
    "sweep-report": ["sweep-report", str(REPO / "configs" / "sweeps" / "quality.yaml")],
    "train-classifier": ["train-classifier", "--data-root", "missing"],
}


@pytest.mark.parametrize("name", list(FAILING))
def test_a_failed_command_leaves_nothing_behind(name, tmp_path):
    result = run_cli(*FAILING[name], cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], f"{name} left {sorted(p.name for p in tmp_path.rglob('*'))}"


def test_cache_shows_its_size_and_clears_only_decoded_image_sets(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, size in (("images-aaa.pt", 3 << 20), ("images-bbb.pt", 1 << 20)):
        (cache / name).write_bytes(b"\0" * size)
    (cache / "notes.txt").write_text("a user's file in the same folder")
    assert main(["cache", "--dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith(f"{cache}: 2 decoded image set(s), 4.0 MiB")
    assert main(["cache", "--dir", str(cache), "--clear"]) == 0
    assert capsys.readouterr().out.strip() == f"{cache}: removed 2 decoded image set(s), 4.0 MiB"
    assert [p.name for p in cache.iterdir()] == ["notes.txt"]
    assert main(["cache", "--dir", str(tmp_path / "none")]) == 0
    assert "0 decoded image set(s), 0.0 MiB" in capsys.readouterr().out


HELP_ALL = """
import sys
from mednist_gan.cli import main
for command in sys.argv[1:]:
    try:
        main([*command.split(), "--help"])
    except SystemExit as exit:
        assert exit.code == 0, command
"""


def test_every_help_prints_without_a_warning():
    names = ["", *(name for name in commands() if name != "mednist-gan")]
    result = subprocess.run([sys.executable, "-W", "default", "-c", HELP_ALL, *names], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert result.stdout.count("usage: mednist-gan") == len(names)
