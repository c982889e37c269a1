"""The sliced Wasserstein distance of pixel patches (quality/patches.py) on real MedNIST hands."""

from __future__ import annotations

import pytest
import torch

from mednist_gan.errors import MednistGanError
from mednist_gan.quality.patches import SlicedWasserstein, _smooth, laplacian_pyramid
from mednist_gan.quality.scores import blurred


def test_the_laplacian_pyramid_adds_back_up_to_the_image():
    """Each band is what halving loses: doubling the coarser level back and adding the band restores the image."""
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    bands = laplacian_pyramid(images)
    assert [band.shape[-1] for band in bands] == [64, 32, 16]
    x = bands[-1]
    for band in reversed(bands[:-1]):
        doubled = torch.zeros_like(band)
        doubled[..., ::2, ::2] = x
        x = band + 4 * _smooth(doubled)
    assert torch.allclose(x, images, atol=1e-5)
    flat = torch.full((2, 1, 64, 64), 0.3)
    assert all(band.abs().max() < 1e-6 for band in laplacian_pyramid(flat)[:-1])  # no detail in a flat image


def test_the_sliced_wasserstein_distance_ranks_the_damaged_hands(hand_halves):
    """Real against real is near 0 and below every damage; blur grows it at the finest level and in order of
    sigma; a wrong layout shows at the coarsest level; sets of different sizes compare; seeded."""
    reference, other = (half[:500] for half in hand_halves)
    meter = SlicedWasserstein(reference)
    floor = meter.levels(other)
    blurs = [meter.levels(blurred(other, sigma)) for sigma in (0.5, 1.0, 1.5)]
    assert sum(floor) / 3 < sum(blurs[0]) / 3 < sum(blurs[1]) / 3 < sum(blurs[2]) / 3
    assert blurs[0][0] > 2 * floor[0]
    upside_down = meter.levels(other.flip(-1))
    assert upside_down[2] > 5 * floor[2] and upside_down[2] > upside_down[0]
    assert meter.distance(torch.rand(other.shape)) > 10 * meter.distance(other)
    assert meter.distance(reference[:8].repeat(63, 1, 1, 1)) > 2 * meter.distance(other)
    assert abs(meter.distance(other[:300]) - meter.distance(other)) < 0.5 * meter.distance(other)
    assert meter.levels(other) == floor


image = torch.rand(4, 1, 64, 64)


@pytest.mark.parametrize("call, message", [
    (lambda: SlicedWasserstein(torch.rand(4, 1, 16, 16)),
     "sliced Wasserstein: real images are 16 pixels wide; expected at least 28"),
    (lambda: SlicedWasserstein(image).levels(torch.rand(4, 1, 32, 32)),
     r"sliced Wasserstein: candidate images are \(1, 32, 32\), real images \(1, 64, 64\); expected one size"),
    (lambda: SlicedWasserstein(image, directions=0), "sliced Wasserstein: directions must be an integer >= 1"),
])
def test_bad_input_is_one_line_naming_what_is_wrong(call, message):
    with pytest.raises(MednistGanError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)
