"""Grad-CAM (melano.saliency), the synthetic lesion's mask (melano.synth.lesion_mask) and the
report's saliency picture (melano.classifier.inference.saliency_picture).

Oracles: maps known in closed form (a network ending in average pooling + linear gives the class
activation map, w_k A_k / hw; one ending in flatten + linear gives alpha_k = mean of its weights
V_k), hand-made maps for the overlap measures, and the renderer with and without its lesion.
"""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import read_csv
from melano import data, saliency, synth
from melano.classifier import inference
from melano.efficientnet import efficientnet

CLF_DATA = (40, 24, 2.0)  # conftest's clf_data and clf_run


def upsample(cam: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def test_grad_cam_of_efficientnet_is_its_class_activation_map():
    torch.manual_seed(0)
    model = efficientnet("tf_efficientnet_lite0", num_classes=1).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():  # untrained, the activations are ~1e-9: BatchNorm statistics of x make them O(1)
        model.classifier.weight.normal_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.momentum = 1.0
        model.train()(x)
        model.eval()
    cams, logits = saliency.grad_cam(model, model.head, x)
    with torch.no_grad():
        A = model.head(model.blocks(model.stem(x)))               # (N, C, h, w)
        w = model.classifier.weight[0]
        cam = F.relu(torch.einsum("c,nchw->nhw", w, A)) / (A.shape[2] * A.shape[3])
        assert torch.allclose(logits, model(x)[:, 0])
    assert cams.shape == (3, 64, 64)
    assert torch.allclose(cams, upsample(cam, (64, 64)), rtol=1e-4, atol=1e-6)
    assert cams.amax() > 0.1 and (cams == 0).float().mean() > 0.05  # a map with structure, and the ReLU at work
    # the other class of a one-logit model (score -logit), for some images: the negative evidence
    sign = torch.tensor([1.0, -1.0, -1.0])
    other, _ = saliency.grad_cam(model, model.head, x, sign=sign)
    with torch.no_grad():
        cam_other = F.relu(torch.einsum("c,nchw->nhw", w, A) * sign[:, None, None]) / (A.shape[2] * A.shape[3])
    assert torch.allclose(other, upsample(cam_other, (64, 64)), rtol=1e-4, atol=1e-6)
    assert torch.equal(other[0], cams[0]) and not torch.allclose(other[1:], cams[1:])


def test_grad_cam_weights_are_the_mean_gradient():
    """A network with no pooling: y = <V, A> + b, so dy/dA = V and alpha_k = mean_ij V_kij."""
    torch.manual_seed(1)
    first, layer = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 5, 3, stride=2, padding=1)
    linear = torch.nn.Linear(5 * 4 * 4, 2)
    model = torch.nn.Sequential(first, torch.nn.ReLU(), layer, torch.nn.Flatten(), linear).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen weights: the map still has a gradient to follow
    x = torch.randn(2, 3, 8, 8)
    cams, logits = saliency.grad_cam(model, layer, x, index=1)
    with torch.no_grad():
        A = layer(F.relu(first(x)))                               # (2, 5, 4, 4)
        alpha = linear.weight[1].reshape(5, 4, 4).mean((1, 2))
        cam = F.relu(torch.einsum("c,nchw->nhw", alpha, A))
    assert torch.allclose(logits, model(x)[:, 1])
    assert torch.allclose(cams, upsample(cam, (8, 8)), rtol=1e-5, atol=1e-6)


def test_overlap_measures_on_hand_made_maps():
    mask = torch.zeros(3, 10, 10)
    mask[:, 2:6, 3:8] = 1                                          # 20 of 100 pixels
    cams = torch.stack([mask[0] * 7, torch.ones(10, 10), torch.zeros(10, 10)])
    cams[2, 0, 0] = 1.0                                            # all the mass outside
    assert saliency.energy_share(cams, mask).tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert saliency.area_share(mask).tolist() == pytest.approx([0.2] * 3)
    cams[1, 4, 4] = 2.0                                            # the peak inside
    assert saliency.pointing_game(cams, mask).tolist() == [True, True, False]
    assert saliency.normalise(cams).amax((1, 2)).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_lesion_mask_is_where_the_renderer_draws_the_lesion():
    rows = synth.plan(6, 4, seed=2)
    for r in rows:
        mask = synth.lesion_mask(r, 64, seed=2)
        decode = lambda show: np.asarray(Image.open(io.BytesIO(next(synth.render_rows(
            [r], 64, 2, synth.DEFAULT_DIFFICULTY, show_lesion=show)))), np.float32)
        diff = np.abs(decode(True) - decode(False)).sum(-1)
        inside = mask > 0.5
        assert 0 < inside.mean() < 1
        assert diff[inside].sum() / diff.sum() > 0.75               # the lesion's pixels are the mask's
        assert diff[inside].mean() > 10 * diff[mask < 0.01].mean()


def test_saliency_picture_picks_the_extremes(clf_run, clf_data, root, tmp_path):
    preds = clf_run / "test_predictions.csv"
    rows = read_csv(preds)
    y = np.array([int(r["target"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    picks = dict(inference.saliency_picks(y, p, 2))
    pos, neg = p[y == 1], p[y == 0]
    assert sorted(p[picks["true positive"]]) == sorted(np.sort(pos)[-2:])
    assert sorted(p[picks["false positive"]]) == sorted(np.sort(neg)[-2:])
    assert sorted(p[picks["false negative"]]) == sorted(np.sort(pos)[:2])
    cache = data.build_cache(data.read_index(clf_data), 32, root / "cache")
    out = inference.saliency_picture(clf_run / "best.pt", cache, preds, tmp_path / "gradcam.png", per_group=2)
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 4 * 96 and img.height > 3 * 96  # 3 rows of 2 tiles of 2 cells


def test_translation_picture_scores_both_sides(clf_run, clf_data, root, tmp_path):
    cache = data.build_cache(data.read_index(clf_data), 32, root / "cache")
    sources = np.asarray(cache.images[:4])
    translated = sources[:, ::-1].copy()  # any other image stands in for a translation
    out = inference.translation_saliency_picture(clf_run / "best.pt", sources, translated, tmp_path / "t.png")
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 2 * 4 * 96 and img.height > 2 * 96
