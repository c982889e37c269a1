"""Config loading, overlays, overrides and one-line validation errors."""

from __future__ import annotations

import json
import re
import time
import warnings

import pytest
import yaml

from mednist_gan.config import (MAX_YAML_VALUES, Config, ConfigWarning, ModelConfig, check_class_name,
                                config_from_record, describe_fields, load_config, plain_folder_name, read_yaml)
from mednist_gan.errors import CheckpointError, ConfigError

from helpers import CONFIGS, REPO, run_cli, run_main

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
    assert "train.batch_size: 600" in text and "global batch" in text


def _write(path, text: str):
    path.write_text(text)
    return path


def test_cli_dry_run_prints_resolved_config_and_writes_nothing(tmp_path, mednist_root):
    result = run_main("train", "--config", str(CONFIGS / "bundle.yaml"), f"data.root={mednist_root}", "train.epochs=5",
                     f"run_dir={tmp_path / 'run'}", "--dry-run")
    assert result.returncode == 0, result.stderr
    plan, data, *config = result.stdout.splitlines()
    assert plan == f"# dry run, nothing written: trains a new run in {tmp_path / 'run'}"
    hands = len(list((mednist_root / "Hand").glob("*.jpeg")))
    assert data == f"# data: {mednist_root}: Hand {hands:,} images, 64x64 grey"
    assert not [line for line in config if re.search(r": \{.+\}", line)], "a section written inline"
    resolved = yaml.safe_load(result.stdout)
    assert resolved["run_dir"] == str(tmp_path / "run") and resolved["train"]["epochs"] == 5
    assert resolved["model"]["g_channels"] == [32, 16, 8, 1] and not any(k.startswith("resnet_") for k in
                                                                         resolved["model"])
    assert load_config(_write(tmp_path / "again.yaml", result.stdout)).train == load_config(
        CONFIGS / "bundle.yaml", ["train.epochs=5"]).train  # what it prints is a config that loads
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_shows_only_the_chosen_architecture_and_checks_the_classes(tmp_path, mednist_root):
    result = run_main("train", "--config", str(CONFIGS / "resnet.yaml"), f"data.root={mednist_root}", "--dry-run")
    model = yaml.safe_load(result.stdout)["model"]
    assert model["resnet_g_channels"] == 32 and "g_channels" not in model and "d_dropout" not in model
    result = run_main("train", "--config", str(CONFIGS / "conditional.yaml"), "--dry-run")  # the sample: Hand only
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.strip().endswith("no AbdomenCT/ folder with images there (point data.root at the MedNIST "
                                          "folder, or set data.download=true)"), result.stderr


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


