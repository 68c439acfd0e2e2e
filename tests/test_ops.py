"""melano.ops: the fused InstanceNorm+activation op against the float64 oracle in reference/.

The first run builds the extension (about a minute with nvcc; melano.infra.kernels.load() in the
`loaded` fixture: melano.ops never builds); later runs use the cache.
CUDA cases carry the `gpu` marker and are skipped without a GPU.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from melano import ops
from melano.infra import kernels
from reference import instance_norm_act as oracle

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# NCHW-contiguous input runs the NCHW kernels; channels_last input the NHWC ones.
LAYOUTS = ["nchw", "nhwc"]
DEVICE_LAYOUTS = [pytest.param(d, layout, marks=[pytest.mark.gpu] if d == "cuda" else [], id=f"{layout}-{d}")
                  for d in ("cpu", "cuda") for layout in LAYOUTS]
# Relative tolerance, scaled by the largest expected magnitude (sums such as dweight grow with H*W).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def loaded():
    """Build (or find in the cache) and load the compiled library once; a failed build raises here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELANO_OPS", "ext")
        kernels.load()


@pytest.fixture
def ext(monkeypatch, loaded):
    """Force the compiled op: a failed build fails the test instead of falling back."""
    monkeypatch.setenv("MELANO_OPS", "ext")
    assert ops.backend("cpu") == "ext"


