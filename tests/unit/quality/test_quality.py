"""Quality metrics: the shipped classifier, FMD/KID/diversity sanity on real images, evaluate, in-training eval."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mednist_gan.errors import MednistGanError
from mednist_gan.quality.classifier import CARD_JSON, WEIGHTS_FILE, accuracy, load_classifier, load_split
from mednist_gan.quality.evaluate import NAME_WIDTH, format_table, load_real_images
from mednist_gan.quality.scores import diversity, fmd

from helpers import REPO, run_cli, run_main
from stand_ins import ForeignGenerator

sys.path.insert(0, str(REPO / "benchmarks"))  # metric_sanity.py and quality_targets.py, imported where used
N = 1000  # images per side in the sanity checks


def test_shipped_classifier_matches_its_card_and_accuracy(mednist_root):
    card = json.loads(CARD_JSON.read_text())
    assert hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest() == card["sha256"]
    assert card["command"].startswith("mednist-gan train-classifier --data-root ")
    holdout = float(card["split"].split("%")[0].split()[-1]) / 100
    split = load_split(mednist_root, holdout, card["training"]["seed"])
    got = accuracy(load_classifier(), *split["test"])
    assert got >= 0.99
    assert got == pytest.approx(card["results"]["test_accuracy"], abs=1e-9)  # the held-out split it reports


def test_fmd_is_monais_frechet_distance():
    from monai.metrics import FIDMetric

    g = torch.Generator().manual_seed(0)
    for n, d in [(400, 320), (50, 320), (300, 4)]:  # 50 x 320: a singular covariance
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.2 + 0.3
        try:
            expected = float(FIDMetric()(a, b))
        except TypeError as exc:  # MONAI 1.6 passes scipy.linalg.sqrtm a keyword newer SciPy dropped
            pytest.skip(f"monai's FIDMetric does not run with this SciPy: {exc}")
        assert fmd(a, b) == pytest.approx(expected, rel=1e-7)
    assert fmd(a, a) == pytest.approx(0, abs=1e-6)


def test_fmd_of_a_singular_covariance_product_warns_nothing_and_stays_right():
    """Features dead on every image (a ReLU channel a noisy generator never lights up) make the covariance
    product singular; SciPy's sqrtm warned (LinAlgWarning, printed by `evaluate` on the built-in sample).
    FMD now takes the FID implementations' way out (eps on the diagonals): no warning, and the dead features
    change the distance by no more than round-off, as they should (they are equal, zero, on both sides)."""
    import warnings

    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, 20, generator=g, dtype=torch.float64)
    b = torch.randn(200, 20, generator=g, dtype=torch.float64) * 1.1 + 0.2
    dead = torch.zeros(200, 12, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_dead = fmd(torch.cat([a, dead], 1), torch.cat([b, dead], 1))
        assert fmd(torch.cat([a, dead], 1), torch.cat([a, dead], 1)) == pytest.approx(0, abs=1e-4)
    assert with_dead == pytest.approx(fmd(a, b), rel=1e-4)


def test_diversity_separates_real_images_from_a_collapsed_generator(hand_halves, hand_meter):
    real = hand_meter.real_diversity
    assert 0.0 < real < 0.5
    assert diversity(hand_halves[1]) == pytest.approx(real, abs=0.05)  # two halves of the same data agree
    collapsed = hand_halves[1][:1].repeat(200, 1, 1, 1) + 0.01 * torch.rand(200, 1, 64, 64)
    assert diversity(collapsed.clamp(0, 1)) > 0.9 > 2 * real


@pytest.mark.parametrize("args, message", [
    (["--real-dir", "/nonexistent"], "--real-dir /nonexistent: no such folder"),
    (["--num-samples", "1000"], "needs 2 x 1000 real images"),
    (["--num-samples", "1"], "expected an integer >= 2"),
    (["--blurred", "0"], "--blurred 0: expected Gaussian sigmas > 0"),
])
def test_evaluate_bad_input_is_one_line(tmp_path, upstream_weights, args, message):
    result = run_main("evaluate", "--model", str(upstream_weights), "--out", str(tmp_path / "e.json"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


def test_foreign_generators_latent_size_and_interface_are_checked_in_one_line(tmp_path):
    from mednist_gan.errors import MednistGanError
    from mednist_gan.generator.generate import generate
    from mednist_gan.generator.loader import open_generator
    from mednist_gan.quality.evaluate import sample_images

    pt2 = tmp_path / "foreign.pt2"
    program = torch.export.export(ForeignGenerator(16).eval().requires_grad_(False), (torch.randn(2, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(pt2))
    opened = open_generator(pt2)  # read from the program's input shape
    net, size = opened.network, opened.latent_size
    assert size == 16 and net(torch.randn(3, 16)).shape == (3, 1, 64, 64)
    with pytest.raises(MednistGanError, match="--latent-size 8: --model .*foreign.pt2 takes latents of size 16"):
        open_generator(pt2, latent_size=8)
    assert len(generate(pt2, 3, tmp_path / "png")) == 3
    ts = tmp_path / "foreign.ts"
    torch.jit.script(ForeignGenerator(16).eval()).save(str(ts))
    with pytest.raises(MednistGanError, match=r"failed on latents of shape \(3, 17\)"):
        generate(ts, 3, tmp_path / "png17", latent_size=17)  # the wrong size for this module
    small = tmp_path / "small.ts"
    torch.jit.script(ForeignGenerator(16, size=32).eval()).save(str(small))
    opened = open_generator(small, latent_size=16)
    net, size = opened.network, opened.latent_size
    with pytest.raises(MednistGanError,
                       match=r"returned \(10, 1, 32, 32\) for 10 latents; expected images \(10, 1, 64, 64\)"):
        sample_images(net, size, 10, 0, "normal", source=small)


@pytest.mark.parametrize("args, message", [
    (["--class", "Knee"], "--class Knee: no folder"),
    (["--class", "all"], "an unconditional generator (one class); scoring it against 6 classes"),
    (["--usefulness"], "--usefulness: needs class-conditional generators scored on all six classes"),
])
def test_evaluate_per_class_bad_input_is_one_line(tmp_path, mednist_root, upstream_weights, args, message):
    result = run_main("evaluate", "--model", str(upstream_weights), "--real-dir", str(mednist_root),
                     "--out", str(tmp_path / "e.json"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the shipped generator

SHIPPED = WEIGHTS_FILE.parent / "generator"


def test_shipped_generator_works_out_of_the_box(tmp_path):
    result = run_cli("generate", "--num-samples", "4", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    pictures = sorted((tmp_path / "out").glob("sample_*.png"))
    assert len(pictures) == 4
    from PIL import Image

    with Image.open(pictures[0]) as im:
        assert (im.mode, im.size) == ("L", (64, 64))


def test_shipped_generator_is_a_bundle_generator_and_its_files_agree():
    from monai.networks.nets import Generator

    state = torch.load(SHIPPED / "model.pt", map_location="cpu", weights_only=True)
    net = Generator(latent_shape=64, start_shape=[64, 8, 8], channels=[32, 16, 8, 1], strides=[2, 2, 2, 1])
    net.load_state_dict(state, strict=True)  # interchangeable with the seed bundle's models/model.pt
    ts = torch.jit.load(str(SHIPPED / "mednist_gan.ts"))
    z = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ts(z), torch.sigmoid(net.eval()(z)), atol=1e-5)
    provenance = json.loads((SHIPPED / "export.json").read_text())
    assert provenance["files"]["model.pt"]["sha256"] == hashlib.sha256((SHIPPED / "model.pt").read_bytes()).hexdigest()
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "configs/quality.yaml" in card and "CC BY-SA 4.0" in card


# ----------------------------------------------------------------------------- the shipped residual Hand generator

HAND = WEIGHTS_FILE.parent / "hand"


def test_shipped_hand_generator_is_the_default_and_its_files_agree():
    from mednist_gan.generator.generate import SHIPPED_MODEL
    from mednist_gan.generator.loader import open_generator
    from mednist_gan.models.networks import ResNetGenerator

    assert SHIPPED_MODEL == HAND / "mednist_gan.ts"
    generator = open_generator(HAND / "model.pt").network  # the architecture from the export.json beside it
    assert isinstance(generator, ResNetGenerator) and generator.num_classes == 0
    ts = torch.jit.load(str(HAND / "mednist_gan.ts"))
    z = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = ts(z)
        assert images.shape == (8, 1, 64, 64) and 0 <= images.min() and images.max() <= 1
        assert torch.allclose(images, generator(z), atol=1e-5)
    assert_shipped_files_agree(HAND, "configs/resnet.yaml")


def assert_shipped_files_agree(folder, recipe: str) -> None:
    """A shipped residual generator's folder: both files are the ones its export.json records, and its card names
    the recipe and the data's licence."""
    provenance = json.loads((folder / "export.json").read_text())
    for name in ("model.pt", "mednist_gan.ts"):
        assert provenance["files"][name]["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    card = (folder / "MODEL_CARD.md").read_text()
    assert recipe in card and "CC BY-SA 4.0" in card


# ----------------------------------------------------------------------------- the shipped six-class generator

CONDITIONAL = WEIGHTS_FILE.parent / "conditional"


def test_shipped_conditional_generator_is_the_default_with_a_class_and_its_files_agree():
    from mednist_gan.config import MEDNIST_CLASSES
    from mednist_gan.generator.generate import SHIPPED_CONDITIONAL, SHIPPED_MODEL, shipped_model
    from mednist_gan.generator.loader import open_generator
    from mednist_gan.models.networks import ResNetGenerator

    assert shipped_model() == shipped_model("Hand") == (SHIPPED_MODEL, None)
    assert shipped_model("CXR") == (SHIPPED_CONDITIONAL, "CXR")
    assert SHIPPED_CONDITIONAL == CONDITIONAL / "mednist_gan.ts"
    assert shipped_model("all") == (SHIPPED_CONDITIONAL, "all")
    assert open_generator(SHIPPED_CONDITIONAL).classes == list(MEDNIST_CLASSES)
    generator = open_generator(CONDITIONAL / "model.pt").network
    assert isinstance(generator, ResNetGenerator) and generator.num_classes == 6
    ts = torch.jit.load(str(CONDITIONAL / "mednist_gan.ts"))
    z = torch.randn(12, 128, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6).repeat(2)
    with torch.no_grad():
        images = ts(z, labels)
        assert images.shape == (12, 1, 64, 64) and 0 <= images.min() and images.max() <= 1
        assert torch.allclose(images, generator(z, labels), atol=1e-5)
    assert_shipped_files_agree(CONDITIONAL, "configs/conditional.yaml")


def test_generate_class_hand_uses_the_shipped_generator_with_the_closer_hands(hand_meter, tmp_path):
    """`generate --class Hand` without --model takes the generator whose hands score closer to real ones, by FD-SSL
    and by SWD (pixel patches) at N = 1000, and writes what that generator makes; other classes come from the
    six-class one. Shipping a six-class generator with better hands fails this until the rule changes."""
    from mednist_gan.generator.generate import SHIPPED_CONDITIONAL, SHIPPED_ONE_CLASS, shipped_model
    from mednist_gan.generator.loader import open_generator
    from mednist_gan.quality.evaluate import sample_images

    def hands(path: Path):
        opened = open_generator(path)
        images = sample_images(opened.network, opened.latent_size, 1000, 1, "normal", source=path,
                               label=opened.label("Hand"))
        return hand_meter.score(images)

    for class_name, one_class in SHIPPED_ONE_CLASS.items():
        assert class_name == "Hand"  # the only class with a shipped one-class generator
        own, six = hands(one_class), hands(SHIPPED_CONDITIONAL)
        better = own.fd_ssl < six.fd_ssl and own.swd < six.swd
        assert better == (shipped_model("Hand")[0] == one_class), (own, six)
    result = run_cli("generate", "--class", "Hand", "--num-samples", "3", "--output-dir", str(tmp_path / "class"))
    assert result.returncode == 0, result.stderr
    result = run_cli("generate", "--num-samples", "3", "--output-dir", str(tmp_path / "default"))
    assert result.returncode == 0, result.stderr
    for name in ("sample_00000.png", "sample_00001.png", "sample_00002.png"):
        assert (tmp_path / "class" / name).read_bytes() == (tmp_path / "default" / name).read_bytes()


def test_generate_with_a_class_and_no_model_makes_that_class(tmp_path):
    """`mednist-gan generate --class all` without --model: each class's folder holds images the shipped classifier
    takes for that class (7 of 8 at least: its class accuracy is 99.7-100% at N = 5000)."""
    from mednist_gan.quality.classifier import CLASSES, to_evaluation_pixels

    result = run_cli("generate", "--class", "all", "--num-samples", "8", "--output-dir", str(tmp_path / "out"),
                     "--grid", str(tmp_path / "grid.png"))
    assert result.returncode == 0, result.stderr
    classifier = load_classifier()
    for index, name in enumerate(CLASSES):
        images = load_real_images(tmp_path / "out" / name, cache_dir=None)
        assert len(images) == 8
        with torch.no_grad():
            assert (classifier(to_evaluation_pixels(images)).argmax(1) == index).sum() >= 7, name
    from PIL import Image

    from mednist_gan.images import label_margin

    with Image.open(tmp_path / "grid.png") as grid:  # a row of 8 per class: 64-pixel tiles, 2-pixel borders,
        assert grid.size == (label_margin(CLASSES) + 8 * 66 + 2, 6 * 66 + 2)  # after a margin naming the classes


# ----------------------------------------------------------------------------- issue #17's six-class targets

def test_conditional_targets_name_every_class_and_catch_a_collapse():
    """benchmarks/quality_targets.py --conditional's arithmetic on an evaluate result: five targets per class and
    train-on-synthetic; a class whose images are near-copies fails diversity; memorization is held to 2x the floor."""
    from quality_targets import conditional_targets

    def block(name, diversity, fd_ssl, memo=0.001):
        floor = {"model": None, "name": "real vs real (floor)", "memorization_pixels": 0.01,
                 "memorization_encoder": 0.01}
        blur = {"model": None, "name": "real blurred, sigma 1.5", "fd_ssl": 0.4}
        model = {"model": "g.pt", "name": "g", "class_accuracy": 0.99, "diversity": diversity, "fd_ssl": fd_ssl,
                 "memorization_pixels": memo, "memorization_encoder": 0.0}
        return {"class": name, "real_diversity": 0.3, "rows": [floor, blur, model]}

    result = {"classes": [block("CXR", 0.31, 0.55), block("Hand", 0.45, 0.3), block("HeadCT", 0.3, 0.61, memo=0.021)],
              "usefulness": {"g": {"synthetic_accuracy": {"all": 0.96}, "real_accuracy": {"all": 0.99}}}}
    targets = conditional_targets(result)
    failed = [name for name, _, _, met in targets if not met]
    assert len(targets) == 3 * 5 + 1
    assert failed == ["Hand: MS-SSIM diversity within 10% of the real images' (0.3000)",
                      "HeadCT: FD-SSL at most 1.5x real images blurred with sigma 1.5 (0.400)",
                      "HeadCT: memorization (pixels) at most 2x the real held-out images' (1.00%)"]
    strict = [name for name, _, _, met in conditional_targets(result, fd_vs_blurred=1.0) if not met]
    assert "CXR: FD-SSL at most 1x real images blurred with sigma 1.5 (0.400)" in strict  # 0.55: within 1.5x only


def test_one_class_bar_holds_the_six_class_hands_to_the_hand_generators():
    """--one-class-bar (issue #38): the six-class generator's Hand FD-SSL at most 1.5x the one-class generator's,
    whose own diversity must be within 10% of the real images'."""
    from quality_targets import one_class_targets

    six = {"classes": [{"class": "Hand", "rows": [{"model": None, "fd_ssl": 0.02}, {"model": "c.pt", "fd_ssl": 0.46}]}]}
    one = {"real_diversity": 0.37, "rows": [{"model": None, "fd_ssl": 0.02}, {"model": "h.pt", "fd_ssl": 0.15,
                                                                              "diversity": 0.38}]}
    (fidelity, diversity) = one_class_targets(six, one)
    assert fidelity[1:] == (0.46, pytest.approx(0.225), False) and diversity[3]
    one["rows"][1].update(fd_ssl=0.31, diversity=0.45)
    (fidelity, diversity) = one_class_targets(six, one)
    assert fidelity[3] and not diversity[3]


def test_class_diversity_scores_each_class_of_a_conditional_generator(tmp_path, mednist_root):
    """benchmarks/class_diversity.py: a row per class with the generated and real images' MS-SSIM; a collapsed
    generator (its latents ignored) reads 1.0, far above any real class; an unconditional one is refused."""
    import dataclasses

    from class_diversity import class_diversity

    from mednist_gan.config import ModelConfig
    from mednist_gan.generator.export import export_generator
    from mednist_gan.models.networks import build_generator

    cfg = ModelConfig(arch="resnet", latent_size=16, resnet_g_channels=2, resnet_d_channels=2, classes=["CXR", "Hand"])
    torch.manual_seed(0)
    G = build_generator(cfg).eval()
    out = export_generator(G, cfg, tmp_path / "varied", {"config": {"model": dataclasses.asdict(cfg)}})
    rows = class_diversity(out / "model.pt", mednist_root, num_samples=8, num_real=16, pairs=20)
    assert [name for name, _, _ in rows] == ["CXR", "Hand"]
    assert all(0 < real < 0.9 for _, _, real in rows), rows
    with torch.no_grad():
        G.linear.weight.zero_()  # every latent gives the class's one image
    collapsed = export_generator(G, cfg, tmp_path / "collapsed", {"config": {"model": dataclasses.asdict(cfg)}})
    assert all(generated > 0.99 for _, generated, _ in class_diversity(collapsed / "model.pt", mednist_root, 8, 16, 20))
    with pytest.raises(SystemExit, match="not a class-conditional generator"):
        class_diversity(WEIGHTS_FILE.parent / "hand" / "model.pt", mednist_root, 4, 4, 4)


# ----------------------------------------------------------------------------- evaluate's table and its legend

def _row(name: str, latent, model=None, memorization=0.01, accuracy=0.99) -> dict:
    """A row as evaluate's JSON holds it: the same keys, distinct values (KID small, as it is)."""
    from dataclasses import fields

    from mednist_gan.quality.scores import Scores

    scores = {f.name: round(0.1 * (i + 1), 4) for i, f in enumerate(fields(Scores))}
    scores.update(kid=0.00123, kid_ssl=0.00456)
    memorization = None if latent == "blurred" else memorization
    return {"name": name, "model": model, "latent": latent, **scores, "memorization_pixels": memorization,
            "memorization_encoder": memorization, "class_accuracy": accuracy,
            "memorization": {"pixels": {"share": memorization}, "encoder": {"share": memorization}}}


def _result(*extra: dict, class_name="Hand", memorization=0.01) -> dict:
    accuracy = None if class_name is None else 0.99
    rows = [_row("real vs real (floor)", None, memorization=memorization, accuracy=accuracy), *extra,
            _row("runs/x/export/mednist_gan.ts", "normal", "runs/x/export/mednist_gan.ts", memorization, accuracy)]
    return {"seed": 0, "classifier": "shipped", "encoder": "shipped", "feature_size": 320,
            "memorization_percentile": 1.0, "class": class_name, "num_samples": 100, "real_dir": "sample/Hand",
            "real_images": 200, "real_diversity": 0.34, "rows": rows}


BLURRED = _row("real blurred, sigma 1.5", "blurred")
BASELINE = [_row("baseline seed.pt", latent, "seed.pt") for latent in ("normal", "uniform")]


def _legend(result: dict) -> list[str]:
    """The lines format_table prints under the table's rows."""
    return format_table(result).splitlines()[2 + len(result["rows"]):]


def test_evaluate_table_columns_are_the_json_keys_and_show_their_values():
    """One name per measure: each column is headed by its row key in the JSON and shows that value (KID unscaled),
    '-' for null; the legend names no measure the table does not show (kid_ssl: JSON only)."""
    result = _result(BLURRED, *BASELINE)
    lines = format_table(result).splitlines()
    header = lines[1].split()
    assert header == ["name", "latent", "fmd", "fd_ssl", "swd", "kid", "precision", "recall", "density", "coverage",
                      "diversity", "memorization_pixels", "memorization_encoder", "class_accuracy"]
    for row, line in zip(result["rows"], lines[2:]):
        assert set(header) <= set(row)
        assert line[:NAME_WIDTH].rstrip() == row["name"][:NAME_WIDTH]
        cells = line[NAME_WIDTH:].split()
        assert len(cells) == len(header) - 1, line
        for key, cell in zip(header[1:], cells):
            if row[key] is None:
                assert cell == "-", (key, line)
            elif isinstance(row[key], str):
                assert cell == row[key]
            else:
                decimals = len(cell.partition(".")[2])
                assert float(cell) == pytest.approx(row[key], abs=0.51 * 10 ** -decimals), (key, cell, row[key])
    named = set(re.findall(r"\w+", " ".join(_legend(result)))) & (set(result["rows"][0]) - {"memorization"})
    assert named <= set(header), named - set(header)  # "memorization" alone is the word, not the JSON dict


def test_evaluate_legend_has_lines_only_for_the_rows_and_columns_shown():
    plain = _legend(_result())  # no --blurred, no --baseline; a class; enough real images for memorization
    assert not [line for line in plain if line.startswith(("real blurred", "baseline")) or "'-'" in line], plain
    assert sum(line.startswith("real vs real (floor)") for line in plain) == 1
    assert sum(line.startswith("class_accuracy:") for line in plain) == 1
    everything = _legend(_result(BLURRED, *BASELINE))
    assert [line for line in everything if line not in plain] == [
        "real blurred, sigma S (--blurred): the floor's real images blurred, a yardstick (memorization '-')",
        "baseline (--baseline): a generator to compare with, sampled with normal and uniform latents"]
    # No class: class_accuracy is '-' in every row, and the legend says why instead of what it would be.
    unclassed = _legend(_result(class_name=None))
    assert not any(line.startswith("class_accuracy:") for line in unclassed)
    assert sum(line.startswith("class_accuracy '-'") for line in unclassed) == 1
    # Too few real images for memorization: its line says what '-' means; a blurred row's own '-' does not need it.
    assert "; '-': fewer than 101 real images" in _legend(_result(memorization=None))[1]
    assert "fewer than 101" not in " ".join(_legend(_result(BLURRED)))
    # Several classes: one legend under all blocks, a line per kind of row in any of them.
    blocks = [_result(class_name="CXR"), _result(BLURRED, class_name="Hand")]
    several = {"memorization_percentile": 1.0, "classes": blocks}
    lines = format_table(several).splitlines()
    assert lines[-len(_legend(blocks[1])):] == _legend(blocks[1])
    assert sum(line.startswith("real blurred, sigma S") for line in lines) == 1


def test_images_of_another_size_are_scored_at_64_after_area_interpolation(tmp_path):
    from PIL import Image

    from mednist_gan.images import to_uint8
    from mednist_gan.quality.classifier import to_evaluation_pixels

    images = torch.rand(3, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    levels = to_uint8(images).double() / 255  # what a saved PNG holds
    blocks = levels.reshape(3, 1, 64, 2, 64, 2).mean(dim=(3, 5))  # each 2x2 block's mean
    assert torch.allclose(to_evaluation_pixels(images).double(), blocks, atol=1e-6)
    assert to_evaluation_pixels(images[:, :, :64, :64]).shape == (3, 1, 64, 64)
    folder = tmp_path / "Hand"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((128, 128), 40 * (i + 1), np.uint8)).save(folder / f"{i}.png")
    assert load_real_images(folder, None).shape == (2, 1, 128, 128)
    Image.fromarray(np.zeros((128, 96), np.uint8)).save(folder / "0.png")
    with pytest.raises(MednistGanError, match=r"0.png: 96x128; expected square images"):
        load_real_images(folder, None)


def test_the_sanity_tables_known_order_check():
    """benchmarks/metric_sanity.py's verdict per measure: floor < each blur in turn, every damaged row above the
    floor; the two-sample test's ceiling (AUC 1.0) may tie."""
    from metric_sanity import DAMAGED, FLOOR, known_order_holds

    rows = {FLOOR: {"fd_ssl": 0.1, "c2st": 0.5}}
    rows.update({name: {"fd_ssl": 1.0 + i, "c2st": 1.0} for i, name in enumerate(DAMAGED)})
    assert known_order_holds(rows, "fd_ssl") and known_order_holds(rows, "c2st")
    rows["blurred, sigma 1.0"]["fd_ssl"] = 0.5  # below sigma 0.5's
    assert not known_order_holds(rows, "fd_ssl")
    rows["transposed"]["c2st"] = 0.4  # below the floor
    assert not known_order_holds(rows, "c2st")


def test_the_sanity_tables_rank_agreement_is_spearmans():
    from metric_sanity import rank_agreement

    rows = {name: {"fd_ssl": float(i), "swd": 10.0 * i, "fmd": -float(i)} for i, name in enumerate("abcde")}
    assert rank_agreement(rows, "swd") == 1.0 and rank_agreement(rows, "fmd") == -1.0
    rows["a"]["swd"], rows["b"]["swd"] = rows["b"]["swd"], rows["a"]["swd"]  # one pair swapped: 1 - 6 * 2 / 120
    assert rank_agreement(rows, "swd") == pytest.approx(0.9)
