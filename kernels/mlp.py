"""The model's MLP, relu(x @ W1.T)^2 @ W2.T, with relu^2 and its derivative fused into two matmul epilogues.

Forward:   a   = relu(x @ W1.T)^2            Triton GEMM: relu^2 of the fp32 accumulator, stored once as a
           out = a @ W2.T                     cuBLAS
Backward:  g_h = 2 sqrt(a) * (g @ W2)         Triton GEMM: the relu^2 derivative applied in the epilogue
           dW2 = g.T @ a,  dx = g_h @ W1,  dW1 = g_h.T @ x          cuBLAS

Unfused, the pre-activation h = x @ W1.T and the gradient g @ W2 each make a round trip through memory for an
elementwise kernel: relu^2 reads h and writes a, its backward reads h and g @ W2 and writes g_h. These are
(tokens, hidden)-sized tensors, the largest activations of the model; here only a and g_h are ever stored.
relu(h) is recovered in the backward as sqrt(a) from the saved a, so h is not kept at all; with a in bf16 that
is relu(h) to within bf16 rounding, the same precision as the bf16 h the unfused backward reads.

Measured on an H100 (docs/PERF.md): this plain-pointer GEMM reaches ~356 TFLOP/s on the model's 98304 x 512 -> 1536
shape, where cuBLAS does ~620, yet the step is 14 ms faster (637 -> 623 ms) and 2.8 GiB smaller than with the
unfused MLP. A faster GEMM here (TMA loads, persistent tiles) is worth up to ~25 ms/step more.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _INTERPRET_AT_IMPORT, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def relu2_mlp_reference(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """Plain torch: relu(x @ w1.T)^2 @ w2.T, differentiable by autograd (the model's unfused path)."""
    return F.linear(torch.relu(F.linear(x, w1)).square(), w2)


if triton is not None:

    @triton.jit
    def _matmul_relu2_kernel(
        A, B, C, AUX, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        BACKWARD: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """C = relu(A @ B)^2 (forward) or C = 2 sqrt(AUX) * (A @ B) (backward; AUX is the forward's C)."""
        # Grouped order: GROUP_M row blocks in a row take turns on each column block of B while it sits in L2.
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * grid_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
        b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k < K), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] + k < K) & (rn[None, :] < N), other=0.0)
            if FP32_DOT:  # fp32 inputs (and the interpreter, whose bf16 dot is broken): exact products, not TF32
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        mask = (rm[:, None] < M) & (rn[None, :] < N)
        c_offsets = rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
        if BACKWARD:
            relu_h = tl.sqrt(tl.load(AUX + c_offsets, mask=mask, other=0.0).to(tl.float32))
            out = 2.0 * relu_h * acc
        else:
            relu_h = tl.maximum(acc, 0.0)
            out = relu_h * relu_h
        tl.store(C + c_offsets, out.to(C.dtype.element_ty), mask=mask)

    if _INTERPRET_AT_IMPORT:  # one small tile: the interpreter runs every program in numpy
        _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    else:  # Hopper-sized tiles; autotuned once per (M, N, K, dtype)
        _CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 4, 4), (128, 128, 8, 4),
                                 (64, 256, 4, 4), (256, 128, 8, 3)]
        ]
    _matmul_relu2 = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "FP32_DOT"])(_matmul_relu2_kernel)


def _use_triton(x: Tensor) -> bool:
    return triton_available(x.device) and x.numel() > 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _launch(a: Tensor, b: Tensor, aux: Tensor | None) -> Tensor:
    """relu(a @ b)^2, or 2 sqrt(aux) * (a @ b) with aux; a (M, K), b (K, N) of any strides; out (M, N) in a's dtype."""
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _matmul_relu2[grid](
        a, b, out, aux if aux is not None else out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), BACKWARD=aux is not None, FP32_DOT=a.dtype == torch.float32 or not a.is_cuda,
    )
    return out


def _relu2_of_matmul(x: Tensor, w1: Tensor) -> Tensor:
    if _use_triton(x):
        return _launch(x, w1.t(), None)
    return torch.relu(x @ w1.t()).float().square().to(x.dtype)


def _relu2_grad_of_matmul(g: Tensor, w2: Tensor, a: Tensor) -> Tensor:
    if _use_triton(g):
        return _launch(g, w2, a)
    return (2 * a.float().sqrt() * (g @ w2).float()).to(g.dtype)


@torch.library.custom_op("pgolf::relu2_mlp", mutates_args=())
def _relu2_mlp(x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """(relu(x @ w1.T)^2 @ w2.T, and the activation a = relu(x @ w1.T)^2 that the backward needs); x (M, d)."""
    a = _relu2_of_matmul(x, w1)
    return a @ w2.t(), a


@_relu2_mlp.register_fake
def _(x, w1, w2):
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


@torch.library.custom_op("pgolf::relu2_mlp_bwd", mutates_args=())
def _relu2_mlp_bwd(g: Tensor, x: Tensor, w1: Tensor, w2: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw1, dw2) for the incoming gradient g (M, d_out) of relu2_mlp's first output."""
    g_h = _relu2_grad_of_matmul(g, w2, a)
    return g_h @ w1, g_h.t() @ x, g.t() @ a


@_relu2_mlp_bwd.register_fake
def _(g, x, w1, w2, a):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    x, w1, w2 = inputs
    _, a = output
    ctx.mark_non_differentiable(a)
    ctx.save_for_backward(x, w1, w2, a)


def _backward(ctx, g, _da):
    x, w1, w2, a = ctx.saved_tensors
    return torch.ops.pgolf.relu2_mlp_bwd(g.contiguous(), x, w1, w2, a)


_relu2_mlp.register_autograd(_backward, setup_context=_setup_context)


def relu2_mlp(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """relu(x @ w1.T)^2 @ w2.T for x (..., d), w1 (hidden, d), w2 (d_out, hidden), all of one dtype; output
    (..., d_out). Gradients flow to x, w1 and w2."""
    if not (x.dtype == w1.dtype == w2.dtype):
        raise TypeError(f"relu2_mlp needs one dtype, got x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype}")
    out, _ = torch.ops.pgolf.relu2_mlp(x.reshape(-1, x.shape[-1]).contiguous(), w1, w2)
    return out.view(*x.shape[:-1], w2.shape[0])