def assert_close(actual, expected, tol, what):
    actual = actual.detach().double().cpu()
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def to_layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def make_params(c, affine, device, dtype, gen):
    if not affine:
        return None, None
    w = torch.randn(c, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    return w, b


def check_against_oracle(x, w, b, act, slope=0.2, eps=1e-5, tol=None, positive_from_output=True):
    """Runs the op forward and backward and compares y, dx, dweight, dbias with the oracle."""
    tol = tol or TOL[x.dtype]
    x = x.detach().requires_grad_()
    for p in (w, b):
        if p is not None:
            p.grad = None
    y = ops.instance_norm_act(x, w, b, eps=eps, act=act, negative_slope=slope)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    # The output keeps a channels_last input's layout; any other input gives an NCHW output.
    assert y.is_contiguous(memory_format=ops.kernel_layout(x)), y.stride()
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    y.backward(gy)
    ry, _, _ = oracle.forward(x, w, b, eps, act, slope)
    # The kink of relu/leaky: differentiate on the side the kernel's own output shows (see oracle).
    pos = (y.detach() > 0) if positive_from_output and act != "none" else None
    rdx, rdw, rdb = oracle.backward(gy, x, w, b, eps, act, slope, positive=pos)
    assert_close(y, ry, tol, "y")
    assert_close(x.grad, rdx, tol, "grad x")
    if w is not None:
        assert_close(w.grad, rdw, tol, "grad weight")
    if b is not None:
        assert_close(b.grad, rdb, tol, "grad bias")
    return y


# ---------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("act", ops.ACTS)
# (3, 7, 33, 65): NHWC planes in two CPU chunks; (2, 70, 9, 7): channel groups plus a partial one.
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 7, 33, 65), (2, 3, 5, 4), (2, 4, 16, 16), (2, 70, 9, 7)])
def test_matches_oracle(ext, device, layout, dtype, affine, act, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = to_layout((torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(device, dtype), layout)
    w, b = make_params(shape[1], affine, device, dtype, gen)
    check_against_oracle(x, w, b, act)


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("act", ops.ACTS)
def test_large_planes(ext, device, layout, affine, act):
    gen = torch.Generator().manual_seed(5)
    x = to_layout(torch.randn(1, 2, 512, 512, generator=gen).to(device), layout)
    w, b = make_params(2, affine, device, torch.float32, gen)
    check_against_oracle(x, w, b, act)


def vma_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(),
                    reason="needs Linux with transparent huge pages")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_of_32_mib_ask_for_huge_pages(ext, monkeypatch, layout):
    """y and dx of 32 MiB are advised MADV_HUGEPAGE (their mapping shows 'hg') and still match the
    oracle; a 16 MiB output, which may lie in glibc's shared heap, is left alone, and so is every
    output under MELANO_HUGE_PAGES=0; another value of it is an error."""
    gen = torch.Generator().manual_seed(31)
    x = to_layout(torch.randn(4, 32, 256, 256, generator=gen), layout)
    check_against_oracle(x, None, None, "leaky_relu")

    def inside(t):  # an address within the buffer's 2 MiB-aligned span
        return (t.data_ptr() + (4 << 20)) & ~((2 << 20) - 1)

    x = x.requires_grad_()
    y = ops.instance_norm_act(x, act="leaky_relu", negative_slope=0.2)
    y.backward(torch.randn(y.shape, generator=gen))
    assert "hg" in vma_flags(inside(y)) and "hg" in vma_flags(inside(x.grad))
    if not os.environ.get("LD_PRELOAD") and not any(k.startswith("MALLOC_") for k in os.environ):
        # With glibc's defaults the advised 32 MiB mappings are unmapped when freed, never reused.
        half = ops.instance_norm_act(to_layout(torch.randn(2, 32, 256, 256, generator=gen), layout))
        assert "hg" not in vma_flags(inside(half))
    monkeypatch.setenv("MELANO_HUGE_PAGES", "0")
    assert "hg" not in vma_flags(inside(ops.instance_norm_act(x.detach())))
    monkeypatch.setenv("MELANO_HUGE_PAGES", "off")
    with pytest.raises(RuntimeError, match="MELANO_HUGE_PAGES must be 0 \\(off\\) or 1 \\(on\\), got 'off'"):
        ops.instance_norm_act(x.detach())


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
def test_weight_without_bias_and_other_slope(ext, device, layout):
    gen = torch.Generator().manual_seed(6)
    x = to_layout(torch.randn(2, 3, 9, 11, generator=gen).to(device), layout)
    w = torch.randn(3, generator=gen).to(device).requires_grad_()
    check_against_oracle(x, w, None, "leaky_relu", slope=0.05)
    b = torch.randn(3, generator=gen).to(device).requires_grad_()
    check_against_oracle(x, None, b, "relu", eps=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last_strided"])
def test_other_layouts_run_nchw(ext, device, layout):
    """Inputs neither NCHW- nor channels_last-contiguous are copied to NCHW and give an NCHW output."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 5, 12, 18, generator=gen).to(device)
    x = {"transposed": base.transpose(2, 3),
         "strided": base[:, :, :, ::2],
         "channels_last_strided": base.to(memory_format=torch.channels_last)[:, :, :, ::2]}[layout]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w, b = make_params(5, True, device, torch.float32, gen)
    y = check_against_oracle(x, w, b, "relu")
    assert y.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_in_channels_last_out(ext, device):
    """A channels_last input's output, gradient and statistics, and those of the same values in NCHW."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 20, 7, 9, generator=gen).to(device)
    w, b = make_params(20, True, device, torch.float32, gen)
    y, mean, rstd = torch.ops.melano.inorm_act_fwd(to_layout(x, "nhwc"), w, b, 1e-5, "leaky_relu", 0.2)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    gy = torch.randn(x.shape, generator=gen).to(device)
    dx, dw, db = torch.ops.melano.inorm_act_bwd(gy, to_layout(x, "nhwc"), w, b, mean, rstd, "leaky_relu", 0.2)
    assert dx.is_contiguous(memory_format=torch.channels_last) and not dx.is_contiguous()
    ref = torch.ops.melano.inorm_act_fwd(x, w, b, 1e-5, "leaky_relu", 0.2)
    ref_grads = torch.ops.melano.inorm_act_bwd(gy, x, w, b, ref[1], ref[2], "leaky_relu", 0.2)
    for mine, theirs in zip((y, mean, rstd, dx, dw, db), (*ref, *ref_grads)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("act", ops.ACTS)
def test_large_offset_planes(ext, device, layout, act):
    """Planes whose mean is 1e3 times their std: a one-pass E[x^2] - E[x]^2 in float32 fails here.
    50 x 50 pixels: two CPU NHWC chunks, whose statistics are merged."""
    gen = torch.Generator().manual_seed(8)
    noise = torch.randn(2, 3, 50, 50, generator=gen, dtype=torch.float64)
    std = torch.tensor([1.0, 1e-3, 50.0]).view(1, 3, 1, 1).double()
    x = (1e3 * std + noise * std).float()
    # The case is discriminating: the naive float32 formula is off by far more than our tolerance.
    x32 = x.flatten(2)
    naive_var = (x32 * x32).mean(-1) - x32.mean(-1) ** 2
    true_var = x.double().flatten(2).var(-1, unbiased=False)
    assert ((naive_var.double() - true_var).abs() / true_var).max() > 1e-2
    w, b = make_params(3, True, device, torch.float32, gen)
    check_against_oracle(to_layout(x.to(device), layout), w, b, act, tol=1e-4)


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("act", ops.ACTS)
def test_constant_planes(ext, device, layout, act):
    """var = 0: xhat = 0, so the output is act(bias) and the gradient stays finite."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    x[:, 0], x[:, 1], x[0, 2] = 0.0, 1e3, -3.7
    x = to_layout(x.to(device), layout)
    w, b = make_params(4, True, device, torch.float32, gen)
    with torch.no_grad():
        b[0] = 0.0  # relu at exactly 0: gradient 0, as F.relu
    y = check_against_oracle(x, w, b, act)
    expected = oracle.forward(torch.zeros(1, 4, 2, 2), None, b, act=act, negative_slope=0.2)[0][0, :, 0, 0]
    for n, c in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]:
        plane = y[n, c].detach().double().cpu()
        assert torch.allclose(plane, expected[c].expand_as(plane), atol=1e-5), (n, c)


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("act", ops.ACTS)
def test_nan_propagates_like_torch(ext, device, layout, act):
    """A NaN poisons its own plane's statistics (and only that plane), as with F.instance_norm + F.relu."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 6, 7, generator=gen)
    x[0, 1, 3, 4] = float("nan")
    x = to_layout(x.to(device), layout)
    w, b = make_params(3, True, device, torch.float32, gen)
    y = check_against_oracle(x, w, b, act, positive_from_output=False)
    assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[1]).all() and torch.isfinite(y[0, [0, 2]]).all()
    # The composed PyTorch ops agree, values and NaN pattern, gradients included.
    xr = x.detach().requires_grad_()
    wr, br = w.detach().requires_grad_(), b.detach().requires_grad_()
    yr = ops.eager_instance_norm_act(xr, wr, br, act=act, negative_slope=0.2)
    yr.backward(torch.ones_like(yr))
    xf, wf, bf = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    ops.instance_norm_act(xf, wf, bf, act=act, negative_slope=0.2).backward(torch.ones_like(yr))
    for mine, theirs in [(y, yr), (xf.grad, xr.grad), (wf.grad, wr.grad), (bf.grad, br.grad)]:
        assert torch.equal(torch.isnan(mine), torch.isnan(theirs))


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("act", ops.ACTS)
def test_gradcheck(ext, device, layout, affine, act):
    gen = torch.Generator().manual_seed(11)
    x = to_layout(torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).to(device), layout).requires_grad_()
    w, b = make_params(3, affine, device, torch.float64, gen)
    inputs = (x, w, b) if affine else (x,)

    def f(x, w=None, b=None):
        return ops.instance_norm_act(x, w, b, act=act, negative_slope=0.2)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ["default", "avx2", "best"])
