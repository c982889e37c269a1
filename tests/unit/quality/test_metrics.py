"""Fidelity/diversity, memorization, class accuracy, usefulness and the two-sample test
(mednist_gan.quality.metrics) on real MedNIST."""

from __future__ import annotations

import pytest
import torch

from mednist_gan.errors import MednistGanError
from mednist_gan.quality import metrics
from mednist_gan.quality.classifier import CLASSES, load_classifier, to_evaluation_pixels
from mednist_gan.quality.metrics import (class_accuracy, density_coverage, memorization, nearest_distances,
                                         precision_recall, two_sample_test, usefulness)
from mednist_gan.quality.scores import blurred

from helpers import per_class

HAND, CXR = CLASSES.index("Hand"), CLASSES.index("CXR")


@torch.no_grad()
def features(images: torch.Tensor) -> torch.Tensor:
    net = load_classifier()
    return torch.cat([net.features(to_evaluation_pixels(images[i:i + 500])) for i in range(0, len(images), 500)])


@pytest.fixture(scope="module")
def hands(classifier_split):
    """Disjoint real Hand images: 'train' (2,000), 'held_out' (1,000), 'other' (500), as pixels and features."""
    images, labels = classifier_split["train"]
    hand = images[labels == HAND]
    hand = hand[torch.randperm(len(hand), generator=torch.Generator().manual_seed(0))]
    pixels = {"train": hand[:2000], "held_out": hand[2000:3000], "other": hand[3000:3500]}
    return {"pixels": pixels, "features": {name: features(x) for name, x in pixels.items()}}


# ----------------------------------------------------------------------------- distances

def test_nearest_distances_match_cdist_across_chunks(monkeypatch):
    monkeypatch.setattr(metrics, "BLOCK", 1000)  # 3-4 query rows per chunk: many chunks
    g = torch.Generator().manual_seed(0)
    queries, reference = torch.rand(50, 4096, generator=g) * 10 + 5, torch.rand(300, 4096, generator=g) * 10 + 5
    expected = torch.cdist(queries.double(), reference.double()).min(1).values
    assert torch.allclose(nearest_distances(queries, reference), expected, rtol=1e-9, atol=0)
    within = torch.cdist(reference.double(), reference.double()).fill_diagonal_(float("inf")).min(1).values
    assert torch.allclose(nearest_distances(reference, reference, exclude_self=True), within, rtol=1e-9, atol=0)
    copies = torch.cat([reference[:20], reference[:1]])  # exact copies: exactly 0, not float32 round-off
    assert (nearest_distances(copies, reference) == 0).all()
    assert nearest_distances(copies, copies, exclude_self=True)[0] == 0  # its duplicate at row 20 counts
    assert nearest_distances(copies, copies, exclude_self=True)[1] > 10


# ----------------------------------------------------------------------------- fidelity and diversity

def test_precision_recall_density_coverage_on_points_worked_out_by_hand():
    """k = 1, points on a line. Real 0, 1, 4, 6, 20, 21: radii 1, 1, 2, 2, 1, 1. Fake 0.5, 0.7, 5, 5.4, 10:
    radii 0.2, 0.2, 0.4, 0.4, 4.6.
    Precision: all but 10 lie in a real ball (10 is 4 from 6, radius 2): 4/5.
    Recall: only 6 lies in a fake ball (10's, 4 <= 4.6); 1 is 0.3 from 0.7 (radius 0.2): 1/6.
    Density: 0.5 and 0.7 lie in the balls of 0 and 1, 5 and 5.4 in those of 4 and 6, 10 in none: 8 / (1 x 5).
    Coverage: the balls of 0, 1, 4 and 6 hold fakes, those of 20 and 21 none: 4/6."""

    def line(*xs):
        return torch.tensor([[x, 0.0] for x in xs])

    real, fake = line(0, 1, 4, 6, 20, 21), line(0.5, 0.7, 5, 5.4, 10)
    precision, recall = precision_recall(real, fake, k=1)
    density, coverage = density_coverage(real, fake, k=1)
    assert (precision, recall) == pytest.approx((4 / 5, 1 / 6))
    assert (density, coverage) == pytest.approx((8 / 5, 4 / 6))
    # k = 2 widens the real radii to 4, 3, 3, 5, 14, 15: 10 now lies in the balls of 6, 20 and 21
    assert precision_recall(real, fake, k=2)[0] == 1.0


