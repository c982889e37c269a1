"""Scores on real and generated images at N = 1000: the sanity table, the evaluate command, the shipped
generators against their targets, and the feature extractors' training."""

from __future__ import annotations

import hashlib
import json
import math
import sys

import pytest
import torch

from mednist_gan.config import load_config
from mednist_gan.quality.classifier import ASSETS, CLASSES, WEIGHTS_FILE, train_classifier
from mednist_gan.quality.encoder import train_encoder
from mednist_gan.quality.metrics import usefulness
from mednist_gan.training.trainer import train

from helpers import CONFIGS, REPO, per_class, run_cli
from stand_ins import ForeignGenerator, conditional_stand_in

sys.path.insert(0, str(REPO / "benchmarks"))  # metric_sanity.py and quality_targets.py, also when this file runs alone


def test_classifier_training_is_reproducible(tmp_path, mednist_root):
    # the same file name in two folders: torch.save writes the name into the archive
    runs = [train_classifier(mednist_root, tmp_path / f"run{i}" / "c.pt", epochs=1, limit_per_class=40,
                             log=lambda _: None) for i in range(2)]
    assert runs[0]["sha256"] == runs[1]["sha256"]
    assert json.loads((tmp_path / "run0" / "c.json").read_text())["results"]["test_images"] == 24


@pytest.fixture(scope="module")
def sanity(hand_halves, hand_meter, upstream_weights):
    """The sanity table of benchmarks/metric_sanity.py at N = 1000: every case's scores."""
    from metric_sanity import SHIPPED, sanity_cases

    cases = sanity_cases(*hand_halves, {"seed": upstream_weights, "shipped": SHIPPED})
    return {name: hand_meter.score(images) for name, images in cases.items()}


def test_both_spaces_rank_damaged_real_images_behind_the_floor(sanity):
    """Upside-down, transposed and blurred real hands score clearly worse than real ones; more blur, worse;
    noise worst. In both feature spaces, and by SWD in pixels; SWD too puts the seed's hands behind the shipped
    generator's."""
    floor = sanity["real (floor)"]
    assert sanity["shipped"].swd < sanity["seed"].swd
    for space in ("fmd", "fd_ssl", "swd"):
        f = lambda name: getattr(sanity[name], space)  # noqa: E731
        for name in ("upside down", "transposed", "blurred, sigma 1.0", "8 training images repeated"):
            assert f(name) > 3 * f("real (floor)"), (space, name, f(name), floor)
        values = [f("real (floor)")] + [f(f"blurred, sigma {s}") for s in (0.5, 1.0, 1.5)]
        assert all(a * 1.3 < b for a, b in zip(values, values[1:])), (space, values)  # monotone, with margins
        assert f("uniform noise") > 1.3 * max(f(n) for n in sanity if n != "uniform noise"), space
    assert floor.kid < 1e-3 and sanity["blurred, sigma 1.5"].kid > 5e-3


def test_encoder_space_agrees_with_the_eye_on_generators_against_blur(sanity):
    """Real hands blurred with sigma 1.5 look better than both generators' hands (malformed fingers, blotches),
    and the shipped generator's better than the seed's: the encoder space ranks them so (measured at N = 1000:
    0.40 < 0.52 < 1.20); the classifier space ranks the blurred hands behind both generators (11.3 vs 4.9, 2.1)."""
    seed, shipped, blur = sanity["seed"], sanity["shipped"], sanity["blurred, sigma 1.5"]
    assert blur.fd_ssl < 0.9 * shipped.fd_ssl and shipped.fd_ssl < 0.6 * seed.fd_ssl
    assert blur.fmd > seed.fmd > shipped.fmd


def test_precision_recall_density_coverage_separate_fidelity_from_diversity(sanity):
    floor, collapse, noise = sanity["real (floor)"], sanity["8 training images repeated"], sanity["uniform noise"]
    assert min(floor.precision, floor.recall, floor.coverage) > 0.7 and 0.7 < floor.density < 1.3
    assert collapse.precision > 0.7 and collapse.recall < 0.05 and collapse.coverage < 0.2  # faithful, not diverse
    assert max(noise.precision, noise.recall, noise.density, noise.coverage) < 0.01
    assert sanity["seed"].precision < sanity["shipped"].precision < floor.precision