@pytest.mark.parametrize("layout,shape", [
    ("nchw", (3, 5, 13, 11)),  # 143-element planes: vectors plus a tail
    ("nhwc", (2, 37, 6, 5)),   # groups of 4 vectors, full and partial
    ("nhwc", (2, 16, 6, 5)),   # groups of 2 vectors of AVX2's 8 lanes (4 of baseline's 4)
    ("nhwc", (2, 12, 6, 5)),   # groups of 2, the last vector partial
    ("nhwc", (2, 5, 6, 5)),    # one vector, partial (2 with baseline's 4 lanes)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_instruction_set_variants(ext, monkeypatch, isa, layout, shape, dtype):
    """The CPU loops are compiled for baseline x86-64, AVX2 and (NCHW) AVX-512; MELANO_CPU_ISA caps the pick.
    NHWC groups of vectors are as few as hold C channels: each group size is run here."""
    if isa != "best":
        monkeypatch.setenv("MELANO_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(3)
    x = to_layout((torch.randn(shape, generator=gen) * 2).to(dtype), layout)
    w, b = make_params(shape[1], True, "cpu", dtype, gen)
    for act in ops.ACTS:
        check_against_oracle(x, w, b, act)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_nchw_tails_across_task_ranges(ext, act):
    """Two CPU threads, each a range of 700 planes of 49 elements: a plane's partial last vector is read
    and written whole when later planes of the same range follow, and element by element at the end of
    a range, so that no thread writes into the other's planes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(23)
        x = torch.randn(2, 700, 7, 7, generator=gen) * 3 + 1
        check_against_oracle(x, None, None, act)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ops.ACTS)
@pytest.mark.parametrize("shape", [
    (2, 3, 45, 45),    # NCHW: 2025 elements, 4 per thread, one block per plane; NHWC: 29 idle channel lanes
    (1, 2, 64, 64),    # 4096: 8 per thread
    (1, 2, 64, 65),    # 4160: 16 per thread
    (1, 2, 128, 128),  # 16384: the largest plane kept in registers
    (1, 2, 128, 129),  # 16512: chunked, last chunk partial
    (1, 64, 256, 256),  # the generator's first layer
    (4, 3, 7, 9),
    (2, 70, 33, 31),   # NHWC: three channel tiles, the last partial; a partial batch of pixels
])
def test_cuda_dtypes_and_paths(ext, layout, dtype, act, shape):
    gen = torch.Generator().manual_seed(12)
    x = to_layout((torch.randn(shape, generator=gen) * 3 - 1).to("cuda", dtype), layout)
    w, b = make_params(shape[1], True, "cuda", dtype, gen)
    check_against_oracle(x, w, b, act)


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("shape", [(1, 2, 128, 129), (2, 3, 160, 161)])
def test_chunked_planes_cross_the_kink(ext, device, layout, act, shape):
    """Planes over 16384 elements take the GPU's chunked kernels. Without affine parameters y_pre
    has mean 0 in every plane, so the activation's kink falls inside the chunks (the affine case of
    test_cuda_dtypes_and_paths can put a whole plane on one side of it)."""
    gen = torch.Generator().manual_seed(21)
    x = to_layout(torch.randn(shape, generator=gen).to(device), layout)
    y = check_against_oracle(x, None, None, act).detach()
    assert (y > 0).any() and ((y < 0) if act == "leaky_relu" else (y == 0)).any()


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
@pytest.mark.parametrize("affine", [False, True])
def test_an_empty_batch(ext, device, layout, affine):
    """N = 0: an empty output and input gradient, and zero parameter gradients (a sum over nothing),
    as the eager path gives."""
    x = to_layout(torch.randn(0, 3, 8, 8).to(device), layout).requires_grad_()
    w, b = make_params(3, affine, device, torch.float32, torch.Generator().manual_seed(22))
    y = ops.instance_norm_act(x, w, b, act="relu")
    assert y.shape == x.shape and ops.eager_instance_norm_act(x.detach(), act="relu").shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (w, b) if affine else ():
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_fp32_params_with_half_input(ext, layout):
    """Mixed precision: fp16 activations with fp32 affine parameters (their grads stay fp32)."""
    gen = torch.Generator().manual_seed(13)
    x = to_layout(torch.randn(2, 4, 32, 32, generator=gen).to("cuda", torch.float16), layout)
    w, b = make_params(4, True, "cuda", torch.float32, gen)
    check_against_oracle(x, w, b, "leaky_relu", tol=TOL[torch.float16])
    assert w.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Custom-op machinery: opcheck and torch.compile


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
def test_opcheck(ext, device, layout):
    """Schemas, fake implementations (output strides included) and autograd registration, per layout."""
    assert ops.backend(device) == "ext"  # also registers the op's fake and autograd parts
    gen = torch.Generator().manual_seed(14)
    for dtype, affine, act in [(torch.float32, True, "relu"), (torch.float64, False, "leaky_relu"),
                               (torch.float32, False, "none")]:
        x = to_layout(torch.randn(2, 3, 6, 5, generator=gen, dtype=dtype).to(device), layout).requires_grad_()
        w, b = make_params(3, affine, device, dtype, gen)
        torch.library.opcheck(torch.ops.melano.inorm_act_fwd.default, (x, w, b, 1e-5, act, 0.2))
        y, mean, rstd = torch.ops.melano.inorm_act_fwd(x, w, b, 1e-5, act, 0.2)
        gy = torch.randn_like(y)  # in y's layout, as autograd passes it
        wd, bd = (None, None) if w is None else (w.detach(), b.detach())  # no double backward
        torch.library.opcheck(torch.ops.melano.inorm_act_bwd.default,
                              (gy, x.detach(), wd, bd, mean.detach(), rstd.detach(), act, 0.2))


def _compile_check(device, backend, layout):
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ops.InstanceNormAct(8, affine=True, act="leaky_relu"),
                          nn.Conv2d(8, 4, 3), ops.InstanceNormAct(4, act="relu")).to(device)
    x = torch.randn(2, 3, 12, 12, device=device)
    if layout == "nhwc":  # a channels_last model: convs and norms all stay channels_last
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y_eager = model(x)
    y_eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph break allowed
    y = compiled(x)
    y.square().sum().backward()
    assert y.stride() == y_eager.stride()
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
def test_torch_compile_aot(ext, device, layout):
    """AOTAutograd traces the op with its fake impl and the registered backward."""
    torch._dynamo.reset()
    _compile_check(device, "aot_eager", layout)


@pytest.mark.slow
@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
def test_torch_compile_inductor(ext, device, layout):
    torch._dynamo.reset()
    _compile_check(device, "inductor", layout)


# ---------------------------------------------------------------------------------------------------
# The module


@pytest.mark.parametrize("act,slope,tail", [("relu", 0.2, nn.ReLU()), ("leaky_relu", 0.2, nn.LeakyReLU(0.2)),
                                            ("none", 0.2, nn.Identity())])
def test_module_is_a_drop_in(ext, act, slope, tail):
    torch.manual_seed(16)
    seq = nn.Sequential(nn.InstanceNorm2d(6, affine=True), tail)
    with torch.no_grad():
        seq[0].weight.normal_()
        seq[0].bias.normal_()
    mine = ops.InstanceNormAct(6, affine=True, act=act, negative_slope=slope)
    assert torch.equal(mine.weight, torch.ones(6)) and torch.equal(mine.bias, torch.zeros(6))
    sd = seq.state_dict()
    mine.load_state_dict({"weight": sd["0.weight"], "bias": sd["0.bias"]})
    x = torch.randn(3, 6, 10, 9)
    torch.testing.assert_close(mine(x), seq(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine(x[0]), seq(x[0]), atol=1e-5, rtol=1e-5)  # unbatched (C, H, W)
    plain = ops.InstanceNormAct(6, act=act, negative_slope=slope)
    assert list(plain.state_dict()) == [] and list(nn.InstanceNorm2d(6).state_dict()) == []
    torch.testing.assert_close(plain(x), nn.Sequential(nn.InstanceNorm2d(6), tail)(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="5 channels"):
        mine(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="unknown act"):
        ops.InstanceNormAct(6, act="gelu")


# ---------------------------------------------------------------------------------------------------
# Bad input


BAD_INPUTS = [
    ("3 dims", lambda: (torch.randn(3, 4, 4),), {}, ValueError, "unsqueeze"),
    ("5 dims", lambda: (torch.randn(1, 3, 4, 4, 4),), {}, ValueError, r"\(N, C, H, W\)"),
    ("weight shape", lambda: (torch.randn(2, 3, 4, 4), torch.ones(4)), {}, ValueError, r"weight must have shape \(C,\) = \(3,\)"),
    ("bias shape", lambda: (torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3, 1)), {}, ValueError, "bias must have shape"),
    ("devices", lambda: (torch.randn(2, 3, 4, 4), torch.ones(3, device="meta")), {}, ValueError, "one device"),
    ("int dtype", lambda: (torch.ones(2, 3, 4, 4, dtype=torch.int64),), {}, TypeError, "floating"),
    ("int weight", lambda: (torch.randn(2, 3, 4, 4), torch.ones(3, dtype=torch.int32)), {}, TypeError, "floating"),
    ("act", lambda: (torch.randn(2, 3, 4, 4),), {"act": "gelu"}, ValueError, "unknown act"),
    ("1-element planes", lambda: (torch.randn(4, 3, 1, 1),), {}, ValueError, "more than one"),
    ("negative eps", lambda: (torch.randn(2, 3, 4, 4),), {"eps": -1.0}, ValueError, "eps"),
]


@pytest.mark.parametrize("mode", ["ext", "eager"])
@pytest.mark.parametrize("name,args,kwargs,exc,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused(monkeypatch, mode, name, args, kwargs, exc, match):
    monkeypatch.setenv("MELANO_OPS", mode)
    with pytest.raises(exc, match=match):
        ops.instance_norm_act(*args(), **kwargs)


def test_double_backward_is_refused(ext):
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.instance_norm_act(x).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


def test_op_checks_direct_calls(ext):
    """torch.ops.melano.* called directly (no Python checks) still refuses bad input."""
    assert ops.backend("cpu") == "ext"
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.melano.inorm_act_fwd(torch.ones(1, 2, 3, 3, dtype=torch.int32), None, None, 1e-5, "relu", 0.0)
    with pytest.raises(RuntimeError, match="more than one element"):
        torch.ops.melano.inorm_act_fwd(torch.ones(1, 2, 1, 1), None, None, 1e-5, "relu", 0.0)
    with pytest.raises(RuntimeError, match="unknown act"):
        torch.ops.melano.inorm_act_fwd(torch.ones(1, 2, 3, 3), None, None, 1e-5, "elu", 0.0)
    with pytest.raises(RuntimeError, match=r"\(C,\)"):
        torch.ops.melano.inorm_act_fwd(torch.ones(1, 2, 3, 3), torch.ones(3), None, 1e-5, "relu", 0.0)


# ---------------------------------------------------------------------------------------------------
# Backend selection, the build, finding CUDA


def test_melano_ops_selects_the_path(monkeypatch, loaded):
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    monkeypatch.setenv("MELANO_OPS", "eager")
    assert ops.backend("cpu") == "eager"
    y_ref = ops.instance_norm_act(x)
    assert type(y_ref.grad_fn).__name__ == "ReluBackward0"  # the composed PyTorch ops
    for mode in ("ext", "auto"):
        monkeypatch.setenv("MELANO_OPS", mode)
        assert ops.backend("cpu") == "ext"
        y = ops.instance_norm_act(x)
        assert type(y.grad_fn).__name__ != "ReluBackward0"
        torch.testing.assert_close(y, y_ref)
    monkeypatch.setenv("MELANO_OPS", "fast")
    with pytest.raises(ValueError, match="MELANO_OPS"):
        ops.backend("cpu")


def test_failed_build_falls_back_once_or_fails_loudly(tmp_path):
    """A build that cannot work (no C++ compiler): auto warns once and uses PyTorch; ext raises.
    melano.ops itself never builds: before kernels.load() it warns once that nothing is loaded."""
    script = textwrap.dedent("""
        import logging, os, torch
        logging.basicConfig(level=logging.WARNING)
        from melano import ops
        from melano.infra import kernels
        x = torch.randn(2, 3, 5, 5)
        assert ops.backend("cpu") == "eager" and not os.listdir(os.environ["MELANO_BUILD_DIR"])
        kernels.load()
        kernels.load()
        assert ops.backend("cpu") == "eager"
        for _ in range(3):
            torch.testing.assert_close(ops.instance_norm_act(x), torch.relu(torch.nn.functional.instance_norm(x)))
        os.environ["MELANO_OPS"] = "ext"
        try:
            kernels.load()
        except RuntimeError as e:
            print("EXT_RAISED", "failed to build" in str(e))
        try:
            ops.instance_norm_act(x)
        except RuntimeError as e:
            print("OPS_RAISED", "kernels.load()" in str(e))
    """)
    env = dict(os.environ, MELANO_OPS="auto", MELANO_BUILD_DIR=str(tmp_path), CXX="/bin/false",
               CUDA_HOME=str(tmp_path / "no-cuda"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("did not build") == 1, r.stderr
    assert r.stderr.count("library is not loaded") == 1, r.stderr
    assert "EXT_RAISED True" in r.stdout
    assert "OPS_RAISED True" in r.stdout


def test_build_cli_reports_the_cached_build(ext):
    info = kernels.build()
    assert info.ok, info.error
    r = subprocess.run([sys.executable, "-m", "melano.ops", "build"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["cached"] and out["library"] == info.library
    assert out["backend"]["cpu"] == "ext"


def test_the_header_is_in_the_build_hash(ext, tmp_path):
    """The stamp that lets a cached build skip ninja hashes csrc/'s header too: editing only it rebuilds."""
    info = kernels.build()
    assert info.ok, info.error
    stamp = json.loads((Path(info.build_dir) / "melano_build.json").read_text())
    sources = [kernels.CSRC / n for n in stamp["sources"]]
    headers = [kernels.CSRC / h for h in kernels.HEADERS]
    assert stamp["source_hash"] == kernels._source_hash(sources + headers)
    edited = tmp_path / headers[0].name
    edited.write_bytes(headers[0].read_bytes() + b"// edited\n")
    assert kernels._source_hash(sources + [edited]) != stamp["source_hash"]


def test_cuda_home_follows_a_wrapper_script(monkeypatch, tmp_path):
    toolkit = tmp_path / "cuda-12.9"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho real\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    (wrappers / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrappers / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrappers))
    assert kernels.find_cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", "/opt/explicit-cuda")
    assert kernels.find_cuda_home() == "/opt/explicit-cuda"


def test_cuda_source_compiles(ext):
    """CI has nvcc but no GPU: the default build includes the .cu, compiled for sm_90 to prove it builds."""
    if torch.version.cuda is None:
        pytest.skip("torch is built without CUDA: the .cu cannot be compiled against it")
    home = kernels.find_cuda_home()
    if home is None or not Path(home, "bin", "nvcc").is_file():
        pytest.skip(f"nvcc not found (CUDA_HOME={home!r}): cannot compile the CUDA source here")
    info = kernels.build()
    assert info.ok, info.error
    assert info.cuda, info.cuda_reason
    assert torch._C._dispatch_has_kernel_for_dispatch_key("melano::inorm_act_fwd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("melano::inorm_act_bwd", "CUDA")
    # Every kernel, the NHWC ones included, is compiled into the library (their names are in it).
    library = Path(info.library).read_bytes()
    for kernel in ["fwd_plane_kernel", "bwd_chunk_apply_kernel", "nhwc_fwd_stats_kernel", "nhwc_fwd_finalize_kernel",
                   "nhwc_fwd_apply_kernel", "nhwc_bwd_sums_kernel", "nhwc_bwd_finalize_kernel", "nhwc_bwd_apply_kernel"]:
        assert kernel.encode() in library, kernel


def test_cuda_build_can_be_left_out(monkeypatch):
    # MELANO_CUDA_BUILD=no (set by the pipeline's CLI on a host with no GPU) plans a CPU-only build
    monkeypatch.setenv("MELANO_CUDA_BUILD", "no")
    with_cuda, reason, home, flags = kernels._cuda_plan()
    assert (with_cuda, reason, home, flags) == (False, "MELANO_CUDA_BUILD=no", None, [])
