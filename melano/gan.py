"""CycleGAN, the science: generators, discriminators, losses, the image pool and one training
step (`train_step`). The trainer around it is melano.cyclegan.

The models follow the original CycleGAN (junyanz/pytorch-CycleGAN-and-pix2pix): a ResNet generator
and a 70x70 PatchGAN, with InstanceNorm(affine=False) (melano.ops.InstanceNormAct, the fused op) and
biased convs. G_A maps A -> B and D_A judges B images; G_B maps B -> A and D_B judges A images.
Here A is benign and B malignant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import InstanceNormAct

FORMAT = "melano.cyclegan"  # the format marker of the trainer's checkpoints


# ----------------------------------------------------------------------------- models

class ResnetBlock(nn.Module):
    """x + (pad, conv3x3, IN+act, pad, conv3x3, IN). The second norm has no activation."""

    def __init__(self, dim: int, act: str, slope: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNormAct(dim, act=act, negative_slope=slope),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True),
            InstanceNormAct(dim, act="none"))

    def forward(self, x):
        return x + self.block(x)


class Generator(nn.Module):
    """ResNet generator: 7x7 stem, two stride-2 downsamplings, n_blocks residual blocks, two
    upsamplings, 7x7 conv, tanh. Convs have bias=True because InstanceNorm(affine=False) has no
    shift of its own (the original CycleGAN's use_bias rule)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, upsample: str = "transpose", act: str = "relu",
                 residual: bool = False, in_ch: int = 3, out_ch: int = 3):
        super().__init__()
        self.residual = residual
        a, slope = ("relu", 0.0) if act == "relu" else ("leaky_relu", 0.01)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7, bias=True),
                  InstanceNormAct(ngf, act=a, negative_slope=slope)]
        for mult in (1, 2):  # downsample: ngf -> 2 ngf -> 4 ngf
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                       InstanceNormAct(ngf * mult * 2, act=a, negative_slope=slope)]
        layers += [ResnetBlock(ngf * 4, a, slope) for _ in range(n_blocks)]
        for mult in (4, 2):  # upsample: 4 ngf -> 2 ngf -> ngf
            cin, cout = ngf * mult, ngf * mult // 2
            if upsample == "transpose":
                layers += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=True)]
            elif upsample == "nearest":  # no checkerboard artefacts; same parameter count
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                           nn.Conv2d(cin, cout, 3, bias=True)]
            elif upsample == "nearest_zero":  # the study's: zero padding darkens the borders a little
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=True)]
            else:
                raise ValueError(f"upsample={upsample!r}: choose 'transpose', 'nearest' or 'nearest_zero'")
            layers += [InstanceNormAct(cout, act=a, negative_slope=slope)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7, bias=True)]
        self.model = nn.Sequential(*layers, *([] if residual else [nn.Tanh()]))

    def zero_last(self) -> None:
        """Zero the last conv: a residual generator then starts as the identity."""
        nn.init.zeros_(self.model[-1].weight)
        nn.init.zeros_(self.model[-1].bias)

    def forward(self, x):
        if not self.residual:
            return self.model(x)
        # The change is added before the tanh, so the output stays in (-1, 1); the clamp keeps
        # atanh finite on saturated (0 or 255) pixels.
        return torch.tanh(torch.atanh(x.clamp(-0.999, 0.999)) + self.model(x))


