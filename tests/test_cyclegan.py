"""melano.cyclegan: models against the reference CycleGAN's sizes, losses, label-smoothing targets,
the image pool, the lr schedule, training (loss goes down, fused == reference path, resume is exact,
SIGTERM saves), and translate's output."""

import csv
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from helpers import read_csv, wait_until_training
from melano import augment, gan, schedules
from melano import cyclegan as cg
from melano.infra import checkpoints, precision
from melano.pixels import to_uint8
from melano.translate import TranslateConfig
from melano.translate import translate as run_translate
from melano.infra.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def translate(checkpoint, data, out, **kw) -> Path:
    return run_translate(TranslateConfig(checkpoint=str(checkpoint), data=str(data), out=str(out), device="cpu", **kw))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("upsample", ["transpose", "nearest"])
def test_generator_matches_reference_size_and_shapes(upsample):
    # The reference ResnetGenerator(ngf=64, n_blocks=9, InstanceNorm) has 11,378,179 parameters;
    # nearest+conv upsampling swaps each ConvTranspose2d for a Conv2d of the same size.
    g = gan.Generator(ngf=64, n_blocks=9, upsample=upsample)
    assert n_params(g) == 11_378_179
    # norm layers carry no parameters (affine=False), every conv has a bias
    norms = [m for m in g.modules() if type(m).__name__ == "InstanceNormAct"]
    assert len(norms) == 2 + 1 + 2 * 9 + 2 and all(not m.affine for m in norms)
    assert sum(m.act == "none" for m in norms) == 9  # the second norm of each residual block
    convs = [m for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(c.bias is not None for c in convs)
    assert sum(isinstance(c, nn.ConvTranspose2d) for c in convs) == (2 if upsample == "transpose" else 0)
    small = gan.Generator(ngf=8, n_blocks=2, upsample=upsample, act="leaky")
    for shape in [(2, 3, 32, 32), (1, 3, 48, 64)]:
        y = small(torch.randn(shape))
        assert y.shape == shape and y.abs().max() <= 1  # tanh output, same size as the input


def test_residual_generator_starts_as_the_identity_and_learns():
    # tanh(atanh(x) + G(x)) with G's last conv zeroed: the untrained generator returns its input
    # (up to the clamp that keeps atanh finite), and its last conv still gets a gradient
    torch.manual_seed(0)
    m = gan.build_models(cg.CycleGANConfig(ngf=8, ndf=8, n_blocks=1, residual=True))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = m["G_A"](x)
    assert torch.allclose(y, x.clamp(-0.999, 0.999), atol=1e-6)
    (y - x.flip(-1)).abs().mean().backward()
    assert m["G_A"].model[-1].weight.grad.abs().sum() > 0
    # ... and it is a generator like any other: the same parameters, output in (-1, 1) once trained
    plain = gan.Generator(ngf=8, n_blocks=1)
    assert n_params(plain) == n_params(m["G_A"])
    with torch.no_grad():
        m["G_A"].model[-1].weight.normal_(0, 1.0)
    assert m["G_A"](x).abs().max() <= 1  # tanh: float32 rounds saturated values to 1


def test_residual_generator_survives_its_checkpoint(tmp_path, tiny):
    out = tmp_path / "run"
    cg.train(tiny_cfg(tiny, out, n_blocks=1, max_steps=2, residual=True, device="cpu"))
    state = checkpoints.load_state(out / cg.CHECKPOINT, gan.FORMAT, "checkpoint")
    g = gan.load_generator(state)
    assert state["config"]["residual"] and g.residual
    state = torch.load(out / cg.CHECKPOINT, weights_only=True)
    fresh = gan.Generator(8, 1, residual=True)
    fresh.load_state_dict(state["G_A"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(fresh.eval()(x), g(x))


def test_generator_leaky_activation():
    g = gan.Generator(ngf=8, n_blocks=1, act="leaky")
    acts = {(m.act, m.negative_slope) for m in g.modules() if type(m).__name__ == "InstanceNormAct"}
    assert acts == {("leaky_relu", 0.01), ("none", 0.2)}


def test_discriminator_matches_reference_size_and_patch_shape():
    d = gan.Discriminator(ndf=64, n_layers=3)
    assert n_params(d) == 2_764_737
    norms = [m for m in d.modules() if type(m).__name__ == "InstanceNormAct"]
    assert [(m.act, m.negative_slope) for m in norms] == [("leaky_relu", 0.2)] * 3
    # 70x70 PatchGAN on 256 px gives a 30x30 map of logits (no sigmoid: values outside [0, 1])
    y = d(torch.randn(1, 3, 256, 256))
    assert y.shape == (1, 1, 30, 30)
    assert isinstance(d.model[-1], nn.Conv2d)


def test_patchgan_receptive_field_is_70():
    # gradient of one output logit w.r.t. the input is non-zero on at most a 70x70 window.
    # InstanceNorm mixes whole planes, so measure the conv stack with the norms replaced by LeakyReLU.
    d = gan.Discriminator(ndf=4, n_layers=3).double()
    for i, m in enumerate(d.model):
        if type(m).__name__ == "InstanceNormAct":
            d.model[i] = nn.LeakyReLU(0.2)
    x = torch.randn(1, 3, 128, 128, dtype=torch.double, requires_grad=True)
    y = d(x)
    y[0, 0, 6, 6].backward()
    nz = x.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = nz.any(1).nonzero().flatten(), nz.any(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 <= 70 and cols.max() - cols.min() + 1 <= 70
    assert rows.max() - rows.min() + 1 >= 66  # borders of the window may get zero weight by chance


def test_init_is_normal_002():
    torch.manual_seed(0)
    g = gan.Generator(ngf=16, n_blocks=2)
    gan.init_weights(g)
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    b = torch.cat([m.bias.flatten() for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 5e-4
    assert torch.all(b == 0)


# ----------------------------------------------------------------------------- losses and targets

def test_gan_losses_match_formulas():
    torch.manual_seed(1)
    x, t = torch.randn(4, 1, 6, 6), torch.rand(4, 1, 6, 6)
    assert torch.allclose(gan.gan_loss(x, t, "lsgan"), ((x - t) ** 2).mean())
    s = torch.sigmoid(x.double())
    bce = -(t * torch.log(s) + (1 - t) * torch.log(1 - s)).mean()
    assert torch.allclose(gan.gan_loss(x, t, "vanilla").double(), bce, atol=1e-6)
    assert torch.allclose(gan.gan_loss(x, torch.ones(1), "lsgan"), ((x - 1) ** 2).mean())  # broadcast


@pytest.mark.parametrize("mode,real,fake,gen,std", [
    ("none", 1.0, 0.0, 1.0, 0.0),
    ("one-sided", 0.9, 0.0, 1.0, 0.0),
    ("noisy", 1.0, 0.0, 1.0, 0.3),
])
def test_label_smoothing_target_distributions(mode, real, fake, gen, std):
    g = torch.Generator().manual_seed(0)
    draws = [gan.make_targets((8, 1, 30, 30), mode, g) for _ in range(20)]  # 144k values per kind
    r, f, gg = (torch.stack([d[i] for d in draws]) for i in range(3))
    n = r.numel()
    tol = 5 * max(std, 1e-9) / n ** 0.5  # 5 standard errors of the mean
    assert abs(r.mean().item() - real) < tol + 1e-6 and abs(f.mean().item() - fake) < tol + 1e-6
    assert abs(r.std().item() - std) < 0.01 and abs(f.std().item() - std) < 0.01
    if mode == "noisy":
        # the generator aims at the same noisy real targets the discriminator sees this iteration
        assert all(torch.equal(d[0], d[2]) for d in draws)
        # independent per patch and per iteration, and normal: ~68.3% within one std
        assert abs(((r - 1).abs() < 0.3).float().mean().item() - 0.6827) < 0.01
        assert abs(torch.corrcoef(torch.stack([r.flatten(), f.flatten()]))[0, 1].item()) < 0.01
        assert not torch.equal(draws[0][0], draws[1][0])
    else:
        assert torch.all(gg == gen)
    with pytest.raises(ValueError, match="label_smoothing"):
        gan.make_targets((1,), "two-sided")


# ----------------------------------------------------------------------------- image pool and lr

def test_image_pool_follows_the_reference_rule():
    pool = gan.ImagePool(50, torch.Generator().manual_seed(0))
    for i in range(50):  # filling: every image is returned as is
        x = torch.full((1, 3, 2, 2), float(i))
        assert torch.equal(pool.query(x), x)
    assert len(pool.images) == 50
    from_pool, n = 0, 0
    for i in range(50, 2050):
        x = torch.full((2, 3, 2, 2), float(i))
        before = {float(t[0, 0, 0]) for t in pool.images}
        y = pool.query(x)
        for v in y[:, 0, 0, 0].tolist():
            n += 1
            if v != i:  # an older image: must have been in the pool, and is swapped out
                assert v in before
                from_pool += 1
        assert len(pool.images) == 50
    assert abs(from_pool / n - 0.5) < 0.03
    # state round-trips through plain tensors
    state = pool.state_dict()
    assert isinstance(state["images"], torch.Tensor) and state["images"].shape == (50, 3, 2, 2)
    other = gan.ImagePool(50, torch.Generator())
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(pool.images, other.images))
    assert torch.equal(gan.ImagePool(0, torch.Generator()).query(x), x)  # size 0: pass-through


def test_lr_schedule_constant_then_linear():
    f = [schedules.linear_decay(e, 2, 3) for e in range(5)]
    assert f == pytest.approx([1, 1, 0.75, 0.5, 0.25])
    f = [schedules.linear_decay(e, 100, 100) for e in range(200)]
    assert f[:100] == [1.0] * 100 and np.allclose(np.diff(f[99:]), -1 / 101) and 0 < f[-1] < 0.01


# ----------------------------------------------------------------------------- training on tiny data

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic ISIC folder (32 px), its cache and split, shared by the training tests."""
    from melano import synth
    root = tmp_path_factory.mktemp("cyclegan")
    synth.generate(synth.SynthConfig(out=str(root / "data"), benign=40, malignant=20, size=32, seed=3))
    return root


def tiny_cfg(tiny, out, **kw):
    base = dict(data=str(tiny / "data"), out=str(out), split_csv=str(tiny / "splits.csv"),
                cache_dir=str(tiny / "cache"), size=32, ngf=8, ndf=8, n_blocks=2, batch_size=8,
                epochs=1, epochs_decay=2, pool_size=10, label_smoothing="noisy", sample_every=2,
                checkpoint_every=1000, n_samples=2, workers=0, seed=5)
    base.update(kw)
    return cg.CycleGANConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny):
    """20 steps at lr 1e-3: the checkpoint shared by the loss and translate tests."""
    torch.set_num_threads(1)
    cfg = tiny_cfg(tiny, tiny / "trained", lr=1e-3, max_steps=20, sample_every=10, label_smoothing="none",
                   epochs=4, epochs_decay=4)
    return cfg, cg.train(cfg)


def cycle_l1(G_A, G_B, x):
    with torch.no_grad():
        return F.l1_loss(G_B(G_A(x)), x).item()


def test_training_lowers_the_cycle_loss_and_writes_its_outputs(tiny, trained):
    cfg, ckpt = trained
    state = load_checkpoint(ckpt)
    assert state["step"] == 20
    # the same images before (initial weights, seed cfg.seed) and after training
    x = cg.TrainData(cfg).samples(4)[0]
    torch.manual_seed(cfg.seed)
    init = gan.build_models(cfg)
    trained_G_A, trained_G_B = gan.Generator(8, 2), gan.Generator(8, 2)
    trained_G_A.load_state_dict(state["G_A"])
    trained_G_B.load_state_dict(state["G_B"])
    before, after = cycle_l1(init["G_A"], init["G_B"], x), cycle_l1(trained_G_A, trained_G_B, x)
    assert after < 0.8 * before, (before, after)
    out = Path(cfg.out)
    rows = list(csv.DictReader(open(out / "losses.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    first = np.mean([float(r["cycle_A"]) + float(r["cycle_B"]) for r in rows[:4]])
    last = np.mean([float(r["cycle_A"]) + float(r["cycle_B"]) for r in rows[-4:]])
    assert last < first
    # lr: constant for 4 epochs, then the linear decay
    steps_per_epoch = cg.TrainData(cfg).steps_per_epoch
    for r in rows:
        assert float(r["lr"]) == pytest.approx(1e-3 * schedules.linear_decay(int(r["epoch"]), 4, 4))
        assert int(r["epoch"]) == (int(r["step"]) - 1) // steps_per_epoch
    # sample grids: 2 rows of real A | fake B | rec A | real B | fake A | rec B
    grids = sorted((out / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000010.png", "step_0000020.png"]
    assert Image.open(grids[0]).size == (6 * 34 + 2, 2 * 34 + 2)
    assert Image.open(out / "losses.png").size[0] > 100
    saved = cg.config_from_checkpoint(state)
    assert saved == cfg


def test_fused_and_reference_paths_give_the_same_losses(monkeypatch):
    """Six steps of the fused op, in NCHW and in channels_last (its NHWC kernels and oneDNN's NHWC convs),
    against the eager PyTorch path in NCHW, from the same weights and batches."""
    from melano import ops
    from melano.infra import kernels
    info = kernels.build()
    if not info.ok:
        pytest.skip(f"fused extension unavailable: {info.error}")
    cfg = cg.CycleGANConfig(size=32, ngf=8, ndf=8, n_blocks=2, batch_size=2, label_smoothing="noisy", pool_size=2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)
               for _ in range(6)]
    losses = {}
    for mode, fmt in (("ext", torch.contiguous_format), ("ext", torch.channels_last), ("eager", torch.contiguous_format)):
        monkeypatch.setenv("MELANO_OPS", mode)
        assert ops.backend("cpu") == mode
        torch.manual_seed(0)
        m = gan.build_models(cfg).to(memory_format=fmt)
        opt_G = torch.optim.Adam([*m["G_A"].parameters(), *m["G_B"].parameters()], lr=2e-4, betas=(0.5, 0.999))
        opt_D = torch.optim.Adam([*m["D_A"].parameters(), *m["D_B"].parameters()], lr=2e-4, betas=(0.5, 0.999))
        rng = torch.Generator().manual_seed(1)
        pa, pb = gan.ImagePool(2, rng), gan.ImagePool(2, rng)
        state = gan.GAN(m, opt_G, opt_D, pa, pb, rng, precision.Precision("none", torch.device("cpu")))
        losses[mode, str(fmt)] = [gan.train_step(state, (a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)),
                                                 cfg) for a, b in batches]
        assert m["G_A"].model[1].weight.is_contiguous(memory_format=fmt)  # the steps kept the layout
    ref = losses["eager", str(torch.contiguous_format)]
    for key in [k for k in losses if k[0] == "ext"]:
        for step, (e, r) in enumerate(zip(losses[key], ref)):
            assert e.keys() == r.keys()
            for k in e:
                assert e[k] == pytest.approx(r[k], rel=1e-3, abs=1e-5), (key, step, k)
        assert losses[key][0] != losses[key][-1]  # the steps did train


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_fused_and_reference_agree_under_amp(monkeypatch, amp):
    from melano import ops
    from melano.infra import kernels
    monkeypatch.setenv("MELANO_OPS", "ext")
    kernels.load()
    if ops.backend("cuda") != "ext":
        pytest.skip("no CUDA kernel built")
    cfg = cg.CycleGANConfig(size=64, ngf=8, ndf=8, n_blocks=2, batch_size=2, amp=amp, device="cuda")
    dtype, _ = precision.amp_setup(cfg.amp, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 64, 64, generator=g).cuda() * 2 - 1, torch.rand(2, 3, 64, 64, generator=g).cuda() * 2 - 1)
               for _ in range(3)]
    losses = {}
    for mode in ("ext", "eager"):
        monkeypatch.setenv("MELANO_OPS", mode)
        assert ops.backend("cuda") == mode
        torch.manual_seed(0)
        m = gan.build_models(cfg).cuda()
        opt_G = torch.optim.Adam([*m["G_A"].parameters(), *m["G_B"].parameters()], lr=2e-4, betas=(0.5, 0.999))
        opt_D = torch.optim.Adam([*m["D_A"].parameters(), *m["D_B"].parameters()], lr=2e-4, betas=(0.5, 0.999))
        rng = torch.Generator().manual_seed(1)
        state = gan.GAN(m, opt_G, opt_D, gan.ImagePool(4, rng), gan.ImagePool(4, rng), rng,
                        precision.Precision(cfg.amp, torch.device("cuda")))
        assert state.amp.dtype == dtype
        if amp == "fp16":
            state.amp.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
        losses[mode] = [gan.train_step(state, (a, b), cfg) for a, b in batches]
    rel = 1e-3 if amp == "none" else 5e-2
    for e, r in zip(losses["ext"], losses["eager"]):
        for k in e:
            assert np.isfinite(e[k]) and e[k] == pytest.approx(r[k], rel=rel, abs=1e-3), k


def weights_and_state(ckpt):
    s = load_checkpoint(ckpt)
    flat = {}
    for k in ("G_A", "G_B", "D_A", "D_B"):
        flat.update({f"{k}.{n}": t for n, t in s[k].items()})
    for k in ("opt_G", "opt_D"):
        for pid, st in s[k]["state"].items():
            flat.update({f"{k}.{pid}.{n}": t for n, t in st.items()})
    flat["pool_A"], flat["pool_B"] = s["pool_A"]["images"], s["pool_B"]["images"]
    flat["rng"] = s["rng"]["generators"][0]
    return s, flat


# channels_last: the pipeline's quick preset trains its GANs in NHWC (NHWC kernels, oneDNN's NHWC convs).
@pytest.mark.parametrize("first,channels_last", [("3", False), ("epoch_end", False), ("3", True)])
def test_resume_gives_identical_weights(tiny, tmp_path, first, channels_last):
    cfg = lambda out, **kw: tiny_cfg(tiny, tmp_path / out, channels_last=channels_last, **kw)  # noqa: E731
    one = cfg("one", max_steps=6)
    steps_per_epoch = cg.TrainData(one).steps_per_epoch
    assert steps_per_epoch < 6  # so the runs cross an epoch boundary (and an lr change)
    stop = 3 if first == "3" else steps_per_epoch
    s_one, w_one = weights_and_state(cg.train(one))
    cg.train(cfg("two", max_steps=stop))
    s_mid = load_checkpoint(tmp_path / "two" / cg.CHECKPOINT)
    assert s_mid["step"] == stop
    s_two, w_two = weights_and_state(cg.train(cfg("two", max_steps=6, resume=True)))
    assert s_one["step"] == s_two["step"] == 6 and s_one["epoch"] == s_two["epoch"] == 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # the layout was in effect
    assert s_two["G_A"]["model.1.weight"].is_contiguous(memory_format=fmt)
    assert w_one.keys() == w_two.keys()
    for k in w_one:
        assert torch.equal(w_one[k], w_two[k]), k
    assert s_one["opt_G"]["param_groups"][0]["lr"] == s_two["opt_G"]["param_groups"][0]["lr"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    l1 = drop(csv.DictReader(open(tmp_path / "one" / "losses.csv")))
    l2 = drop(csv.DictReader(open(tmp_path / "two" / "losses.csv")))
    assert l1 == l2 and len(l1) == 6
    # a finished run resumes to nothing; a different config is refused
    assert cg.train(cfg("two", max_steps=6, resume=True)) == tmp_path / "two" / cg.CHECKPOINT
    assert torch.equal(load_checkpoint(tmp_path / "two" / cg.CHECKPOINT)["G_A"]["model.1.weight"],
                       s_two["G_A"]["model.1.weight"])
    with pytest.raises(ValueError, match="ngf"):
        cg.train(cfg("two", max_steps=8, resume=True, ngf=16))
    with pytest.raises(ValueError, match="--resume"):
        cg.train(cfg("two", max_steps=8))


def test_sigterm_saves_a_checkpoint(tiny, tmp_path):
    from melano.infra import kernels
    kernels.build()  # a first build (minutes) happens here, in the cache, not inside the timed child
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "melano.cyclegan", "train", "--data", str(tiny / "data"), "--out", str(out),
           "--split-csv", str(tiny / "splits.csv"), "--cache-dir", str(tiny / "cache"), "--size", "32",
           "--ngf", "8", "--ndf", "8", "--n-blocks", "2", "--batch-size", "2", "--epochs", "1000",
           "--sample-every", "1000", "--checkpoint-every", "100000", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_training(out, proc, 60, lambda: proc.stderr.read().decode()[-2000:])
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + signal.SIGTERM, proc.stderr.read().decode()[-2000:]
    state = load_checkpoint(out / cg.CHECKPOINT)
    rows = list(csv.DictReader(open(out / "losses.csv")))
    assert state["step"] >= 3 and state["step"] == len(rows) == int(rows[-1]["step"])


# ----------------------------------------------------------------------------- translate

def test_translate_writes_exactly_what_it_says(tiny, trained, tmp_path):
    cfg, ckpt = trained
    split = {r["image_name"]: r["split"] for r in read_csv(tiny / "splits.csv")}
    source = {r["image_name"]: r for r in read_csv(tiny / "data" / "train.csv")}
    train_benign = [n for n, s in split.items() if s == "train" and source[n]["target"] == "0"]
    out = translate(ckpt, cfg.data, tmp_path / "syn", limit=5, batch_size=2)
    rows = read_csv(out / "train.csv")
    assert len(rows) == 5
    assert list(rows[0]) == ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                             "diagnosis", "benign_malignant", "target", "source_image"]
    G = gan.load_generator(checkpoints.load_state(ckpt, gan.FORMAT, "checkpoint"))
    for r in rows:
        src = r["source_image"]
        assert src in train_benign  # never val/test, never malignant
        assert r["target"] == "1" and r["benign_malignant"] == "malignant" and r["diagnosis"] == "synthetic"
        for col in ("patient_id", "sex", "age_approx", "anatom_site_general_challenge"):
            assert r[col] == source[src][col]
        img = np.asarray(Image.open(out / "jpeg" / "train" / f"{r['image_name']}.jpg").convert("RGB"))
        assert img.shape == (32, 32, 3)
        # the pixels are G_A of the source (decoded and resized by Pillow here, independently)
        x = np.asarray(Image.open(tiny / "data" / "jpeg" / "train" / f"{src}.jpg").convert("RGB")
                       .resize((32, 32), Image.Resampling.BILINEAR))
        x = torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            y = to_uint8(G(x))[0]
        # the file is encoded like its source: same size, quantisation tables and chroma subsampling
        from PIL import JpegImagePlugin
        real = Image.open(tiny / "data" / "jpeg" / "train" / f"{src}.jpg")
        written = Image.open(out / "jpeg" / "train" / f"{r['image_name']}.jpg")
        assert written.size == real.size and written.quantization == real.quantization
        assert JpegImagePlugin.get_sampling(written) == JpegImagePlugin.get_sampling(real)
        # and its pixels differ from G_A's by that encoding's own error (Pillow, independently)
        buf = io.BytesIO()
        Image.fromarray(y).save(buf, "JPEG", qtables=real.quantization,
                                subsampling=JpegImagePlugin.get_sampling(real))
        codec_error = np.abs(np.asarray(Image.open(buf).convert("RGB"), float) - y).mean()
        error = np.abs(img.astype(float) - y).mean()
        assert error < codec_error + 2, (error, codec_error)
    assert len({r["image_name"] for r in rows}) == 5
    # a seeded random sample, in data order, not simply the first 5 (which favour the first patients)
    sources = [r["source_image"] for r in rows]
    assert sources == sorted(sources, key=train_benign.index) and sources != train_benign[:5]
    # melano.data reads it like any ISIC folder
    from melano import data
    index = data.read_index(out)
    assert len(index) == 5 and index.targets.tolist() == [1] * 5
    # no limit: every training-split benign image
    full = translate(ckpt, cfg.data, tmp_path / "all")
    assert sorted(r["source_image"] for r in read_csv(full / "train.csv")) == sorted(train_benign)
    # the CLI wraps the same function
    assert cg.main(["translate", "--checkpoint", str(ckpt), "--data", cfg.data, "--out", str(tmp_path / "cli"),
                    "--limit", "2", "--device", "cpu"]) == 0
    cli_rows = read_csv(tmp_path / "cli" / "train.csv")
    assert len(cli_rows) == 2 and all(r in rows for r in cli_rows)  # a smaller limit: a subset
    # and the folder holds exactly the images its train.csv lists (re-running with a smaller limit
    # into a folder that had more leaves no strays)
    with pytest.raises(ValueError, match="--force"):  # an earlier translation is not overwritten by accident
        translate(ckpt, cfg.data, tmp_path / "all", limit=3)
    translate(ckpt, cfg.data, tmp_path / "all", limit=3, force=True)
    listed = {r["image_name"] + ".jpg" for r in read_csv(tmp_path / "all" / "train.csv")}
    assert len(listed) == 3 and {p.name for p in (tmp_path / "all" / "jpeg" / "train").iterdir()} == listed
    # and a data folder is never written into: its labels stay as they were
    before = (tiny / "data" / "train.csv").read_bytes()
    assert cg.main(["translate", "--checkpoint", str(ckpt), "--data", cfg.data, "--out", cfg.data,
                    "--limit", "2", "--device", "cpu"]) == 2
    assert (tiny / "data" / "train.csv").read_bytes() == before


def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="upsample"):
        cg.CycleGANConfig(upsample="bilinear")
    with pytest.raises(ValueError, match="--label-smoothing"):
        cg.CycleGANConfig(label_smoothing="soft")
    with pytest.raises(ValueError, match="size"):
        cg.CycleGANConfig(size=30)
    assert cg.CycleGANConfig(size=256).n_blocks == 9 and cg.CycleGANConfig(size=128).n_blocks == 6


# ----------------------------------------------------------------------------- the study's variants

def test_study_discriminator_gives_a_14x14_map_at_224_px():
    d = gan.StudyDiscriminator(ndf=8)
    assert d(torch.randn(1, 3, 224, 224)).shape == (1, 1, 14, 14)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    # the study's init is PyTorch's default (kaiming uniform), not N(0, 0.02)
    cfg = cg.CycleGANConfig(size=32, ngf=8, ndf=8, n_blocks=1, disc="study", init="default")
    torch.manual_seed(0)
    w = gan.build_models(cfg)["D_A"].model[0].weight
    bound = 1 / (3 * 16) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 48
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_nearest_zero_upsampling_pads_with_zeros():
    g = gan.Generator(ngf=8, n_blocks=1, upsample="nearest_zero")
    ups = [m for m in g.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 2 and n_params(g) == n_params(gan.Generator(ngf=8, n_blocks=1, upsample="nearest"))
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in g.modules()) == 2 + 2  # stem, head, 1 block x 2
    assert g(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_malignant_pairing_and_study_augmentation(tiny):
    cfg = tiny_cfg(tiny, tiny / "unused", pairing="malignant")
    d = cg.TrainData(cfg)
    assert len(d.dataset) == d.n_B  # an epoch is every malignant image once
    d.dataset.set_epoch(3)
    items = [d.dataset[i] for i in range(len(d.dataset))]
    assert sorted(it["b_row"] for it in items) == sorted(d.rows_B.tolist())
    assert {it["a_row"] for it in items} <= set(d.rows_A.tolist())
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    y = augment.study(x, torch.Generator().manual_seed(0))
    for i in range(2):  # each image is its rotation by 90 degrees after some of the two flips
        candidates = [x[i].flip(dims).rot90(1, dims=(1, 2)) for dims in ((), (2,), (1,), (1, 2))]
        assert any(torch.equal(y[i], c) for c in candidates)
    assert not any(torch.equal(y[i], x[i]) for i in range(2))


def test_default_split_and_cache_go_under_out_not_the_working_directory(tiny, tmp_path, monkeypatch):
    # issue 11, bug 1: the split went to ./runs/cyclegan/splits.csv (an argparse default computed
    # from the default --out), and a second experiment from the same folder then failed
    from melano import synth
    other = tmp_path / "other"
    synth.generate(synth.SynthConfig(out=str(other), benign=30, malignant=12, size=32, seed=8))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data_before = sorted(p.name for p in (tiny / "data").iterdir())
    for data, out in ((tiny / "data", "x"), (other, "y")):
        argv = ["train", "--data", str(data), "--out", out, "--size", "32", "--ngf", "4", "--ndf", "4",
                "--n-blocks", "1", "--batch-size", "4", "--max-steps", "1", "--workers", "0", "--device", "cpu"]
        assert cg.main(argv) == 0
        assert (cwd / out / "splits.csv").is_file() and (cwd / out / "cache").is_dir()
    assert sorted(p.name for p in cwd.iterdir()) == ["x", "y"]  # nothing else in the working directory
    assert sorted(p.name for p in (tiny / "data").iterdir()) == data_before  # nor in --data