def test_two_halves_of_the_real_images_score_high(hands):
    real, other = hands["features"]["train"][:1000], hands["features"]["held_out"]
    precision, recall = precision_recall(real, other)
    density, coverage = density_coverage(real, other)
    assert precision > 0.75 and recall > 0.75, (precision, recall)  # measured 0.85, 0.87
    assert 0.8 < density < 1.2 and coverage > 0.85, (density, coverage)  # measured 0.94, 0.97 (1 - 2^-5 = 0.97)


def test_a_collapsed_set_keeps_precision_but_loses_recall_and_coverage(hands):
    real = hands["features"]["train"][:1000]
    collapsed = hands["features"]["other"][:20].repeat(50, 1)  # 20 real images, 50 times each
    precision, recall = precision_recall(real, collapsed)
    coverage = density_coverage(real, collapsed)[1]
    assert precision > 0.75, precision
    assert recall < 0.05 and coverage < 0.2, (recall, coverage)  # measured 0.90; 0.0 and 0.11


def test_another_distribution_is_outside_the_real_manifold(classifier_split, hands):
    real = hands["features"]["train"][:1000]
    images, labels = classifier_split["test"]
    for name, fake in (("CXR", features(images[labels == CXR])),
                       ("noise", features(torch.rand(200, 1, 64, 64, generator=torch.Generator().manual_seed(0))))):
        precision, recall = precision_recall(real, fake)
        density, coverage = density_coverage(real, fake)
        assert precision < 0.05 and recall < 0.05 and density < 0.05 and coverage < 0.05, (name, precision, recall,
                                                                                            density, coverage)


# ----------------------------------------------------------------------------- memorization

# Gaussian pixel noise on training images that still counts as a copy. The classifier's features move further
# under noise than pixels do: at 0.01 (2.5 grey levels) only 11% of such copies were flagged in feature space,
# 100% in pixel space (measured).
NEAR_COPY_NOISE = {"pixels": 0.02, "features": 0.005}


@pytest.mark.parametrize("space", ["pixels", "features"])
def test_memorization_flags_copies_of_training_images_and_not_unseen_ones(hands, space):
    sets = hands[space]
    train = hands["pixels"]["train"][:500]
    noise = NEAR_COPY_NOISE[space] * torch.randn(train.shape, generator=torch.Generator().manual_seed(1))
    noisy = to_evaluation_pixels((train + noise).clamp(0, 1))  # as a generator's PNGs would hold them
    near_copies = noisy.flatten(1) if space == "pixels" else features(noisy)
    copies = memorization(sets["train"][:500], sets["held_out"], sets["train"])
    near = memorization(near_copies, sets["held_out"], sets["train"])
    unseen = memorization(sets["other"], sets["held_out"], sets["train"])
    assert copies["share"] > 0.95 and copies["generated_median"] == 0, copies
    assert near["share"] > 0.95, near
    assert unseen["share"] < 0.05, unseen  # 1% expected; measured 0.6% (pixels), 1.4% (features)
    assert unseen["generated_median"] == pytest.approx(unseen["held_out_median"], rel=0.1)
    assert copies["threshold"] == unseen["threshold"] > 0 and copies["percentile"] == 1.0


def test_memorization_without_unseen_images_uses_each_training_images_nearest_other(hands):
    """A generator trained on every real image there is (the shipped Hand generator): training rows measured to
    their nearest *other* training row stand in for unseen images, and give about the same threshold."""
    sets = hands["pixels"]
    copies = memorization(sets["train"][:500], None, sets["train"])
    unseen = memorization(sets["other"], None, sets["train"])
    real = memorization(sets["other"], sets["held_out"], sets["train"])
    assert copies["share"] > 0.95 and unseen["share"] < 0.05, (copies, unseen)
    assert unseen["threshold"] == pytest.approx(real["threshold"], rel=0.15)
    assert unseen["held_out_median"] == pytest.approx(real["held_out_median"], rel=0.1)


# ----------------------------------------------------------------------------- the classifier's view

