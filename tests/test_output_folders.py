"""Commands never delete what they did not write: export folders are replaced only when they hold an earlier export,
the replacement survives a kill between any two filesystem steps, and a full disk is one line with nothing lost."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mednist_gan.config import ModelConfig
from mednist_gan.errors import CheckpointError, OutputError
from mednist_gan.generator.export import export_generator
from mednist_gan.files import recover_folder
from mednist_gan.models.networks import build_generator

from helpers import REPO, run_cli, train_debug_run


def listing(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256): what a user would lose."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mednist-gan: error:") and "Traceback" not in result.stderr, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, mednist_root):
    run = tmp_path_factory.mktemp("out") / "run"
    return train_debug_run(run, mednist_root)


@pytest.mark.parametrize("target", ["the run folder", "a user folder"])
def test_export_refuses_a_folder_that_is_not_an_earlier_export(run, tmp_path, target):
    if target == "the run folder":
        out = run
    else:
        out = tmp_path / "mine"
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "today.txt").write_text("do not delete")
        (out / "model.pt").write_bytes(b"my own model")  # one of export's names does not make it an export
    before = listing(out)
    result = run_cli("export", "--checkpoint", str(run), "--out", str(out))
    assert_one_line_error(result, f"--out {out}: exists and is not an earlier export", "nothing was written")
    assert listing(out) == before


@pytest.mark.slow  # three export processes end to end
def test_export_replaces_an_earlier_export_and_an_empty_folder(run, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "exp", tmp_path / "exp"):
        result = run_cli("export", "--checkpoint", str(run), "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert (out / "export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exp"]  # no staging or old folders left


# A process that exports over an earlier export and dies (os._exit, no cleanup) at the k-th filesystem step.
KILLED_EXPORT = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    import mednist_gan.files as files
    from mednist_gan.config import ModelConfig
    from mednist_gan.generator.export import export_generator
    from mednist_gan.models.networks import build_generator

    step, kill_at = 0, int(sys.argv[2])
    def dying(real):
        def call(*args, **kwargs):
            global step
            step += 1
            if step == kill_at:
                os._exit(137)
            return real(*args, **kwargs)
        return call
    files.os.rename = dying(os.rename)          # old export aside, new one in
    files.shutil.rmtree = dying(shutil.rmtree)  # old export removed
    Path.write_bytes = dying(Path.write_bytes)  # the new files, one by one
    cfg = ModelConfig()
    export_generator(build_generator(cfg), cfg, Path(sys.argv[1]), {"config": {"model": {}}})
""")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, survivor", [(2, "old"), (4, "old"), (5, "old"), (6, "new"), (7, "new")],
                         ids=["writing a file", "before the renames", "between the renames", "before removing the old",
                              "after"])
def test_an_export_killed_between_any_two_steps_leaves_the_old_or_the_new_one(tmp_path, kill_at, survivor):
    cfg = ModelConfig()
    out = tmp_path / "exp"
    export_generator(build_generator(cfg), cfg, out, {"config": {"model": {}}, "which": "old"})
    old = listing(out)
    result = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out), str(kill_at)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == (137 if kill_at < 7 else 0), result.stderr
    recover_folder(out)  # what the next export, or a training run before reading best/, does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    record = json.loads((out / "export.json").read_text())
    if survivor == "old":
        assert listing(out) == old
    else:
        assert record.get("which") is None and listing(out) != old
        for name, entry in record["files"].items():  # complete: every file as its record says
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]


def test_an_export_renamed_aside_by_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "exp"
    aside = tmp_path / f".exp.old-{__import__('socket').gethostname()}-1"  # pid 1 is alive
    aside.mkdir()
    recover_folder(out)
    assert aside.is_dir() and not out.exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A 6 MiB tmpfs: room for one export of the bundle's generator, not for a second beside it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow  # two export processes end to end
def test_a_full_disk_during_export_is_one_line_and_the_earlier_export_stays(run, small_disk):
    out = small_disk / "exp"
    assert run_cli("export", "--checkpoint", str(run), "--out", str(out)).returncode == 0
    before = listing(out)
    result = run_cli("export", "--checkpoint", str(run), "--out", str(out))
    assert_one_line_error(result, f"--out {out}: cannot be created or written (No space left on device)")
    assert listing(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["exp"]


def test_export_generator_names_the_folder_it_refuses(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "mine.txt").write_text("x")
    cfg = ModelConfig()
    with pytest.raises(OutputError, match=r"^export folder .*best: exists and is not an earlier export"):
        export_generator(build_generator(cfg), cfg, tmp_path / "best", {})
    assert listing(tmp_path / "best") == {"mine.txt": hashlib.sha256(b"x").hexdigest()}


def test_a_generator_that_returns_nan_is_not_exported(tmp_path):
    import torch

    cfg = ModelConfig()
    generator = build_generator(cfg)
    with torch.no_grad():
        next(generator.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"export folder .*exp: not exported: the generator returns non-finite"):
        export_generator(generator, cfg, tmp_path / "exp", {})
    assert list(tmp_path.iterdir()) == []