class Discriminator(nn.Module):
    """PatchGAN: 4x4 convs, LeakyReLU(0.2), no norm on the first layer, logits out (no sigmoid).
    n_layers=3 gives each output a 70x70 receptive field."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, in_ch: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last norm layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=True),
                       InstanceNormAct(ndf * mult, act="leaky_relu", negative_slope=0.2)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class StudyDiscriminator(nn.Module):
    """The study's PatchGAN: four 4x4 stride-2 blocks (64, 128, 256, 512 channels; no norm in the
    first; LeakyReLU 0.2), a one-pixel zero pad on the top and left, and a 4x4 conv to one logit
    map: size / 16 per side, 14x14 at 224 px (a 94x94 receptive field)."""

    def __init__(self, ndf: int = 64, in_ch: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for mult in (1, 2, 4):
            layers += [nn.Conv2d(ndf * mult, ndf * mult * 2, 4, stride=2, padding=1),
                       InstanceNormAct(ndf * mult * 2, act="leaky_relu", negative_slope=0.2)]
        layers += [nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(ndf * 8, 1, 4, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) conv weights and zero biases, as the original CycleGAN's 'normal' init."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_models(cfg) -> nn.ModuleDict:
    """G_A, G_B, D_A, D_B, initialised from the global torch RNG (seed it first)."""
    g = lambda: Generator(cfg.ngf, cfg.n_blocks, cfg.upsample, cfg.gen_act, cfg.residual)  # noqa: E731
    d = lambda: Discriminator(cfg.ndf, cfg.n_layers) if cfg.disc == "patchgan" else StudyDiscriminator(cfg.ndf)  # noqa: E731
    models = nn.ModuleDict({"G_A": g(), "G_B": g(), "D_A": d(), "D_B": d()})
    if cfg.init == "normal":
        init_weights(models)
    if cfg.residual:
        models["G_A"].zero_last()
        models["G_B"].zero_last()
    return models


# ----------------------------------------------------------------------------- losses

def gan_loss(logits: torch.Tensor, target: torch.Tensor, mode: str) -> torch.Tensor:
    """LSGAN: mean squared error to the target. Vanilla: binary cross-entropy with logits."""
    target = target.expand_as(logits).to(logits.dtype)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def make_targets(shape: torch.Size | tuple, mode: str, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets for one iteration: (D on real, D on fake, G's adversarial "this is real").

    - "none": 1, 0, 1.
    - "one-sided": 0.9, 0, 1: one-sided label smoothing (Salimans et al. 2016) softens only the
      discriminator's real targets.
    - "noisy": what the study called "label smoothing": real targets 1 + 0.3 N(0, 1) and fake
      targets 0.3 N(0, 1), drawn per discriminator output each iteration, the real draw also being
      G's target. These are noisy labels, symmetric and unbounded, not Salimans et al.'s smoothing;
      with gan_mode="vanilla" (BCE) targets outside [0, 1] make the loss unbounded below.
    """
    if mode == "none":
        real, fake = torch.ones(shape), torch.zeros(shape)
    elif mode == "one-sided":
        real, fake = torch.full(shape, 0.9), torch.zeros(shape)
    elif mode == "noisy":
        real = 1.0 + 0.3 * torch.randn(shape, generator=generator)
        fake = 0.0 + 0.3 * torch.randn(shape, generator=generator)
    else:
        raise ValueError(f"label_smoothing={mode!r}: choose 'none', 'one-sided' or 'noisy'")
    g_real = real if mode == "noisy" else torch.ones(shape)
    return real.to(device), fake.to(device), g_real.to(device)


# ----------------------------------------------------------------------------- image pool

