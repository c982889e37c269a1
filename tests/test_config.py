"""Config loading, overlays, overrides and one-line validation errors."""

from __future__ import annotations

import pytest

from mednist_gan.config import Config, describe_fields, load_config
from mednist_gan.errors import ConfigError

from helpers import CONFIGS, run_cli

ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.run_path.as_posix() == f"runs/{path.stem}"


def test_bundle_config_is_the_seed_recipe():
    cfg = load_config(CONFIGS / "bundle.yaml")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.latent_size, m.start_shape, m.g_channels, m.g_strides) == (64, [64, 8, 8], [32, 16, 8, 1], [2, 2, 2, 1])
    assert (m.image_shape, m.d_channels, m.d_strides) == ([1, 64, 64], [8, 16, 32, 64, 1], [2, 2, 2, 2, 1])
    assert (m.d_num_res_units, m.d_kernel_size, m.d_dropout) == (1, 5, 0.25)
    assert (o.g_lr, o.d_lr, o.betas) == (2e-4, 2e-4, [0.5, 0.999])
    assert (t.batch_size, t.epochs, t.d_train_steps, t.precision) == (600, 50, 5, "no")
    assert cfg.data.classes == ["Hand"] and cfg.data.augment


def test_debug_is_an_overlay_on_bundle():
    bundle, debug = load_config(CONFIGS / "bundle.yaml"), load_config(CONFIGS / "debug.yaml")
    assert debug.model == bundle.model and debug.optim == bundle.optim
    assert debug.train.deterministic and debug.train.max_steps is not None and debug.train.batch_size < 600


def test_overrides_parse_types_and_win_over_the_file():
    cfg = load_config(CONFIGS / "bundle.yaml", ["train.epochs=5", "optim.g_lr=1e-4", "data.root=/data/MedNIST",
                                                "train.max_steps=null", "optim.betas=[0.0, 0.99]", "run_dir=out"])
    assert cfg.train.epochs == 5 and cfg.optim.g_lr == pytest.approx(1e-4) and isinstance(cfg.optim.g_lr, float)
    assert cfg.data.root == "/data/MedNIST" and cfg.train.max_steps is None and cfg.optim.betas == [0.0, 0.99]
    assert str(cfg.run_path) == "out"


@pytest.mark.parametrize("override, message", [
    ("train.lr=1", "unknown config key 'train.lr'"),
    ("optim.glr=1", "did you mean optim.g_lr?"),
    ("optim.g_lr=0", "optim.g_lr=0.0 is not allowed: expected a number > 0"),
    ("optim.d_lr=-1e-3", "optim.d_lr=-0.001 is not allowed"),
    ("train.batch_size=0", "train.batch_size=0 is not allowed: expected an integer >= 1"),
    ("train.d_train_steps=0", "train.d_train_steps=0 is not allowed"),
    ("train.precision=fp8", "train.precision='fp8' is not allowed: expected one of no, fp16, bf16"),
    ("train.epochs=five", "train.epochs='five' has the wrong type: expected int"),
    ("train.epochs=2.5", "train.epochs=2.5 has the wrong type: expected int"),
    ("train.deterministic=3", "train.deterministic=3 has the wrong type: expected bool"),
    ("train=3", "train must be a section"),
    ("epochs", "is not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "bundle.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+, column \d+: YAML syntax error"):
        load_config(bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_base_chain_is_relative_and_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {epochs: 2}\n")
    (tmp_path / "b.yaml").write_text("train: {epochs: 9, batch_size: 4}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.name) == (2, 4, "a")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_defaults_are_valid_and_documented():
    Config().check()
    text = describe_fields()
    assert "train.batch_size = 600" in text and "global batch" in text


def test_cli_dry_run_prints_resolved_config_and_writes_nothing(tmp_path):
    result = run_cli("train", "--config", str(CONFIGS / "bundle.yaml"), "data.root=/data/MedNIST", "train.epochs=5",
                     f"run_dir={tmp_path / 'run'}", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "root: /data/MedNIST" in result.stdout and "epochs: 5" in result.stdout
    assert not (tmp_path / "run").exists()


def test_cli_bad_value_is_one_line_exit_2_without_traceback():
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), "train.batch_size=0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "train.batch_size=0" in result.stderr and "Traceback" not in result.stderr
    debug = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), "train.batch_size=0", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_yaml_boolean_words_keep_their_meaning(tmp_path):
    cfg = load_config(CONFIGS / "bundle.yaml", ["train.precision=no", "train.deterministic=yes", "data.augment=off"])
    assert cfg.train.precision == "no" and cfg.train.deterministic is True and cfg.data.augment is False
    unquoted = tmp_path / "u.yaml"
    unquoted.write_text("train:\n  precision: no\n")
    assert load_config(unquoted).train.precision == "no"
