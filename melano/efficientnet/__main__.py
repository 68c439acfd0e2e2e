"""`python -m melano.efficientnet`: build an EfficientNet, optionally load weights, classify images."""

from __future__ import annotations

import argparse
import json

import torch

from ..infra.cli import setup_logging
from ..pretrained import efficientnet, preprocess
from . import MODEL_NAMES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m melano.efficientnet",
                                description="Build an EfficientNet, optionally load weights, classify images.")
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
