"""Traditional augmentation, checked against torch.flip/rot90 and torchvision (test-only oracle)."""


import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from melano.augment import AugmentConfig, affine_matrices, apply_affine, sample_params, traditional

NONE = dict(hflip=0.0, vflip=0.0, rot90=False, max_angle=0.0, crop_p=0.0)


def params(b=1, hflip=False, vflip=False, k=0, angle=0.0, crop=(0.0, 0.0, 1.0, 1.0)):
    return {"hflip": torch.full((b,), hflip), "vflip": torch.full((b,), vflip),
            "k": torch.full((b,), k), "angle": torch.full((b,), angle, dtype=torch.float64),
            "crop": torch.tensor([crop] * b, dtype=torch.float64)}


def warp(x, p, padding="zeros"):
    return apply_affine(x, affine_matrices(p), "bilinear", padding)


@pytest.fixture
def x():
    return torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(0))


def test_identity_flips_and_quarter_turns_are_exact(x):
    # "exact" up to float rounding in affine_grid (~1e-6): they sample pixel centres
    torch.testing.assert_close(traditional(x, **NONE), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(traditional(x, **{**NONE, "hflip": 1.0}), x.flip(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(warp(x, params(3, vflip=True)), x.flip(2), atol=1e-5, rtol=0)
    sq = x[..., :20, :]  # quarter turns keep the shape only for square images
    for k in range(4):
        torch.testing.assert_close(warp(sq, params(3, k=k)), torch.rot90(sq, k, (2, 3)), atol=1e-5, rtol=0)


def test_arbitrary_angle_matches_torchvision():
    x = torch.rand(2, 3, 33, 33, generator=torch.Generator().manual_seed(1))
    for angle in (30.0, -17.5, 90.0 + 12.0):
        ref = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)  # zero fill, ccw
        torch.testing.assert_close(warp(x, params(2, angle=angle)), ref, atol=1e-5, rtol=0)


def test_crop_matches_torchvision_resized_crop():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    top, left, h, w = 8, 4, 16, 20
    ref = TF.resized_crop(x, top, left, h, w, [32, 32], interpolation=InterpolationMode.BILINEAR,
                          antialias=False)
    centre = ((left + w / 2) / 16 - 1, (top + h / 2) / 16 - 1)
    out = warp(x, params(crop=(*centre, w / 32, h / 32)))
    # the outermost ring differs only in edge handling (torch clamps, grid_sample reads neighbours)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_random_samples_are_per_sample_and_valid():
    x = torch.rand(1, 3, 16, 16).expand(64, -1, -1, -1).contiguous()
    out = traditional(x, torch.Generator().manual_seed(0), rot90=True, hflip=0.5, vflip=0.0,
                      max_angle=0.0, crop_p=0.0)
    # each output is one of the 8 flips/turns of the (shared) input, and not all the same one
    variants = [torch.rot90(v, k, (1, 2)) for v in (x[0], x[0].flip(2)) for k in range(4)]
    which = [min(range(8), key=lambda i: (o - variants[i]).abs().max().item()) for o in out]
    for o, i in zip(out, which):
        torch.testing.assert_close(o, variants[i], atol=1e-5, rtol=0)
    assert len(set(which)) >= 6

    p = sample_params(4000, torch.Generator().manual_seed(1), AugmentConfig(crop_p=1.0))
    assert abs(p["hflip"].double().mean().item() - 0.5) < 0.04  # ~6 sigma of a fair coin
    assert set(p["k"].tolist()) == {0, 1, 2, 3}
    assert p["angle"].abs().max() <= 45.0 and p["angle"].std() > 20
    cx, cy, w, h = p["crop"].unbind(1)
    assert ((cx.abs() + w) <= 1 + 1e-9).all() and ((cy.abs() + h) <= 1 + 1e-9).all()  # inside the image
    assert (w * h >= 0.5 - 1e-9).all() and (w * h <= 1 + 1e-9).all()
    ratio = w / h
    assert (ratio >= 3 / 4 - 1e-9).all() and (ratio <= 4 / 3 + 1e-9).all()
    no = sample_params(1000, torch.Generator().manual_seed(1), AugmentConfig(crop_p=0.3))["crop"]
    full = (no == torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)).all(1).double().mean()
    assert 0.62 < full < 0.78


def test_seeded_and_shape_preserving(x):
    a = traditional(x, torch.Generator().manual_seed(5))
    b = traditional(x, torch.Generator().manual_seed(5))
    c = traditional(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    # reflection padding keeps values inside the input's range (bilinear mixes of real pixels)
    assert a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6


def test_rejects_integer_images():
    with pytest.raises(ValueError, match="float"):
        traditional(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x = torch.rand(8, 3, 64, 64)
    cpu = traditional(x, torch.Generator().manual_seed(3))
    gpu = traditional(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
