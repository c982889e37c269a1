"""Quality metrics: the shipped classifier, FMD/KID/diversity sanity on real images, evaluate, in-training eval."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from monai.transforms import GaussianSmooth

from mednist_gan.classifier import CARD_JSON, WEIGHTS_FILE, accuracy, load_classifier, load_split, train_classifier
from mednist_gan.config import load_config
from mednist_gan.quality import QualityMeter, diversity, fmd, load_real_images, split_halves
from mednist_gan.trainer import train

from helpers import CONFIGS, run_cli

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


@pytest.mark.slow
def test_classifier_training_is_reproducible(tmp_path, mednist_root):
    # the same file name in two folders: torch.save writes the name into the archive
    runs = [train_classifier(mednist_root, tmp_path / f"run{i}" / "c.pt", epochs=1, limit_per_class=40,
                             log=lambda _: None) for i in range(2)]
    assert runs[0]["sha256"] == runs[1]["sha256"]
    assert json.loads((tmp_path / "run0" / "c.json").read_text())["results"]["test_images"] == 24


@pytest.fixture(scope="module")
def hands(mednist_root):
    real = load_real_images(mednist_root / "Hand")
    return split_halves(real, N, seed=0)


@pytest.fixture(scope="module")
def meter(hands):
    return QualityMeter(hands[0])


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


@pytest.mark.slow
def test_fmd_and_kid_rank_damaged_real_images_behind_the_floor(hands, meter):
    """Upside-down, transposed and blurred real hands score clearly worse than real ones; noise worst."""
    other = hands[1]
    floor = meter.score(other)
    damaged = {
        "upside_down": other.flip(-1),  # MONAI orientation: the picture's rows run along the last axis
        "transposed": other.transpose(-1, -2),
        "blurred": GaussianSmooth(sigma=1.5)(other),
        "noise": torch.rand_like(other),
    }
    scores = {name: meter.score(images) for name, images in damaged.items()}
    for name in ("upside_down", "transposed", "blurred"):
        assert scores[name].fmd > 5 * floor.fmd + 1, (name, scores[name], floor)
        assert scores[name].kid > 5 * abs(floor.kid) + 1e-3, (name, scores[name], floor)
    assert scores["noise"].fmd > 5 * max(s.fmd for n, s in scores.items() if n != "noise")
    assert floor.fmd >= 0 and math.isfinite(floor.fmd)


def test_diversity_separates_real_images_from_a_collapsed_generator(hands, meter):
    real = meter.real_diversity
    assert 0.0 < real < 0.5
    assert diversity(hands[1]) == pytest.approx(real, abs=0.05)  # two halves of the same data agree
    collapsed = hands[1][:1].repeat(200, 1, 1, 1) + 0.01 * torch.rand(200, 1, 64, 64)
    assert diversity(collapsed.clamp(0, 1)) > 0.9 > 2 * real


@pytest.mark.slow
def test_evaluate_command_table_and_json(tmp_path, mednist_root, upstream_weights):
    out = tmp_path / "eval.json"
    result = run_cli("evaluate", "--model", str(upstream_weights), "--real-dir", str(mednist_root / "Hand"),
                     "--num-samples", "300", "--latent", "both", "--baseline", str(upstream_weights), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "real vs real (floor)" in result.stdout and "FMD" in result.stdout
    data = json.loads(out.read_text())
    assert data["num_samples"] == 300 and data["feature_size"] == 320
    names = [(r["name"], r["latent"]) for r in data["rows"]]
    assert names[0] == ("real vs real (floor)", None)
    assert [latent for _, latent in names[1:]] == ["normal", "uniform", "normal", "uniform"]
    floor, normal, uniform = (data["rows"][i]["fmd"] for i in range(3))
    assert floor < normal < uniform  # the seed's own training latents beat the uniform ones it samples with
    assert data["rows"][1]["fmd"] == data["rows"][3]["fmd"]  # the same weights and seed: the same numbers


@pytest.mark.parametrize("args, message", [
    (["--real-dir", "/nonexistent"], "--real-dir /nonexistent: no such folder"),
    (["--num-samples", "1000"], "needs 2 x 1000 real images"),
    (["--num-samples", "1"], "expected an integer >= 2"),
])
def test_evaluate_bad_input_is_one_line(tmp_path, upstream_weights, args, message):
    result = run_cli("evaluate", "--model", str(upstream_weights), "--out", str(tmp_path / "e.json"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


class ForeignGenerator(torch.nn.Module):
    """A generator of another structure than MONAI's (no ``linear.weight``) that keeps the documented interface:
    latents (N, L) -> images (N, 1, size, size) in [0, 1]."""

    def __init__(self, latent_size: int = 16, size: int = 64):
        super().__init__()
        self.size = size
        self.basis = torch.nn.Parameter(torch.randn(latent_size, size * size, generator=torch.Generator().manual_seed(0)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(latents @ self.basis).reshape(-1, 1, self.size, self.size)


@pytest.mark.slow
def test_evaluate_takes_any_generator_with_the_documented_interface(tmp_path):
    """A hand-written TorchScript generator: its latent size comes from --latent-size (a one-line error without
    it); a .pt2 program tells its own. Nothing but the table goes to the terminal (no bar, no warning)."""
    ts = tmp_path / "foreign.ts"
    torch.jit.script(ForeignGenerator().eval()).save(str(ts))
    base = ["evaluate", "--model", str(ts), "--num-samples", "40", "--out", str(tmp_path / "e.json")]
    result = run_cli(*base)
    assert result.returncode == 2, result.stderr
    assert "give it with --latent-size" in result.stderr and str(ts) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    result = run_cli(*base, "--latent-size", "16")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert rows[1]["model"] == str(ts) and math.isfinite(rows[1]["fmd"]) and 0 < rows[1]["diversity"] <= 1


def test_foreign_generators_latent_size_and_interface_are_checked_in_one_line(tmp_path):
    from mednist_gan.errors import MednistGanError
    from mednist_gan.generate import generate, load_model
    from mednist_gan.quality import sample_images

    pt2 = tmp_path / "foreign.pt2"
    program = torch.export.export(ForeignGenerator(16).eval().requires_grad_(False), (torch.randn(2, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(pt2))
    net, size = load_model(pt2)  # read from the program's input shape
    assert size == 16 and net(torch.randn(3, 16)).shape == (3, 1, 64, 64)
    with pytest.raises(MednistGanError, match="--latent-size 8: --model .*foreign.pt2 takes latents of size 16"):
        load_model(pt2, latent_size=8)
    assert len(generate(pt2, 3, tmp_path / "png")) == 3
    ts = tmp_path / "foreign.ts"
    torch.jit.script(ForeignGenerator(16).eval()).save(str(ts))
    with pytest.raises(MednistGanError, match=r"failed on latents of shape \(3, 17\)"):
        generate(ts, 3, tmp_path / "png17", latent_size=17)  # the wrong size for this module
    small = tmp_path / "small.ts"
    torch.jit.script(ForeignGenerator(16, size=32).eval()).save(str(small))
    net, size = load_model(small, latent_size=16)
    with pytest.raises(MednistGanError, match=r"returned \(10, 1, 32, 32\) for 10 latents; expected images \(10, 1, 64, 64\)"):
        sample_images(net, size, 10, 0, "normal", source=small)


@pytest.mark.slow
def test_in_training_evaluation_logs_and_keeps_the_best(tmp_path, mednist_root, debug_overrides):
    cfg = load_config(CONFIGS / "debug.yaml", [*debug_overrides, "eval.every_steps=2", "eval.num_samples=32",
                                               "train.ema_decay=0.5", "log.sample_every=null"])
    train(cfg)
    logged = [json.loads(line) for line in (cfg.run_path / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in logged if "eval/fmd" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert all(math.isfinite(row["eval/fmd"]) and 0 < row["eval/diversity"] < 1 for row in evals)
    best = json.loads((cfg.run_path / "best" / "export.json").read_text())
    best_fmd = min(row["eval/fmd"] for row in evals)
    assert best["eval"]["eval/fmd"] == pytest.approx(best_fmd)
    assert best["step"] == next(row["step"] for row in evals if row["eval/fmd"] == best_fmd)
    assert (cfg.run_path / "best" / "model.pt").is_file() and (cfg.run_path / "best" / "mednist_gan.ts").is_file()


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


@pytest.mark.slow
def test_shipped_generator_beats_the_seed_bundle(mednist_root, upstream_weights):
    """The shipped weights meet the recipe's targets against the seed's (both latent distributions), at N = 2000:
    at most half the seed's FMD, diversity within 10% of the real images' (measured 0.42x and +8.6%)."""
    from mednist_gan.quality import evaluate

    result = evaluate([("shipped", SHIPPED / "model.pt", ("normal",)),
                       ("seed", upstream_weights, ("normal", "uniform"))], mednist_root / "Hand", 2000)
    shipped, *seed = result["rows"][1:]
    best_seed = min(row["fmd"] for row in seed)
    assert shipped["fmd"] <= 0.5 * best_seed, (shipped, seed)
    assert abs(shipped["diversity"] / result["real_diversity"] - 1) <= 0.1, (shipped, result["real_diversity"])