def _bomb(levels: int = 8, width: int = 10) -> str:
    """A "billion laughs": each anchor a list of ``width`` aliases of the one before; width**levels values in all."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ndata: {{classes: *a{levels}}}\n"


# Each bad file, and the start of the one line the toolkit says about it.
BAD_FILES = {
    "base_number": (b"base: 5\n", "config file {f}: base: expected a path (a string), got 5"),
    "base_list": (b"base: [a, b]\n", "config file {f}: base: expected a path (a string), got ['a', 'b']"),
    "latin1": ("train:\n  epochs: 2\nname: caf\u00e9\n".encode("latin-1"),
               "config file {f} line 3: not UTF-8 text (byte 0xe9); save it as UTF-8"),
    "section_twice": (b"train:\n  epochs: 2\ntrain:\n  batch_size: 4\n",
                      "config file {f} line 3, column 1: key 'train' appears twice in one mapping"),
    "key_twice": (b"train:\n  epochs: 2\n  epochs: 3\n",
                  "config file {f} line 3, column 3: key 'epochs' appears twice in one mapping"),
    "alias_bomb": (_bomb().encode(),
                   f"config file {{f}} line 5, column 5: more than {MAX_YAML_VALUES} values once aliases"),
    "alias_loop": (b"data: &d {classes: [*d]}\n",
                   "config file {f} line 1, column 7: an alias refers to a node that contains it"),
    "too_large": (b"# " + b"x" * (1 << 20) + b"\n",
                  "config file {f}: larger than 1 MiB, the most a YAML file may hold"),
    "seed_negative": (b"train: {seed: -1}\n", "train.seed=-1 is not allowed: expected an integer in 0..4294967295"),
    "seed_too_large": (b"train: {seed: 100000000000000000000}\n",
                       "train.seed=100000000000000000000 is not allowed: expected an integer in 0..4294967295"),
    "seed_1e20": (b"train: {seed: 1e20}\n", "train.seed='1e20' has the wrong type: expected int"),
    "class_path": (b"data: {classes: [Hand, ../CXR]}\n",
                   "data.classes=['Hand', '../CXR'] is not allowed: expected class folder names (not empty, no '/', "
                   "'\\' or NUL, not starting with '.'): '../CXR' is not one"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_config_files_are_one_line_errors(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.monotonic() - start < 5
    assert str(err.value).startswith(message.format(f=path)), str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize("case", ["base_number", "latin1", "section_twice", "alias_bomb", "seed_negative",
                                  "class_path"])
def test_bad_config_files_are_one_line_on_the_cli(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    result = run_cli("train", "--config", str(path), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("mednist-gan: error: " + message.format(f=path)), result.stderr


def test_a_base_file_of_another_encoding_or_with_duplicates_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file .*b\.yaml line 1: not UTF-8 text"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("train: {epochs: 1, epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"b\.yaml line 1, column 20: key 'epochs' appears twice"):
        load_config(tmp_path / "a.yaml")


def test_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("x: &x {epochs: 2, batch_size: 4}\nsweep:\n  <<: *x\n  epochs: 3\n")
    assert read_yaml(path, "sweep file")["sweep"] == {"epochs": 3, "batch_size": 4}
    path.write_text("x: &x [1, 2]\ny: [*x, *x]\n")  # aliases used a few times are fine
    assert read_yaml(path)["y"] == [[1, 2], [1, 2]]


def test_sweep_files_are_read_as_strictly(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("trials: 2\ntrials: 3\n")
    with pytest.raises(ConfigError, match=r"^sweep file .*s\.yaml line 2, column 1: key 'trials' appears twice"):
        read_yaml(path, "sweep file")


@pytest.mark.parametrize("override, message", [
    ("optim.betas={a: 1, a: 2}", "override 'optim.betas={a: 1, a: 2}': key 'a' appears twice in one mapping"),
    ("train.seed=-1", "train.seed=-1 is not allowed: expected an integer in 0..4294967295"),
    ("train.seed=4294967296", "train.seed=4294967296 is not allowed: expected an integer in 0..4294967295"),
    ("train.seed=1e20", "train.seed='1e20' has the wrong type: expected int"),
    ("data.classes=[Hand, '']", "'' is not one"),
    ("data.classes=[.]", "'.' is not one"),
    ("data.classes=[..]", "'..' is not one"),
    ("data.classes=[.Hand]", "'.Hand' is not one"),
    ("data.classes=['a\\b']", "'a\\\\b' is not one"),
    ("data.classes=[Hand, CXR/x]", "'CXR/x' is not one"),
    ("data.class_weights={Hand:2}", "data.class_weights.Hand:2=null is not allowed: expected float "
                                    "(YAML reads Hand:2 as one key; write {Hand: 2})"),
    ('data.classes=["a\\0b"]', "'a\\x00b' is not one"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_seed_bounds_are_allowed():
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 4294967295
    assert load_config(None, ["train.seed=0"]).train.seed == 0


def test_long_values_are_cut_in_error_messages(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.classes=[" + ", ".join(["Hand"] * 10_000) + "]"])
    assert len(str(err.value)) < 300 and "..." in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=" + "x" * 100_000])
    assert str(err.value).startswith("train.epochs='xxx") and len(str(err.value)) < 300
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  ? " + "k" * 10_000 + "\n  : 1\n")  # an explicit key: it may be this long
    with pytest.raises(ConfigError, match="unknown config key 'train.kkk") as err:
        load_config(path)
    assert "k" * 100 not in str(err.value)


def test_plain_folder_names():
    for good in ("Hand", "AbdomenCT", "all", "a b", "x.y"):
        assert plain_folder_name(good)
        check_class_name(good, "export.json")
    for bad in ("", ".", "..", ".x", "a/b", "a\\b", "a\0b", None, 3):
        assert not plain_folder_name(bad)
    with pytest.raises(ConfigError,
                       match=r"^export\.json: class name '\.\./x' is not allowed: expected a plain folder name"):
        check_class_name("../x", "export.json")
    with pytest.raises(CheckpointError, match="class name '' is not allowed"):
        check_class_name("", "export.json", CheckpointError)


FIXTURE_RECORD = REPO / "tests" / "fixtures" / "v0.1.0_run" / "checkpoints" / "step_000002" / "checkpoint.json"


def test_records_of_earlier_versions_build_without_warnings():
    config = json.loads(FIXTURE_RECORD.read_text())["config"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = config_from_record(config, FIXTURE_RECORD)
        model = ModelConfig.from_record(config["model"], FIXTURE_RECORD)
    assert cfg.model == model and model.latent_size == 8 and "cpu_phase_split" in config["model"]
    assert cfg.data.classes == ["Hand"] and cfg.runtime.channels_last is True and cfg.train.ema_decay == 0.9


def test_records_of_newer_versions_ignore_unknown_keys_with_one_warning(tmp_path):
    config = Config().to_dict()
    config["model"]["future_width"] = 3
    config["train"]["future_flag"] = True
    config["future_section"] = {"x": 1}
    source = tmp_path / "checkpoint.json"
    with pytest.warns(ConfigWarning) as caught:
        cfg = config_from_record(config, source)
    assert cfg == Config() and len(caught) == 1
    assert str(caught[0].message) == (f"{source}: ignoring config keys this version does not know (a newer version "
                                      "wrote them): model.future_width, train.future_flag, future_section")
    with pytest.warns(ConfigWarning, match=r"export\.json: ignoring config keys .*: model\.future_width$"):
        assert ModelConfig.from_record(config["model"], "export.json") == ModelConfig()
    # a user's config still refuses it
    with pytest.raises(ConfigError, match="unknown config key 'model.future_width'"):
        load_config(None, ["model.future_width=3"])


def test_records_with_bad_values_name_the_file():
    with pytest.raises(ConfigError, match=r"^export\.json: recorded model\.arch='gan' is not allowed: expected one of"):
        ModelConfig.from_record({"arch": "gan"}, "export.json")
    with pytest.raises(ConfigError, match=r"^checkpoint\.json: the recorded config is not a mapping of keys"):
        config_from_record([1, 2], "checkpoint.json")
    with pytest.raises(ConfigError, match=r"^checkpoint\.json: the recorded model is not a mapping of keys"):
        ModelConfig.from_record(None, "checkpoint.json")
