"""Tests for kernels/: Triton RMSNorm and soft-capped cross-entropy against float64 torch references.

On a machine without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. The
interpreter is chosen when triton.jit decorates the kernels, i.e. when `kernels` is first imported,
so TRITON_INTERPRET=1 is set here around that import, and again while this module's tests run (the
interpreter reads it at launch too). Outside those windows the variable is restored, so other test
modules and the subprocesses they start see their usual environment (kernels then take the torch path
on CPU). With CUDA the same tests run on the GPU with a larger sweep.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")


def _set_interpret(value):
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value


if not HAS_CUDA:
    _set_interpret("1")
import kernels  # noqa: E402
from kernels import (  # noqa: E402
    linear_softcap_cross_entropy,
    qkv_heads,
    qkv_heads_reference,
    relu2_mlp,
    relu2_mlp_reference,
    rms_norm,
    rms_norm_reference,
    softcap_cross_entropy,
    softcap_cross_entropy_reference,
)
from kernels import cross_entropy  # noqa: E402
from kernels import mlp as mlp_kernels  # noqa: E402
from kernels import qkv as qkv_kernels  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_ACTIVE = kernels.triton_available(DEVICE)
_set_interpret(_INTERPRET_BEFORE)


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter_on_cpu():
    if not HAS_CUDA:
        _set_interpret("1")
    yield
    _set_interpret(_INTERPRET_BEFORE)

REPO = Path(__file__).resolve().parents[1]

# Norm-wise relative error allowed against float64, by the dtype the result is stored in. bf16 keeps
# 8 mantissa bits (2^-9 relative rounding), fp32 results see only fp32 accumulation error.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}

needs_triton = pytest.mark.skipif(
    not TRITON_ACTIVE,
    reason="Triton path inactive here: triton missing, or `kernels` was imported before TRITON_INTERPRET=1 "
    "was set (run this file on its own, or set TRITON_INTERPRET=1 for CPU runs)",
)

ROWS = [1, 7, 33, 257] + ([4099, 65536] if HAS_CUDA else [])
WIDTHS = [64, 96, 512, 1000, 2048] + ([4096, 5000] if HAS_CUDA else [])
CE_ROWS = [1, 7, 33, 257] + ([4099] if HAS_CUDA else [])
# 1000 and 5000 are not powers of two; 5000 also spans two vocab blocks with a ragged last one.
VOCABS = [1000, 1024, 4096, 5000, 8192] + ([50304] if HAS_CUDA else [])
# The interpreter is slow: on CPU the 257-row case runs at the small vocabularies only.
CE_SHAPES = [(n, v) for n in CE_ROWS for v in VOCABS if HAS_CUDA or n < 257 or v <= 1024]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}"


def rms_norm_f64(x, weight, eps):
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def softcap_ce_f64(logits, targets, softcap, reduction):
    c = softcap * torch.tanh(logits / softcap) if softcap > 0 else logits
    loss = F.cross_entropy(c.reshape(-1, c.shape[-1]), targets.reshape(-1), reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def check_rms_norm(x, weight, eps=1e-6):
    """Forward and gradients of rms_norm on (x, weight) against float64 autograd."""
    dtype = x.dtype
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_() if weight is not None else None
    y = rms_norm(x, weight, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_() if weight is not None else None
    y64 = rms_norm_f64(x64, w64, eps)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, "dx")
    if weight is not None:
        assert weight.grad.dtype == weight.dtype
        assert_close(weight.grad, w64.grad, weight.dtype, "dw")


def check_ce(logits, targets, softcap, reduction):
    """Loss and logits gradient of softcap_cross_entropy against float64 autograd."""
    dtype = logits.dtype
    logits = logits.detach().requires_grad_()
    loss = softcap_cross_entropy(logits, targets, softcap, reduction)
    assert loss.dtype == torch.float32
    assert loss.shape == (targets.shape if reduction == "none" else ())
    dloss = torch.rand_like(loss) + 0.5 if reduction == "none" else torch.ones_like(loss)
    loss.backward(dloss)

    z64 = logits.detach().double().requires_grad_()
    loss64 = softcap_ce_f64(z64, targets, softcap, reduction)
    loss64.backward(dloss.double())
    assert_close(loss, loss64, torch.float32, "loss")  # fp32 math on exactly representable inputs
    assert logits.grad.dtype == dtype
    assert_close(logits.grad, z64.grad, dtype, "dlogits")


# --------------------------------------------------------------------------------------------------
# RMSNorm


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_sweep(rows, width, dtype):
    torch.manual_seed(rows * 7919 + width)
    x = (torch.randn(rows, width, device=DEVICE) * 3 + 0.5).to(dtype)
    check_rms_norm(x, None)
    w = (1 + 0.5 * torch.randn(width, device=DEVICE)).to(dtype)
    check_rms_norm(x, w)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_shapes_and_layouts(dtype):
    torch.manual_seed(1)
    # per-head q/k norm: (batch, seq, heads, head_dim)
    check_rms_norm(torch.randn(2, 5, 8, 64, device=DEVICE).to(dtype), None)
    # a column slice: rows are strided, columns contiguous (no copy needed)
    wide = torch.randn(9, 160, device=DEVICE).to(dtype)
    check_rms_norm(wide[:, :96], None)
    # transposed input: not viewable as rows, gets copied
    check_rms_norm(torch.randn(96, 11, device=DEVICE).to(dtype).t(), torch.rand(96, device=DEVICE).to(dtype) + 0.5)
    # fp32 weight on bf16 activations: output stays in x's dtype, dw in the weight's
    check_rms_norm(torch.randn(13, 512, device=DEVICE).to(dtype), torch.rand(512, device=DEVICE) + 0.5)
    # custom eps
    check_rms_norm(torch.randn(5, 64, device=DEVICE).to(dtype) * 1e-2, None, eps=1e-2)
    # rows too wide for one program take the torch path
    check_rms_norm(torch.randn(2, kernels.rmsnorm.MAX_TRITON_WIDTH + 8, device=DEVICE).to(dtype), None)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_extreme_values(dtype):
    torch.manual_seed(2)
    x = torch.randn(6, 512, device=DEVICE)
    x[0] *= 1e4
    x[1] *= 1e-4
    x[2] = 0.0  # rstd = 1/sqrt(eps): finite, y = 0
    x[3, ::2] = -3e4
    x = x.to(dtype).requires_grad_()
    w = torch.randn(512, device=DEVICE).to(dtype).requires_grad_()
    y = rms_norm(x, w)
    y.backward(torch.randn_like(y))
    for t in (y, x.grad, w.grad):
        assert torch.isfinite(t).all()
    assert (y[2] == 0).all()
    check_rms_norm(x.detach(), w.detach())


def test_rms_norm_empty():
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 64) and (w.grad == 0).all()


# --------------------------------------------------------------------------------------------------
# Soft-capped cross-entropy


@needs_triton
@pytest.mark.parametrize("softcap", [30.0, 0.0], ids=["cap30", "nocap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,vocab", CE_SHAPES)
def test_ce_sweep(rows, vocab, dtype, softcap):
    torch.manual_seed(rows * 7919 + vocab)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 8).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    reduction = ("mean", "sum", "none")[(rows + vocab) % 3]
    check_ce(logits, targets, softcap, reduction)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ce_reductions(reduction, dtype):
    torch.manual_seed(3)
    logits = (torch.randn(37, 1024, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, 1024, (37,), device=DEVICE)
    check_ce(logits, targets, 30.0, reduction)
    # leading dims: (batch, seq, V) logits with (batch, seq) targets
    check_ce(logits[:36].view(4, 9, 1024), targets[:36].view(4, 9), 30.0, reduction)


@needs_triton
@pytest.mark.parametrize("softcap", [30.0, 0.0], ids=["cap30", "nocap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ce_large_logits(dtype, softcap):
    torch.manual_seed(4)
    rows, vocab = 9, 5000
    logits = torch.randn(rows, vocab, device=DEVICE).sign() * (5e3 + 5e3 * torch.rand(rows, vocab, device=DEVICE))
    logits[0] = -1e4  # a constant row: uniform softmax
    logits[1, 17] = 1e4  # target is the dominant logit: loss ~ 0
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[1] = 17
    logits = logits.to(dtype)
    for reduction in ("none", "mean"):
        check_ce(logits, targets, softcap, reduction)


@needs_triton
def test_ce_strided_logits():
    torch.manual_seed(5)
    wide = torch.randn(11, 1100, device=DEVICE) * 5
    targets = torch.randint(0, 1000, (11,), device=DEVICE)
    check_ce(wide[:, :1000], targets, 30.0, "none")  # row stride 1100, columns contiguous
    check_ce(torch.randn(1000, 11, device=DEVICE).t(), targets, 30.0, "mean")  # needs a copy


@pytest.mark.parametrize("softcap", [30.0, 0.0], ids=["cap30", "nocap"])
def test_ce_out_of_range_targets(softcap):
    torch.manual_seed(6)
    vocab = 1024
    logits = torch.randn(5, vocab, device=DEVICE, requires_grad=True)
    targets = torch.tensor([3, -1, vocab, 7, 10**9], device=DEVICE)
    loss = softcap_cross_entropy(logits, targets, softcap, "none")
    bad = torch.tensor([False, True, True, False, True], device=DEVICE)
    assert torch.isnan(loss[bad]).all()
    expected = softcap_ce_f64(logits.detach().double()[~bad], targets[~bad], softcap, "none")
    assert rel_err(loss[~bad], expected) < TOL[torch.float32]
    loss[~bad].sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_ce_empty():
    logits = torch.randn(0, 1024, device=DEVICE, requires_grad=True)
    loss = softcap_cross_entropy(logits, torch.zeros(0, dtype=torch.long, device=DEVICE), 30.0, "sum")
    loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (0, 1024)


def test_ce_bad_reduction():
    with pytest.raises(ValueError):
        softcap_cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), 30.0, "max")


# --------------------------------------------------------------------------------------------------
# lm_head matmul + soft-capped cross-entropy, chunked


def check_linear_ce(h, weight, targets, softcap, reduction, chunk_rows):
    """Loss and the gradients of h and weight against float64 autograd of softcap CE(h @ weight.T)."""
    h = h.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = linear_softcap_cross_entropy(h, weight, targets, softcap, reduction, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32 and loss.shape == (targets.shape if reduction == "none" else ())
    dloss = torch.rand_like(loss) + 0.5
    loss.backward(dloss)

    h64, w64 = (a.detach().double().requires_grad_() for a in (h, weight))
    loss64 = softcap_ce_f64(h64 @ w64.t(), targets, softcap, reduction)
    loss64.backward(dloss.double())
    assert h.grad.dtype == h.dtype and weight.grad.dtype == weight.dtype
    # In bf16 four roundings stack up (weight, logits, their gradient, the products), so the bound against
    # float64 is 2x the single-rounding one; the unfused path (matmul, then the CE op) must agree closely.
    tol = {torch.float32: TOL[torch.float32], torch.bfloat16: 2 * TOL[torch.bfloat16]}[h.dtype]
    for what, got, want in (("loss", loss, loss64), ("dh", h.grad, h64.grad), ("dweight", weight.grad, w64.grad)):
        assert torch.isfinite(got).all() and rel_err(got, want) <= tol, f"{what}: {rel_err(got, want):.3g}"
    hu, wu = (a.detach().requires_grad_() for a in (h, weight))
    softcap_cross_entropy(hu @ wu.to(h.dtype).t(), targets, softcap, reduction).backward(dloss)
    for what, got, want in (("dh", h.grad, hu.grad), ("dweight", weight.grad, wu.grad)):
        assert rel_err(got, want) <= TOL[h.dtype], f"{what} vs unfused: {rel_err(got, want):.3g}"


LINEAR_CE_SHAPES = [(1, 64, 1024), (7, 64, 1000), (33, 96, 5000), (100, 64, 1024), (16, 128, 8192)] + (
    [(4099, 512, 1024), (1000, 512, 8192)] if HAS_CUDA else [])


@needs_triton
@pytest.mark.parametrize("softcap", [30.0, 0.0], ids=["cap30", "nocap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,dim,vocab", LINEAR_CE_SHAPES)
def test_linear_ce_sweep(rows, dim, vocab, dtype, softcap):
    torch.manual_seed(rows * 31 + vocab)
    h = torch.randn(rows, dim, device=DEVICE).to(dtype)
    weight = torch.randn(vocab, dim, device=DEVICE) * (4 / dim ** 0.5)  # fp32 master weight, logits ~ N(0, 16)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    reduction = ("mean", "sum")[rows % 2]
    for chunk_rows in (None, max(1, rows // 3)):  # one chunk, and three or more with a ragged last one
        check_linear_ce(h, weight, targets, softcap, reduction, chunk_rows)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_reductions_with_and_without_grad(reduction):
    torch.manual_seed(12)
    h = torch.randn(4, 9, 64, device=DEVICE)  # leading dims, as the model calls it
    weight = torch.randn(1024, 64, device=DEVICE) * 0.5
    targets = torch.randint(0, 1024, (4, 9), device=DEVICE)
    check_linear_ce(h, weight, targets, 30.0, reduction, 5)
    with torch.no_grad():
        got = linear_softcap_cross_entropy(h, weight, targets, 30.0, reduction, chunk_rows=5)
    want = softcap_ce_f64(h.double() @ weight.double().t(), targets, 30.0, reduction)
    assert got.shape == want.shape and rel_err(got, want) < TOL[torch.float32]


def test_linear_ce_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    """Every block of logits the op makes is one chunk: rows <= chunk_rows, together exactly the N rows."""
    seen = []
    real = cross_entropy._ce_loss_and_grad_

    def spy(logits, *args):
        seen.append(tuple(logits.shape))
        return real(logits, *args)

    monkeypatch.setattr(cross_entropy, "_ce_loss_and_grad_", spy)
    h = torch.randn(50, 64, device=DEVICE, requires_grad=True)
    weight = torch.randn(1024, 64, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 1024, (50,), device=DEVICE)
    linear_softcap_cross_entropy(h, weight, targets, 30.0, chunk_rows=16).backward()
    assert seen == [(16, 1024), (16, 1024), (16, 1024), (2, 1024)]
    seen.clear()
    monkeypatch.setattr(cross_entropy, "CHUNK_ROWS", 20)  # the default chunk
    linear_softcap_cross_entropy(h, weight, targets, 30.0).backward()
    assert seen == [(20, 1024), (20, 1024), (10, 1024)]


def test_linear_ce_empty_and_bad_reduction():
    weight = torch.randn(1024, 64, device=DEVICE, requires_grad=True)
    h = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    loss = linear_softcap_cross_entropy(h, weight, torch.zeros(0, dtype=torch.long, device=DEVICE), 30.0, "sum")
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 64) and not weight.grad.any()
    with pytest.raises(ValueError):
        linear_softcap_cross_entropy(h, weight, torch.zeros(0, dtype=torch.long), 30.0, "max")


# --------------------------------------------------------------------------------------------------
# References, fallback, torch.library / torch.compile integration


# --------------------------------------------------------------------------------------------------
# MLP with relu^2 in the matmul epilogues

# (rows, model dim, hidden): ragged rows and a hidden width that no tile divides (but rows stay 16-byte aligned, as
# TMA needs), and the model's own shape on CUDA.
MLP_SHAPES = [(1, 32, 96), (7, 64, 104), (65, 96, 256), (130, 64, 192)] + (
    [(4099, 512, 1536), (98304, 512, 1536)] if HAS_CUDA else [])


def check_relu2_mlp(x, w1, w2, slope=0.0):
    """Output and the gradients of x, w1, w2 against float64 autograd of leaky_relu(x @ w1.T, slope)^2 @ w2.T."""
    dtype = x.dtype
    x, w1, w2 = (a.detach().requires_grad_() for a in (x, w1, w2))
    out = relu2_mlp(x, w1, w2, slope)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], w2.shape[0])
    g = torch.randn_like(out)
    out.backward(g)
    x64, w164, w264 = (a.detach().double().requires_grad_() for a in (x, w1, w2))
    out64 = relu2_mlp_reference(x64, w164, w264, slope)
    out64.backward(g.double())
    # bf16: the stored activation and gradient of the hidden layer are rounded once more than the output
    tol = {torch.float32: TOL[torch.float32], torch.bfloat16: 2 * TOL[torch.bfloat16]}[dtype]
    for what, got, want in [("out", out, out64), ("dx", x.grad, x64.grad), ("dw1", w1.grad, w164.grad),
                            ("dw2", w2.grad, w264.grad)]:
        assert got.dtype == dtype and torch.isfinite(got).all(), what
        assert rel_err(got, want) <= tol, f"{what}: relative error {rel_err(got, want):.3g}"


def mlp_inputs(rows, dim, hidden, dtype, lead=()):
    x = torch.randn(*lead, rows, dim, device=DEVICE)
    w1 = torch.randn(hidden, dim, device=DEVICE) / dim ** 0.5
    w2 = torch.randn(dim, hidden, device=DEVICE) / hidden ** 0.5
    return x.to(dtype), w1.to(dtype), w2.to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,dim,hidden", MLP_SHAPES)
def test_relu2_mlp_sweep(rows, dim, hidden, dtype):
    torch.manual_seed(rows + hidden)
    x, w1, w2 = mlp_inputs(rows, dim, hidden, dtype)
    assert mlp_kernels._use_triton(x, w1, w2) == (not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9)
    check_relu2_mlp(x, w1, w2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,dim,hidden", MLP_SHAPES)
def test_leaky_relu2_mlp_sweep(rows, dim, hidden, dtype):
    """LeakyReLU(0.5)^2 (MLP_LEAKY_SLOPE) through the same kernels, against float64 autograd."""
    torch.manual_seed(rows + hidden + 1)
    check_relu2_mlp(*mlp_inputs(rows, dim, hidden, dtype), slope=0.5)


@needs_triton
@pytest.mark.parametrize("flatten,per_sm", [(True, 1), (False, 1), (False, 2), (True, 3)])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_relu2_gemm_tile_overrides(flatten, per_sm, backward):
    """The persistent GEMM with a tile entry of its own (bench_gemm.py's alternatives: the loop over a program's tiles
    not flattened, several programs per SM) against float64: relu(x @ w1.T)^2, and 2 sqrt(a) * (g @ w2)."""
    torch.manual_seed(per_sm + 2 * backward)
    on_gpu = DEVICE == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    x, w1, w2 = mlp_inputs(200, 64, 192, dtype)
    tiles = dict(BLOCK_M=64 if on_gpu else 32, BLOCK_N=128 if on_gpu else 64, BLOCK_K=32, GROUP_M=2,
                 FLATTEN=flatten, PROGRAMS_PER_SM=per_sm, **(dict(num_warps=4, num_stages=2) if on_gpu else {}))
    h = x.double() @ w1.double().T
    a = torch.relu(h).square()
    if backward:
        g = torch.randn(200, 64, device=DEVICE).to(dtype)
        got = mlp_kernels._launch(g, w2, a.to(dtype), b_kmajor=False, backward=True, slope=0.0, tiles=tiles)
        want = 2 * torch.relu(h) * (g.double() @ w2.double())
    else:
        got, want = mlp_kernels._launch(x, w1, None, b_kmajor=True, backward=False, slope=0.0, tiles=tiles), a
    assert rel_err(got, want) <= 2 * TOL[dtype]


def test_leaky_relu2_reference_hand_computed():
    """leaky(h)^2 and its derivative by hand at h = 2, -2, 0 with slope 0.5: 4, 1, 0 and 4, -1, 0; the fallback
    path (no Triton) gives them too."""
    h = torch.tensor([[2.0, -2.0, 0.0]], dtype=torch.float64)
    x, w1, w2 = torch.ones(1, 1, dtype=torch.float64, requires_grad=True), h.T.clone(), torch.ones(1, 3, dtype=torch.float64)
    out = relu2_mlp_reference(x, w1, w2, 0.5)
    assert out.item() == 5.0
    act = F.leaky_relu(h, 0.5).square()
    assert act.tolist() == [[4.0, 1.0, 0.0]]
    g_h = mlp_kernels._relu2_grad_of_matmul(torch.ones(1, 1, dtype=torch.float64), w2, act, h, 0.5, fused=False)
    assert g_h.tolist() == [[4.0, -1.0, 0.0]]


@needs_triton
def test_relu2_mlp_unaligned_rows_take_the_torch_path():
    """bf16 rows of 100 elements (200 bytes) are no TMA tiles: same results through the torch path."""
    torch.manual_seed(16)
    x, w1, w2 = mlp_inputs(7, 64, 100, torch.bfloat16)
    assert not mlp_kernels._use_triton(x, w1, w2) and mlp_kernels._use_triton(x, w1[:96], w2[:, :96].contiguous())
    check_relu2_mlp(x, w1, w2)
    check_relu2_mlp(x, w1, w2, slope=0.5)


@needs_triton
def test_relu2_mlp_batched_input_and_dead_units():
    """(B, T, d) input; a hidden unit that never fires gets exactly zero gradient in its rows of w1 and w2."""
    torch.manual_seed(14)
    x, w1, w2 = mlp_inputs(5, 32, 96, torch.float32, lead=(3,))
    x = x.abs() + 0.01
    w1[7] = -1.0  # positive inputs, negative weights: unit 7's pre-activation is negative for every token
    check_relu2_mlp(x, w1, w2)
    x, w1, w2 = (a.detach().requires_grad_() for a in (x, w1, w2))
    relu2_mlp(x, w1, w2).sum().backward()
    assert torch.all(w1.grad[7] == 0) and torch.all(w2.grad[:, 7] == 0)


def test_relu2_mlp_rejects_mixed_dtypes():
    x, w1, w2 = mlp_inputs(3, 32, 64, torch.float32)
    with pytest.raises(TypeError, match="one dtype"):
        relu2_mlp(x, w1.to(torch.bfloat16), w2)


# (sequences, seq_len, heads, kv_heads, head dim, rope pairs, value embedding): partial, full and no rotary, a
# ragged last token block, MHA and GQA, and the model's shape (8 heads, 4 KV heads, 64 dims, 16 rotary) on CUDA.
QKV_SHAPES = [(2, 5, 8, 4, 64, 8, True), (3, 7, 4, 2, 16, 8, False), (1, 3, 2, 1, 32, 0, True),
              (2, 33, 4, 4, 64, 32, False)] + ([(8, 2048, 8, 4, 64, 8, True)] if HAS_CUDA else [])


def qkv_inputs(n, t, heads, kv_heads, d, half, ve, dtype):
    qkv = torch.randn(n, t, (heads + 2 * kv_heads) * d, device=DEVICE) * 3
    angles = torch.rand(t, half, device=DEVICE) * 6.3
    gain = torch.rand(heads, device=DEVICE) + 0.5
    value_embed = torch.randn(n, t, kv_heads * d, device=DEVICE).to(dtype) if ve else None
    return qkv.to(dtype), angles.cos(), angles.sin(), gain, value_embed


def qkv_heads_f64(qkv, cos, sin, gain, value_embed, heads, kv_heads, eps=1e-6):
    """The op's math written out in float64, independently of kernels/: per-head RMSNorm, rotation of the pairs
    (i, i + half), gain on q, value embedding added to v."""
    n, t, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    q, k, v = qkv.double().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    half = cos.shape[-1]

    def norm_rope(x, nh):
        x = x.reshape(n, t, nh, d)
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
        a, b = x[..., :half], x[..., half:2 * half]
        return torch.cat((a * c + b * s, b * c - a * s, x[..., 2 * half:]), dim=-1)

    v = v if value_embed is None else v + value_embed.double()
    return norm_rope(q, heads) * gain.double()[:, None], norm_rope(k, kv_heads), v.reshape(n, t, kv_heads, d)


def check_qkv_heads(qkv, cos, sin, gain, value_embed, heads, kv_heads):
    """q, k, v and the gradients of qkv, q_gain and value_embed against float64 autograd."""
    dtype = qkv.dtype
    leaves = [a.detach().requires_grad_() for a in (qkv, gain)] + (
        [value_embed.detach().requires_grad_()] if value_embed is not None else [])
    ve = leaves[2] if value_embed is not None else None
    outs = qkv_heads(leaves[0], cos, sin, leaves[1], ve, heads, kv_heads)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    leaves64 = [a.detach().double().requires_grad_() for a in leaves]
    outs64 = qkv_heads_f64(leaves64[0], cos, sin, leaves64[1], leaves64[2] if ve is not None else None, heads, kv_heads)
    torch.autograd.backward(outs64, [g.double() for g in grads])
    tol = TOL[dtype]
    named = [("q", outs[0], outs64[0]), ("k", outs[1], outs64[1]), ("v", outs[2], outs64[2]),
             ("dqkv", leaves[0].grad, leaves64[0].grad), ("dgain", leaves[1].grad, leaves64[1].grad)]
    if ve is not None:
        named.append(("dvalue_embed", leaves[2].grad, leaves64[2].grad))
    for what, got, want in named:
        assert got.shape == want.shape and torch.isfinite(got).all(), what
        assert got.dtype == (torch.float32 if what == "dgain" else dtype), what
        assert rel_err(got, want) <= tol, f"{what}: relative error {rel_err(got, want):.3g}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qkv_heads_sweep(shape, dtype):
    torch.manual_seed(sum(shape))
    n, t, heads, kv_heads, d, half, ve = shape
    args = qkv_inputs(*shape, dtype)
    assert qkv_kernels._use_triton(args[0], heads, kv_heads)
    check_qkv_heads(*args, heads, kv_heads)


@needs_triton
def test_qkv_heads_takes_model_shaped_tables_and_odd_head_counts():
    """cos/sin as the model's rotary gives them, (1, T, 1, rope/2); 6 heads (not a power of two) take the torch
    path with the same results."""
    torch.manual_seed(17)
    qkv, cos, sin, gain, ve = qkv_inputs(2, 9, 6, 2, 32, 4, True, torch.float32)
    assert not qkv_kernels._use_triton(qkv, 6, 2)
    check_qkv_heads(qkv, cos, sin, gain, ve, 6, 2)
    qkv, cos, sin, gain, ve = qkv_inputs(2, 9, 4, 2, 32, 4, True, torch.float32)
    flat = qkv_heads(qkv, cos, sin, gain, ve, 4, 2)
    for a, b in zip(qkv_heads(qkv, cos[None, :, None], sin[None, :, None], gain, ve, 4, 2), flat):
        assert torch.equal(a, b)


def test_qkv_heads_rejects_a_value_embedding_of_another_dtype():
    qkv, cos, sin, gain, ve = qkv_inputs(1, 3, 4, 2, 16, 4, True, torch.bfloat16)
    with pytest.raises(TypeError, match="value_embed in qkv's dtype torch.bfloat16, got torch.float32"):
        qkv_heads(qkv, cos, sin, gain, ve.float(), 4, 2)


def test_qkv_heads_reference_matches_f64():
    torch.manual_seed(18)
    qkv, cos, sin, gain, ve = qkv_inputs(2, 9, 4, 2, 32, 4, True, torch.float32)
    for got, want in zip(qkv_heads_reference(qkv, cos, sin, gain, ve, 4, 2), qkv_heads_f64(qkv, cos, sin, gain, ve, 4, 2)):
        assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("softcap", [30.0, 0.0], ids=["cap30", "nocap"])
def test_module_references_match_f64(softcap):
    """The plain-torch references (the benchmark baselines) against the float64 formulas."""
    torch.manual_seed(7)
    x = torch.randn(33, 96, device=DEVICE, requires_grad=True)
    w = torch.randn(96, device=DEVICE, requires_grad=True)
    assert rel_err(rms_norm_reference(x, w), rms_norm_f64(x.double(), w.double(), 1e-6)) < TOL[torch.float32]
    z = torch.randn(33, 1000, device=DEVICE) * 8
    t = torch.randint(0, 1000, (33,), device=DEVICE)
    for reduction in ("mean", "none"):
        got = softcap_cross_entropy_reference(z, t, softcap, reduction)
        assert rel_err(got, softcap_ce_f64(z.double(), t, softcap, reduction)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_fallback_matches(monkeypatch, dtype):
    """With Triton switched off the ops take their plain-torch path; same checks as the kernels."""
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert not kernels.triton_available(DEVICE)
    torch.manual_seed(8)
    check_rms_norm(torch.randn(33, 1000, device=DEVICE).to(dtype), None)
    check_rms_norm(torch.randn(3, 4, 96, device=DEVICE).to(dtype), torch.rand(96, device=DEVICE).to(dtype) + 0.5)
    for softcap in (30.0, 0.0):
        logits = (torch.randn(33, 5000, device=DEVICE) * 8).to(dtype)
        targets = torch.randint(0, 5000, (33,), device=DEVICE)
        for reduction in ("mean", "none"):
            check_ce(logits, targets, softcap, reduction)
    big = (torch.randn(4, 1024, device=DEVICE).sign() * 1e4).to(dtype)
    check_ce(big, torch.randint(0, 1024, (4,), device=DEVICE), 30.0, "none")
    check_relu2_mlp(*mlp_inputs(33, 64, 100, dtype))
    check_qkv_heads(*qkv_inputs(2, 9, 4, 2, 32, 4, True, dtype), 4, 2)


@needs_triton
def test_triton_matches_fallback(monkeypatch):
    """Kernel and torch path agree closely with each other (same fp32 math, different order)."""
    torch.manual_seed(9)
    x = torch.randn(33, 512, device=DEVICE)
    w = torch.rand(512, device=DEVICE) + 0.5
    z = torch.randn(33, 1024, device=DEVICE) * 8
    t = torch.randint(0, 1024, (33,), device=DEVICE)

    def run():
        xx, ww, zz = (a.clone().requires_grad_() for a in (x, w, z))
        y = rms_norm(xx, ww)
        y.backward(torch.ones_like(y))
        loss = softcap_cross_entropy(zz, t, 30.0, "none")
        loss.backward(torch.ones_like(loss))
        return y, xx.grad, ww.grad, loss, zz.grad

    triton_out = run()
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    for a, b in zip(triton_out, run()):
        assert rel_err(a, b) < 1e-5


def test_import_without_triton():
    """`import kernels` and both ops work when triton cannot be imported at all."""
    code = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch, kernels
assert not kernels.HAS_TRITON and not kernels.triton_available("cpu")
x = torch.randn(5, 64, requires_grad=True)
kernels.rms_norm(x).sum().backward()
assert torch.allclose(kernels.rms_norm(x), kernels.rms_norm_reference(x))
z = torch.randn(5, 1024, requires_grad=True)
t = torch.randint(0, 1024, (5,))
loss = kernels.softcap_cross_entropy(z, t, 30.0)
loss.backward()
assert torch.allclose(loss, kernels.softcap_cross_entropy_reference(z, t, 30.0))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


OPCHECK_CASES = ["rms_fwd", "rms_fwd_w", "rms_bwd", "rms_bwd_w", "ce_fwd", "ce_fwd_nocap", "ce_bwd", "linear_ce",
                 "linear_ce_mean", "mlp", "mlp_bwd", "mlp_leaky", "mlp_bwd_leaky", "qkv", "qkv_ve", "qkv_bwd"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    """torch.library.opcheck: schema, fake vs real (shapes, strides), autograd registration, AOT dispatch."""
    torch.manual_seed(10)
    x = torch.randn(7, 96, device=DEVICE)
    w = torch.rand(96, device=DEVICE) + 0.5
    z = torch.randn(7, 1000, device=DEVICE) * 8
    t = torch.randint(0, 1000, (7,), device=DEVICE)
    _, stats = torch.ops.pgolf.softcap_ce_fwd(z, t, 30.0)
    lm_head = (torch.randn(1000, 96, device=DEVICE) * 0.3).requires_grad_()
    w1, w2 = (torch.randn(160, 96, device=DEVICE) * 0.1).requires_grad_(), (torch.randn(96, 160, device=DEVICE) * 0.1)
    act = torch.relu(x @ w1.detach().t()).square()
    xg, wg, zg = (a.clone().requires_grad_() for a in (x, w, z))
    qkv, cos, sin, gain, ve = qkv_inputs(2, 5, 4, 2, 16, 4, True, torch.float32)
    qkv_grads = (torch.randn(2, 5, 4, 16, device=DEVICE), torch.randn(2, 5, 2, 16, device=DEVICE),
                 torch.randn(2, 5, 2, 16, device=DEVICE))
    qkv, gain, ve = (a.requires_grad_() for a in (qkv, gain, ve))
    op, args = {
        "rms_fwd": (torch.ops.pgolf.rms_norm_fwd, (xg, None, 1e-6)),
        "rms_fwd_w": (torch.ops.pgolf.rms_norm_fwd, (xg, wg, 1e-6)),
        "rms_bwd": (torch.ops.pgolf.rms_norm_bwd, (torch.randn_like(x), x, None, 1e-6)),
        "rms_bwd_w": (torch.ops.pgolf.rms_norm_bwd, (torch.randn_like(x), x, w, 1e-6)),
        "ce_fwd": (torch.ops.pgolf.softcap_ce_fwd, (zg, t, 30.0)),
        "ce_fwd_nocap": (torch.ops.pgolf.softcap_ce_fwd, (zg, t, 0.0)),
        "ce_bwd": (torch.ops.pgolf.softcap_ce_bwd, (torch.rand(7, device=DEVICE), z, t, stats, 30.0)),
        "linear_ce": (torch.ops.pgolf.linear_softcap_ce, (xg, lm_head, t, 30.0, False, 3)),
        "linear_ce_mean": (torch.ops.pgolf.linear_softcap_ce, (xg, lm_head, t, 0.0, True, 7)),
        "mlp": (torch.ops.pgolf.relu2_mlp, (xg, w1, w2.requires_grad_())),
        "mlp_bwd": (torch.ops.pgolf.relu2_mlp_bwd, (torch.randn_like(x), x, w1.detach(), w2.detach(), act)),
        "mlp_leaky": (torch.ops.pgolf.relu2_mlp, (xg, w1, w2.requires_grad_(), 0.5)),
        "mlp_bwd_leaky": (torch.ops.pgolf.relu2_mlp_bwd, (torch.randn_like(x), x, w1.detach(), w2.detach(),
                                                          F.leaky_relu(x @ w1.detach().t(), 0.5).square(),
                                                          x @ w1.detach().t(), 0.5)),
        "qkv": (torch.ops.pgolf.qkv_heads, (qkv, cos, sin, gain, None, 4, 2, 1e-6)),
        "qkv_ve": (torch.ops.pgolf.qkv_heads, (qkv, cos, sin, gain, ve, 4, 2, 1e-6)),
        "qkv_bwd": (torch.ops.pgolf.qkv_heads_bwd, (*qkv_grads, qkv.detach(), cos, sin, gain.detach(), 4, 2, 1e-6)),
    }[case]
    torch.library.opcheck(op.default, args)


# On CPU the aot_eager backend: it traces with fake tensors through AOTAutograd, then runs the real ops (the
# interpreted kernels); inductor's C++ codegen would only add a minute of compile.
COMPILE_BACKEND = "inductor" if HAS_CUDA else "aot_eager"


def compiled_calls_match_eager(f, inputs, targets, **compile_kwargs) -> list[str]:
    """Runs f(*inputs, targets) eagerly and under torch.compile(fullgraph=True), forward and backward; asserts
    the same loss and gradients and returns the functions the (last) compiled graph calls."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(COMPILE_BACKEND)(gm, example_inputs)

    torch._dynamo.reset()
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=backend, **compile_kwargs)):
        args = [a.clone().requires_grad_() for a in inputs]
        loss = fn(*args, targets)
        loss.backward()
        results.append([loss] + [a.grad for a in args])
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-5
    return [str(node.target) for node in graphs[-1].graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    """Both ops inside torch.compile(fullgraph=True): one graph holding the custom ops, fakes and
    backward traced (also with symbolic shapes), same numbers as eager."""
    torch.manual_seed(11)
    x = torch.randn(2, 9, 64, device=DEVICE)
    emb = torch.randn(1024, 64, device=DEVICE) * 0.5
    scale = torch.rand(64, device=DEVICE) + 0.5
    targets = torch.randint(0, 1024, (2, 9), device=DEVICE)

    def f(x, emb, scale, targets):
        h = rms_norm(x, scale)
        logits = rms_norm(h) @ emb.t()
        return softcap_cross_entropy(logits, targets, 30.0)

    # fullgraph=True already forbids graph breaks. With dynamic=True dynamo first traces the float eps
    # default as a symbolic float, then restarts with it specialised: the last graph is the one used.
    called = compiled_calls_match_eager(f, (x, emb, scale), targets, dynamic=dynamic)
    assert sum("pgolf.rms_norm_fwd" in name for name in called) == 2
    assert sum("pgolf.softcap_ce_fwd" in name for name in called) == 1


def test_compile_fullgraph_linear_ce():
    """The chunked lm_head + CE inside torch.compile(fullgraph=True): the training call is one custom op in
    the graph, the no-grad (evaluation) call traces its chunks; both give eager's numbers."""
    torch.manual_seed(13)
    h = torch.randn(2, 9, 64, device=DEVICE)
    emb = torch.randn(1024, 64, device=DEVICE) * 0.5
    targets = torch.randint(0, 1024, (2, 9), device=DEVICE)

    def f(h, emb, targets):
        return linear_softcap_cross_entropy(rms_norm(h), emb, targets, 30.0, chunk_rows=7)

    def g(h, emb, targets):
        return linear_softcap_cross_entropy(h, emb, targets, 30.0, "none", chunk_rows=7)

    called = compiled_calls_match_eager(f, (h, emb), targets)
    assert sum("pgolf.linear_softcap_ce" in name for name in called) == 1
    with torch.no_grad():
        compiled = torch.compile(g, fullgraph=True, backend=COMPILE_BACKEND)
        assert rel_err(compiled(h, emb, targets), g(h, emb, targets)) < 1e-6


def test_compile_fullgraph_relu2_mlp():
    """The fused MLP inside torch.compile(fullgraph=True): one custom op in the graph, eager's numbers."""
    torch.manual_seed(15)
    x, w1, w2 = mlp_inputs(9, 64, 192, torch.float32, lead=(2,))

    def f(x, w1, w2, targets):
        return (relu2_mlp(rms_norm(x), w1, w2) * targets).sum()

    called = compiled_calls_match_eager(f, (x, w1, w2), torch.randn(2, 9, 64, device=DEVICE))
    assert sum("pgolf.relu2_mlp" in name for name in called) == 1


def test_compile_fullgraph_qkv_heads():
    """The attention-input op inside torch.compile(fullgraph=True): one custom op in the graph, eager's numbers."""
    torch.manual_seed(19)
    qkv, cos, sin, gain, ve = qkv_inputs(2, 9, 4, 2, 16, 4, True, torch.float32)

    def f(qkv, gain, ve, targets):
        q, k, v = qkv_heads(qkv, cos, sin, gain, ve, 4, 2)
        return (q * targets).sum() + (k * v).sum()

    called = compiled_calls_match_eager(f, (qkv, gain, ve), torch.randn(2, 9, 4, 16, device=DEVICE))
    assert sum("pgolf.qkv_heads" in name for name in called) == 1
