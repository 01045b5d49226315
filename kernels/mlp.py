"""The model's MLP, relu(x @ W1.T)^2 @ W2.T, with relu^2 and its derivative fused into two matmul epilogues.
With a slope s > 0 the activation is leaky_relu(h, s)^2 (SPEC section 5: s = 0.5 with MLP 4x); its sign is not in a,
so the forward also stores h and the backward's epilogue reads h instead: g_h = 2 h (h > 0), 2 s^2 h (h <= 0).

Forward:   a   = relu(x @ W1.T)^2            Triton GEMM: relu^2 of the fp32 accumulator, stored once as a
           out = a @ W2.T                     cuBLAS
Backward:  g_h = 2 sqrt(a) * (g @ W2)         Triton GEMM: the relu^2 derivative applied in the epilogue
           dW2 = g.T @ a,  dx = g_h @ W1,  dW1 = g_h.T @ x          cuBLAS

Unfused, the pre-activation h = x @ W1.T and the gradient g @ W2 each make a round trip through memory for an
elementwise kernel: relu^2 reads h and writes a, its backward reads h and g @ W2 and writes g_h. These are
(tokens, hidden)-sized tensors, the largest activations of the model; here only a and g_h are ever stored.
relu(h) is recovered in the backward as sqrt(a) from the saved a, so h is not kept at all; with a in bf16 that
is relu(h) to within bf16 rounding, the same precision as the bf16 h the unfused backward reads.

The GEMM is persistent (one program per SM walks over output tiles, so the loads of the next tile overlap the
epilogue of the last) and moves tiles with TMA descriptors; it needs sm90+ and rows aligned to 16 bytes, and shapes
it cannot take run the same math in torch. On an H100 at the model's 98304 x 512 -> 1536 shape (docs/PERF.md) the
forward runs at ~580 TFLOP/s (cuBLAS without the epilogue: ~650) and the backward, which also reads a, at ~400.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def relu2_mlp_reference(x: Tensor, w1: Tensor, w2: Tensor, slope: float = 0.0) -> Tensor:
    """Plain torch: leaky_relu(x @ w1.T, slope)^2 @ w2.T, differentiable by autograd (the model's unfused path)."""
    return F.linear(F.leaky_relu(F.linear(x, w1), slope).square(), w2)


if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def _relu2_epilogue(acc, c_desc, aux_desc, om, on, BACKWARD: tl.constexpr, SLOPE: tl.constexpr):
        if BACKWARD:
            aux = aux_desc.load([om, on]).to(tl.float32)
            if SLOPE == 0.0:  # aux is relu(h)^2
                out = 2.0 * tl.sqrt(aux) * acc
            else:  # aux is h
                out = 2.0 * tl.where(aux > 0, aux, SLOPE * SLOPE * aux) * acc
        else:
            if SLOPE == 0.0:
                out = tl.maximum(acc, 0.0)
            else:
                out = tl.where(acc > 0, acc, SLOPE * acc)
                aux_desc.store([om, on], acc.to(aux_desc.dtype))
            out = out * out
        c_desc.store([om, on], out.to(c_desc.dtype))

    @triton.jit
    def _matmul_relu2_kernel(
        a_desc, b_desc, c_desc, aux_desc, M, N, K, programs,
        B_KMAJOR: tl.constexpr, BACKWARD: tl.constexpr, SLOPE: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        FLATTEN: tl.constexpr = True,
    ):
        """C = relu(A @ B)^2 (forward) or C = 2 sqrt(AUX) * (A @ B) (backward; AUX is the forward's C); with SLOPE,
        C = leaky_relu(A @ B)^2 and AUX = A @ B (forward), C = 2 leaky'(AUX) leaky(AUX) * (A @ B) (backward). B is
        stored (N, K) when B_KMAJOR (a weight used as W.T), else (K, N). Persistent: this program computes
        output tiles program_id, program_id + programs, ..."""
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * grid_n
        for tile in tl.range(tl.program_id(0), grid_m * grid_n, programs, flatten=FLATTEN):
            # Grouped order: GROUP_M row blocks take turns on each column block of B while it sits in L2.
            first_m = (tile // per_group) * GROUP_M
            group_rows = tl.minimum(grid_m - first_m, GROUP_M)
            om = (first_m + (tile % per_group) % group_rows) * BLOCK_M
            on = ((tile % per_group) // group_rows) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):  # out-of-range rows and columns of a tile load as zeros
                a = a_desc.load([om, k])
                b = b_desc.load([on, k]).T if B_KMAJOR else b_desc.load([k, on])
                if FP32_DOT:  # fp32 inputs (and the interpreter, whose bf16 dot is broken): exact products, not TF32
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            # the epilogue in two column halves: half the registers and store buffer at a time
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _relu2_epilogue(acc0, c_desc, aux_desc, om, on, BACKWARD, SLOPE)
            _relu2_epilogue(acc1, c_desc, aux_desc, om, on + BLOCK_N // 2, BACKWARD, SLOPE)


# Tiles, measured on an H100 (docs/PERF.md); fp32 (tests) needs smaller ones to fit shared memory, and the
# interpreter (CI) runs every program in numpy, so small tiles keep it quick. FLATTEN: one software pipeline over
# all of a program's tiles, so the next tile's loads overlap this one's epilogue; PROGRAMS_PER_SM > 1 only pays
# where that many programs fit an SM's registers and shared memory at once.
_TILES = {
    "gpu": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "gpu_bwd": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "gpu_fp32": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    "interpreter": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
}


@functools.lru_cache
def _has_tma(device: torch.device) -> bool:
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ready(t: Tensor) -> bool:
    """TMA moves 2-D tiles of row-contiguous tensors whose base and row stride are multiples of 16 bytes."""
    return t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _use_triton(x: Tensor, w1: Tensor, w2: Tensor) -> bool:
    """Whether the fused GEMMs take x (M, d), w1 (hidden, d), w2 (d, hidden); their outputs (M, hidden) are new
    tensors whose rows are aligned where w2's are."""
    return (triton_available(x.device) and x.numel() > 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and _has_tma(x.device) and all(_tma_ready(t) for t in (x, w1, w2)))


def _launch(a: Tensor, b: Tensor, aux: Tensor | None, b_kmajor: bool, backward: bool, slope: float,
            tiles: dict | None = None) -> Tensor:
    """The epilogue GEMM on a @ B, B = b.T if b_kmajor else b; out in a's dtype. aux: the forward's a (relu^2) or
    h (leaky), read by the backward, written by the leaky forward. tiles: a _TILES-style entry in place of this
    device's (bench/bench_gemm.py times alternatives)."""
    m, k = a.shape
    n = b.shape[0] if b_kmajor else b.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    kind = "interpreter" if not a.is_cuda else "gpu_fp32" if a.dtype == torch.float32 else "gpu_bwd" if backward else "gpu"
    tiles = dict(tiles or _TILES[kind])
    per_sm = tiles.pop("PROGRAMS_PER_SM", 1)
    bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    descriptor = TensorDescriptor.from_tensor
    tile_count = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 8
    programs = min(tile_count, per_sm * sms)
    _matmul_relu2_kernel[(programs,)](
        descriptor(a, [bm, bk]), descriptor(b, [bn, bk] if b_kmajor else [bk, bn]), descriptor(out, [bm, bn // 2]),
        descriptor(aux if aux is not None else out, [bm, bn // 2]), m, n, k, programs, B_KMAJOR=b_kmajor,
        BACKWARD=backward, SLOPE=slope, FP32_DOT=a.dtype == torch.float32 or not a.is_cuda, **tiles,
    )
    return out


def _relu2_of_matmul(x: Tensor, w1: Tensor, slope: float, fused: bool) -> tuple[Tensor, Tensor]:
    """(a, h): the activation and, for slope > 0, the pre-activation (else an empty tensor)."""
    h = x.new_empty((x.shape[0], w1.shape[0]) if slope else (0,))
    if fused:
        return _launch(x, w1, h if slope else None, b_kmajor=True, backward=False, slope=slope), h
    pre = x @ w1.t()
    if slope:
        h.copy_(pre)
    return F.leaky_relu(pre, slope).float().square().to(x.dtype), h


def _relu2_grad_of_matmul(g: Tensor, w2: Tensor, a: Tensor, h: Tensor | None, slope: float, fused: bool) -> Tensor:
    aux = h if slope else a
    if fused:
        return _launch(g, w2, aux, b_kmajor=False, backward=True, slope=slope)
    grad = 2 * a.float().sqrt() if not slope else 2 * torch.where(aux > 0, aux, slope * slope * aux).float()
    return (grad * (g @ w2).float()).to(g.dtype)


@torch.library.custom_op("pgolf::relu2_mlp", mutates_args=())
def _relu2_mlp(x: Tensor, w1: Tensor, w2: Tensor, slope: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(leaky_relu(x @ w1.T, slope)^2 @ w2.T, and what the backward needs: the activation a and, for slope > 0,
    the pre-activation h (else an empty tensor)); x (M, d)."""
    a, h = _relu2_of_matmul(x, w1, slope, _use_triton(x, w1, w2))
    return a @ w2.t(), a, h


@_relu2_mlp.register_fake
def _(x, w1, w2, slope=0.0):
    hidden = (x.shape[0], w1.shape[0])
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden if slope else (0,))


@torch.library.custom_op("pgolf::relu2_mlp_bwd", mutates_args=())
def _relu2_mlp_bwd(g: Tensor, x: Tensor, w1: Tensor, w2: Tensor, a: Tensor, h: Tensor | None = None,
                   slope: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw1, dw2) for the incoming gradient g (M, d_out) of relu2_mlp's first output."""
    g_h = _relu2_grad_of_matmul(g, w2, a, h, slope, _use_triton(g, w1, w2))
    return g_h @ w1, g_h.t() @ x, g.t() @ a


@_relu2_mlp_bwd.register_fake
def _(g, x, w1, w2, a, h=None, slope=0.0):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    x, w1, w2, *rest = inputs
    _, a, h = output
    ctx.slope = rest[0] if rest else 0.0
    ctx.mark_non_differentiable(a, h)
    ctx.save_for_backward(x, w1, w2, a, h)


def _backward(ctx, g, _da, _dh):
    x, w1, w2, a, h = ctx.saved_tensors
    return *torch.ops.pgolf.relu2_mlp_bwd(g.contiguous(), x, w1, w2, a, h, ctx.slope), None


_relu2_mlp.register_autograd(_backward, setup_context=_setup_context)


def relu2_mlp(x: Tensor, w1: Tensor, w2: Tensor, slope: float = 0.0) -> Tensor:
    """leaky_relu(x @ w1.T, slope)^2 @ w2.T (slope 0: relu^2) for x (..., d), w1 (hidden, d), w2 (d_out, hidden),
    all of one dtype; output (..., d_out). Gradients flow to x, w1 and w2."""
    if not (x.dtype == w1.dtype == w2.dtype):
        raise TypeError(f"relu2_mlp needs one dtype, got x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype}")
    out, _, _ = torch.ops.pgolf.relu2_mlp(x.reshape(-1, x.shape[-1]).contiguous(), w1.contiguous(), w2.contiguous(),
                                          float(slope))
    return out.view(*x.shape[:-1], w2.shape[0])