def test_evaluate_command_table_and_json(tmp_path, mednist_root, upstream_weights):
    out = tmp_path / "eval.json"
    result = run_cli("evaluate", "--model", str(upstream_weights), "--real-dir", str(mednist_root / "Hand"),
                     "--num-samples", "300", "--latent", "both", "--baseline", str(upstream_weights), "--out", str(out),
                     "--blurred", "1.5")
    assert result.returncode == 0, result.stderr
    assert "real vs real (floor)" in result.stdout and "real blurred, sigma 1.5" in result.stdout
    data = json.loads(out.read_text())
    lines = result.stdout.splitlines()
    header = lines[1].split()  # each column headed by its key in the JSON's rows
    assert header[:3] == ["name", "latent", "fmd"] and all(set(header) <= set(row) for row in data["rows"])
    legend = lines[2 + len(data["rows"]):]
    assert any(line.startswith("real blurred, sigma S") for line in legend)
    assert any(line.startswith("baseline (--baseline)") for line in legend)
    assert data["num_samples"] == 300 and data["feature_size"] == 320
    names = [(r["name"], r["latent"]) for r in data["rows"]]
    assert names[:2] == [("real vs real (floor)", None), ("real blurred, sigma 1.5", "blurred")]
    assert [latent for _, latent in names[2:]] == ["normal", "uniform", "normal", "uniform"]
    floor, blur, normal, uniform = data["rows"][:4]
    # the seed's training latents beat its inference's uniform ones
    assert floor["fmd"] < normal["fmd"] < uniform["fmd"]
    assert data["rows"][2]["fmd"] == data["rows"][4]["fmd"]  # the same weights and seed: the same numbers
    assert blur["fd_ssl"] > 2 * floor["fd_ssl"] and blur["fmd"] > normal["fmd"]  # blurred hands: far from the floor
    assert blur["memorization_pixels"] is None and blur["memorization_encoder"] is None  # a yardstick, not a generator


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
    legend = result.stdout.splitlines()[2 + len(rows):]  # no --blurred, no --baseline: no legend lines for them
    assert legend and not [line for line in legend if line.startswith(("real blurred", "baseline"))], legend


