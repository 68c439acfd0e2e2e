"""EfficientNet B0-B7 and EfficientNet-Lite0-4, the model only, in one file: the config and the
variant table, the layers (a depthwise conv with its own weight gradient, TF "SAME" conv,
conv+BN+activation, squeeze-excitation, the MBConv block), then the model. `melano.pretrained`
loads weights (offline, torchvision, timm, lukemelas).

Names follow timm's (`MODEL_NAMES`): efficientnet_b0..b7 and efficientnet_lite0..4 pad
symmetrically (k//2) with BN eps 1e-5 (b5-b7: 1e-3, as torchvision builds them for the TF-trained
weights it ships for those sizes); tf_efficientnet_b0..b7 and tf_efficientnet_lite0..4 use
TensorFlow "SAME" padding (asymmetric at stride 2) and BN eps 1e-3: what weights ported from
TensorFlow need. BN momentum is PyTorch's 0.1 in every variant, as in timm (it only matters for
training; TF trained with decay 0.99, i.e. momentum 0.01, which lukemelas and torchvision's B5-B7
keep). Lite models: no SE, ReLU6, and neither the stem (32) and head (1280) nor the depth of the
first and last stage is scaled (the TensorFlow Lite builder's table).

A binary classifier is `num_classes=1` (one logit). A config can be changed before building, e.g.
`EfficientNet(dataclasses.replace(config("efficientnet_b5"), bn_eps=1e-5))` for timm's own B5 weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (127.0 / 255,) * 3  # TF Lite preprocessing is (x - 127) / 128 on 0-255 pixels
TF_LITE_STD = (128.0 / 255,) * 3


# ----------------------------------------------------------------------------- config

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

_B = {  # width, depth, resolution, dropout (B models: MBConv with squeeze-excitation and SiLU)
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


# ----------------------------------------------------------------------------- layers

class DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution whose weight gradient is itself a grouped convolution: every
    (sample, channel) input plane correlated with its gradient plane, then summed over samples.
    Where a plane is smaller than the kernel (Lite0's last stages at 48 px), oneDNN takes 8-15 ms
    for that gradient and this way under 1 ms (bench/bench_classifier.py). The same sums, so the
    same gradient up to float rounding; the input gradient is torch's own."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (n, c, h, w), (kh, kw) = x.shape, weight.shape[-2:]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, ctx.stride, ctx.padding, [1, 1],
                                                         False, [0, 0], c, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            planes = x.transpose(0, 1).reshape(1, c * n, h, w).contiguous(memory_format=torch.channels_last)
            kernels = grad.transpose(0, 1).reshape(c * n, 1, *grad.shape[-2:])
            # stride becomes dilation; rows past the last stride step reach no output and are cut off
            grad_w = F.conv2d(planes, kernels, None, 1, ctx.padding, ctx.stride, c * n)[..., :kh, :kw]
            grad_w = grad_w.reshape(c, n, kh, kw).sum(1, keepdim=True)
        return grad_x, grad_w, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d that trains a depthwise layer through `DepthwiseConv` where oneDNN's weight
    gradient is slow: on the CPU, without autocast, at an output plane smaller than the kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.groups == self.in_channels == self.out_channels > 1 and self.bias is None
                and self.dilation == (1, 1) and x.device.type == "cpu" and x.shape[0] > 0
                and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and self._small_output(x)):
            return DepthwiseConv.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)

    def _small_output(self, x: torch.Tensor) -> bool:
        """Each side of the output shorter than the kernel's."""
        return all((size + 2 * p - k) // s + 1 < k
                   for size, k, s, p in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding))


class Conv2dSame(Conv2d):
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
            self.conv = Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        if act:
            self.act = nn.ReLU6(inplace=True) if cfg.lite else nn.SiLU(inplace=True)


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


# ----------------------------------------------------------------------------- the model

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


def efficientnet(name: str, num_classes: int = 1000, drop_rate: float | None = None,
                 drop_path_rate: float | None = None) -> EfficientNet:
    """Build a variant from MODEL_NAMES with random weights (`melano.pretrained.efficientnet` loads
    ImageNet ones). drop_rate / drop_path_rate override the variant's dropout and stochastic depth
    (None: the variant's defaults)."""
    cfg = config(name)
    changes: dict = {"num_classes": num_classes}
    if drop_rate is not None:
        changes["dropout"] = drop_rate
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    return EfficientNet(dataclasses.replace(cfg, **changes))