def test_class_accuracy_of_real_images_and_of_mislabelled_ones(classifier_split):
    images, labels = classifier_split["test"]
    keep = torch.cat([(labels == c).nonzero().flatten()[:200] for c in range(len(CLASSES))])  # 200 per class
    accuracy = class_accuracy(images[keep], labels[keep])
    assert list(accuracy) == [*CLASSES, "all"]
    assert min(accuracy.values()) >= 0.98, accuracy
    hands = images[labels == HAND][:200]
    assert class_accuracy(hands, torch.full((200,), CXR)) == pytest.approx({"CXR": 0.0, "all": 0.0}, abs=0.02)


def test_usefulness_is_deterministic_and_leaves_the_callers_state(classifier_split):
    synthetic = per_class(*classifier_split["train"], 10)
    real_train = per_class(*classifier_split["train"], 10, skip=10)
    test = per_class(*classifier_split["test"], 10)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    runs = [usefulness(*synthetic, *real_train, *test, epochs=1, threads=1) for _ in range(2)]
    assert runs[0]["synthetic_accuracy"] == runs[1]["synthetic_accuracy"]
    assert runs[0]["real_accuracy"] == runs[1]["real_accuracy"]
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)



def test_the_two_sample_test_tells_damaged_images_from_real_ones_and_not_real_from_real(hand_halves):
    reference, other = (half[:400] for half in hand_halves)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    same = two_sample_test(reference, other, epochs=4, threads=1)
    assert 0.4 <= same["accuracy"] <= 0.6 and 0.35 <= same["auc"] <= 0.65, same
    assert same["train_images"] == 400 and same["test_images"] == 400
    noise = torch.rand(other.shape, generator=torch.Generator().manual_seed(1))
    for damaged in (blurred(other, 1.5), other.flip(-1), noise):
        assert two_sample_test(reference, damaged, epochs=4, threads=1)["auc"] >= 0.95
    assert two_sample_test(reference, other, epochs=4, threads=1)["auc"] == same["auc"]  # seeded
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------------- bad input

points = torch.rand(10, 3)
image = torch.rand(4, 1, 64, 64)
label = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("call, message", [
    (lambda: precision_recall(points[:3], points, k=3), "precision_recall: real has 3 rows, needs at least 4"),
    (lambda: precision_recall(points, torch.rand(10, 4)), "precision_recall: rows of different sizes, real 3, fake 4"),
    (lambda: precision_recall(points, points, k=0), "precision_recall: k must be an integer >= 1, got 0"),
    (lambda: density_coverage(points, torch.full((2, 3), float("nan"))), "density_coverage: fake has non-finite"),
    (lambda: density_coverage(torch.rand(10), points), r"density_coverage: real must be a tensor of rows \(N, D\)"),
    (lambda: nearest_distances(points, points[:5], exclude_self=True),
     "exclude_self needs the queries to be the reference.s first rows"),
    (lambda: memorization(points, points, points),
     "memorization: held_out has 10 rows; percentile=1 needs at least 100"),
    (lambda: memorization(points, points, points, percentile=0), r"percentile must be in \(0, 100\), got 0"),
    (lambda: class_accuracy(torch.rand(4, 64, 64), label), r"images must be a tensor \(N, 1, S, S\)"),
    (lambda: class_accuracy(image, torch.tensor([0, 1, 2, 6])), "labels must be class indices 0-5"),
    (lambda: class_accuracy(image, label[:3]), "labels must be 4 integers"),
    (lambda: usefulness(image, label, image, label, image, torch.tensor([4, 4, 4, 5])),
     "usefulness: no synthetic images of Hand, HeadCT, which the real test set has"),
    (lambda: usefulness(image, torch.tensor([0, 0, 1, 1]), image, label, image[:1], label[:1]),
     "usefulness: 2 synthetic AbdomenCT images, but only 1 real training images"),
    (lambda: usefulness(image, label, image, label, image, label, threads=0), "usefulness: threads must be an integer"),
    (lambda: two_sample_test(image, torch.rand(4, 1, 32, 32)),
     r"two-sample test: real images are \(1, 64, 64\), candidate images \(1, 32, 32\); expected one size"),
    (lambda: two_sample_test(image[:3], image),
     r"two-sample test: real images must be .* N >= 4, got \(3, 1, 64, 64\)"),
])
def test_bad_input_is_one_line_naming_what_is_wrong(call, message):
    with pytest.raises(MednistGanError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)