class ImagePool:
    """History of generated images (Shrivastava et al. 2017), as in the original CycleGAN: until it
    is full, each image is stored and returned; then, with probability 1/2, an image is swapped with
    a random stored one, which is returned instead. `generator` (CPU) draws the choices, so they are
    part of the checkpointed random state."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator, self.images = size, generator, []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand((), generator=self.generator).item() > 0.5:
                i = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[i])
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> dict:
        # a plain tensor, so checkpoints load with weights_only=True
        return {"images": torch.stack(self.images).cpu() if self.images else torch.empty(0)}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        imgs = state["images"]
        self.images = [t.to(device) for t in imgs.unbind(0)] if imgs.numel() else []


# ----------------------------------------------------------------------------- the training step

@dataclass
class GAN:
    """Everything one training run updates: models, optimisers, image pools and random stream."""
    models: nn.ModuleDict          # G_A, G_B, D_A, D_B
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    pool_A: ImagePool
    pool_B: ImagePool
    rng: torch.Generator           # label noise and the image pools
    amp: Any                       # melano.infra.precision.Precision: autocast, backward, step, update
    net: nn.ModuleDict | None = None  # what the step runs: `models`, or the same models wrapped for DDP


def new_gan(cfg, device: torch.device, amp, rng_seed: int, channels_last: bool = False) -> GAN:
    """Models initialised from the global torch RNG (seed it first), Adam for G and for D."""
    m = build_models(cfg).to(device)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    adam = lambda a, b: torch.optim.Adam([*m[a].parameters(), *m[b].parameters()], lr=cfg.lr,  # noqa: E731
                                         betas=(cfg.beta1, cfg.beta2))
    rng = torch.Generator().manual_seed(rng_seed)
    return GAN(m, adam("G_A", "G_B"), adam("D_A", "D_B"), ImagePool(cfg.pool_size, rng), ImagePool(cfg.pool_size, rng),
               rng, amp)


def set_requires_grad(modules, flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def train_step(gan: GAN, batch: tuple[torch.Tensor, torch.Tensor], cfg) -> dict[str, float]:
    """One CycleGAN iteration on (real_A, real_B), in the original CycleGAN's order: the generators
    step with both discriminators frozen, then the discriminators step on real images and pooled
    fakes. Returns the losses as floats (weighted, as they enter the totals)."""
    real_A, real_B = batch
    net, plain, amp = gan.net or gan.models, gan.models, gan.amp

    # ---- generators: fool the (frozen) discriminators, cycle back, keep identity --------------
    # Under DDP each generator runs several forwards here (G_A on real_A, fake_A and, for identity,
    # real_B) and one backward covers them all: DDP all-reduces each parameter's summed gradient
    # once (tests/test_dist.py checks it against one process on the whole batch). The frozen
    # discriminators run unwrapped: nothing of theirs is to be all-reduced in this step, and
    # changing requires_grad after DDP wrapped a module is outside DDP's documented use.
    set_requires_grad([plain["D_A"], plain["D_B"]], False)
    gan.opt_G.zero_grad(set_to_none=True)
    with amp.autocast():
        fake_B = net["G_A"](real_A)       # A -> B
        rec_A = net["G_B"](fake_B)        # A -> B -> A
        fake_A = net["G_B"](real_B)       # B -> A
        rec_B = net["G_A"](fake_A)        # B -> A -> B
        pred_fake_B, pred_fake_A = plain["D_A"](fake_B), plain["D_B"](fake_A)
        t_real, t_fake, t_gen = make_targets(pred_fake_B.shape, cfg.label_smoothing, gan.rng, real_A.device)
        loss = {"G_A": gan_loss(pred_fake_B, t_gen, cfg.gan_mode),
                "G_B": gan_loss(pred_fake_A, t_gen, cfg.gan_mode),
                "cycle_A": F.l1_loss(rec_A, real_A) * cfg.lambda_cycle,
                "cycle_B": F.l1_loss(rec_B, real_B) * cfg.lambda_cycle}
        if cfg.lambda_identity > 0:  # G_A fed a B image should leave it alone, and vice versa
            w = cfg.lambda_cycle * cfg.lambda_identity
            loss["idt_A"] = F.l1_loss(net["G_A"](real_B), real_B) * w
            loss["idt_B"] = F.l1_loss(net["G_B"](real_A), real_A) * w
        loss_G = sum(loss.values())
    amp.backward(loss_G)
    amp.step(gan.opt_G)

    # ---- discriminators: real vs pooled fakes, each loss halved ------------------------------
    set_requires_grad([plain["D_A"], plain["D_B"]], True)
    gan.opt_D.zero_grad(set_to_none=True)
    pooled_B, pooled_A = gan.pool_B.query(fake_B.detach()), gan.pool_A.query(fake_A.detach())
    with amp.autocast():
        loss["D_A"] = 0.5 * (gan_loss(net["D_A"](real_B), t_real, cfg.gan_mode)
                             + gan_loss(net["D_A"](pooled_B), t_fake, cfg.gan_mode))
        loss["D_B"] = 0.5 * (gan_loss(net["D_B"](real_A), t_real, cfg.gan_mode)
                             + gan_loss(net["D_B"](pooled_A), t_fake, cfg.gan_mode))
    amp.backward(loss["D_A"] + loss["D_B"])
    amp.step(gan.opt_D)
    amp.update()
    return {k: float(v.detach()) for k, v in loss.items()}


def load_generator(state: dict, which: str = "G_A") -> Generator:
    """G_A (benign -> malignant) or G_B from a trainer's checkpoint dict, in eval mode."""
    c = state["config"]
    g = Generator(c["ngf"], c["n_blocks"], c["upsample"], c["gen_act"], c["residual"])
    g.load_state_dict(state[which])
    return g.eval()