def test_in_training_evaluation_logs_and_keeps_the_best(tmp_path, mednist_root, debug_overrides):
    cfg = load_config(CONFIGS / "debug.yaml", [*debug_overrides, "eval.every_steps=2", "eval.num_samples=32",
                                               "train.ema_decay=0.5", "log.sample_every=null"])
    train(cfg)
    logged = [json.loads(line) for line in (cfg.run_path / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in logged if "eval/fmd" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert all(math.isfinite(row["eval/fmd"]) and 0 < row["eval/diversity"] < 1 for row in evals)
    assert all(math.isfinite(row["eval/fd_ssl"]) and 0 <= row["eval/precision"] <= 1 for row in evals)
    best = json.loads((cfg.run_path / "best" / "export.json").read_text())
    lowest = min(row["eval/fd_ssl"] for row in evals)  # eval.best_metric's default
    assert best["eval"]["eval/fd_ssl"] == pytest.approx(lowest)
    assert best["step"] == next(row["step"] for row in evals if row["eval/fd_ssl"] == lowest)
    assert (cfg.run_path / "best" / "model.pt").is_file() and (cfg.run_path / "best" / "mednist_gan.ts").is_file()


def test_evaluate_every_class_of_a_conditional_generator(tmp_path, mednist_root):
    """--class all: each class scored against its own real images, the generator sampled with that class's label.
    The stand-in returns training images: near the floor, the intended class, and flagged as memorized."""
    from mednist_gan.quality.classifier import CLASSES

    order = list(reversed(CLASSES))  # the model's label order need not be the classifier's
    model = conditional_stand_in(tmp_path / "cond", mednist_root, order, 400)
    out = tmp_path / "eval.json"
    result = run_cli("evaluate", "--model", str(model), "--latent-size", "8", "--real-dir", str(mednist_root),
                     "--class", "all", "--num-samples", "150", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [block["class"] for block in data["classes"]] == list(CLASSES)
    for block in data["classes"]:
        floor, generated = block["rows"]
        assert block["real_dir"].endswith(block["class"])
        assert generated["class_accuracy"] >= 0.98 and floor["class_accuracy"] >= 0.98, block["class"]
        assert generated["memorization_pixels"] > 0.95 and floor["memorization_pixels"] < 0.05, block["class"]
        assert generated["fd_ssl"] < 3 * floor["fd_ssl"] + 1 and generated["precision"] > 0.7, block["class"]
    assert "class Hand: N = 150" in result.stdout and "memorization_pixels" in result.stdout
    # one class at a time, and a class the generator does not make
    hand = run_cli("evaluate", "--model", str(model), "--latent-size", "8", "--real-dir", str(mednist_root),
                   "--class", "Hand", "--num-samples", "150", "--out", str(tmp_path / "hand.json"))
    assert hand.returncode == 0, hand.stderr
    assert json.loads((tmp_path / "hand.json").read_text())["rows"][1]["class_accuracy"] >= 0.98
    two = conditional_stand_in(tmp_path / "two", mednist_root, ["CXR", "Hand"], 50)
    refused = run_cli("evaluate", "--model", str(two), "--latent-size", "8", "--real-dir", str(mednist_root),
                      "--class", "all", "--out", str(tmp_path / "two.json"))
    assert refused.returncode == 2 and "a class-conditional generator of CXR, Hand" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_usefulness_of_real_images_standing_in_for_generated_ones(tmp_path, mednist_root):
    from mednist_gan.quality.classifier import CLASSES
    from mednist_gan.quality.evaluate import evaluate

    model = conditional_stand_in(tmp_path / "cond", mednist_root, CLASSES, 300)
    result = evaluate([("stand-in", model, ("normal",))], mednist_root, 100, latent_size=8, classes=["all"],
                      usefulness=150)
    u = result["usefulness"]["stand-in"]
    assert u["train_images"] == 900 and u["test_images"] > 1000
    assert u["synthetic_accuracy"]["all"] > 0.9 and u["real_accuracy"]["all"] > 0.9, u


def test_shipped_generator_beats_the_seed_bundle(mednist_root, upstream_weights):
    """The shipped weights meet the recipe's targets against the seed's (both latent distributions), at N = 2000:
    at most half the seed's FMD, diversity within 10% of the real images' (measured 0.42x and +8.6%)."""
    from mednist_gan.quality.evaluate import evaluate

    result = evaluate([("shipped", ASSETS / "generator" / "model.pt", ("normal",)),
                       ("seed", upstream_weights, ("normal", "uniform"))], mednist_root / "Hand", 2000)
    shipped, *seed = result["rows"][1:]
    best_seed = min(row["fmd"] for row in seed)
    assert shipped["fmd"] <= 0.5 * best_seed, (shipped, seed)
    assert abs(shipped["diversity"] / result["real_diversity"] - 1) <= 0.1, (shipped, result["real_diversity"])


def test_shipped_hand_generator_meets_its_targets(mednist_root, upstream_weights):
    """Issue #17's Hand targets, at N = 1000 (benchmarks/quality_targets.py; docs/quality.md has them at N = 5000):
    FD-SSL no worse than real hands blurred with sigma 1.5, FMD at most 0.25x the seed weights', diversity within 10%
    of the real images'."""
    from quality_targets import hand_targets, score_hand_generator

    result = score_hand_generator(ASSETS / "hand" / "model.pt", mednist_root / "Hand", 1000, upstream_weights)
    missed = [target for target in hand_targets(result) if not target[-1]]
    assert not missed, missed


def test_shipped_conditional_generator_meets_its_targets(mednist_root):
    """Issue #17's six-class targets at N = 1000 per class against the 2,000-per-class MedNIST folder
    (benchmarks/quality_targets.py --conditional; docs/quality.md has issue #38's stricter 33 met at N = 5000 on the
    complete MedNIST)."""
    from quality_targets import conditional_targets, score_conditional_generator

    result = score_conditional_generator(ASSETS / "conditional" / "model.pt", mednist_root, 1000, usefulness=500)
    targets = conditional_targets(result)
    assert len(targets) == 6 * 5 + 1
    missed = [target for target in targets if not target[-1]]
    assert not missed, missed


def test_encoder_training_is_reproducible(tmp_path, mednist_root):
    runs = [train_encoder(mednist_root, tmp_path / f"run{i}" / "e.pt", epochs=1, batch_size=32, limit_per_class=40,
                          log=lambda _: None) for i in range(2)]
    assert runs[0]["sha256"] == runs[1]["sha256"]
    card = json.loads((tmp_path / "run0" / "e.json").read_text())
    assert card["results"]["train_images"] == 216 and len(card["results"]["loss_per_epoch"]) == 1


def test_usefulness_of_real_images_matches_the_real_baseline_and_of_shuffled_labels_is_chance(classifier_split):
    """Real images standing in for synthetic ones train as well as the baseline; with their labels shuffled, a
    classifier trained on them guesses (1/6 on a balanced test set). 200 images per class, 2 epochs; 1 thread,
    which gives the same numbers as 2 and runs 8x faster on a CPU shared with another job (measured)."""
    synthetic = per_class(*classifier_split["train"], 200)
    real_train = per_class(*classifier_split["train"], 1000, skip=200)
    test = per_class(*classifier_split["test"], 100)
    useful = usefulness(*synthetic, *real_train, *test, threads=1)
    assert useful["synthetic_accuracy"]["all"] > 0.9 and useful["real_accuracy"]["all"] > 0.9, useful
    assert abs(useful["synthetic_accuracy"]["all"] - useful["real_accuracy"]["all"]) < 0.05, useful
    assert useful["train_images_per_class"] == dict.fromkeys(CLASSES, 200) and useful["test_images"] == 600
    shuffled_labels = synthetic[1][torch.randperm(1200, generator=torch.Generator().manual_seed(0))]
    shuffled = usefulness(synthetic[0], shuffled_labels, *real_train, *test, threads=1)
    assert shuffled["synthetic_accuracy"]["all"] < 0.35, shuffled
    assert shuffled["real_accuracy"] == useful["real_accuracy"]  # same counts per class: the same baseline run


def test_train_classifier_writes_to_a_run_folder_by_default(tmp_path, mednist_root):
    before = hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest()
    result = run_cli("train-classifier", "--data-root", str(mednist_root), "--limit-per-class", "12", "--epochs", "1",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote runs/classifier/classifier.pt" in result.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "classifier").iterdir()) == ["classifier.json",
                                                                                    "classifier.pt"]
    assert hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest() == before
