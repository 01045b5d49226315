"""RMSNorm over the last dimension: fused Triton forward and backward.

Forward, for each row x of width N (math in fp32 whatever the storage dtype):
    rstd = 1 / sqrt(mean(x^2) + eps)
    y    = x * rstd * w                            (w = 1 when there is no weight)

Backward, with g = dy * w:
    dx = rstd * (g - x * rstd^2 * mean(g * x))
    dw = sum over rows of dy * x * rstd

rstd is recomputed in the backward instead of being saved: the backward reads the whole row of x
anyway, so the recompute costs no memory traffic and spares an extra output and saved tensor.

Each program normalises a tile of BLOCK_M rows × BLOCK_N (next power of two ≥ N) columns, so narrow
rows (per-head q/k norm, N = 64) still give every program a few KiB to move. With a weight, the
backward runs a persistent grid: each program keeps a running fp32 dw tile over the row blocks it
visits and writes one partial row, and torch sums those few partials.
"""

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from . import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Elements of x per program tile (BLOCK_M * BLOCK_N); warps scale with it (~32 elements a thread).
TILE_ELEMS = 4096
# Wider rows than this take the torch path: one row would no longer fit a program's registers.
MAX_TRITON_WIDTH = 32768


def rms_norm_reference(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """Plain-torch RMSNorm (fp32 math, output in x's dtype); differentiable by autograd."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _rms_norm_bwd_reference(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float):
    """The backward formulas of the module docstring in plain torch (the op's non-Triton path)."""
    xf, dyf = x.float(), dy.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    g = dyf if weight is None else dyf * weight.float()
    dx = rstd * (g - xf * rstd.square() * (g * xf).mean(-1, keepdim=True))
    if weight is None:
        dw = x.new_empty(0)
    else:
        dw = (dyf * xf * rstd).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y, M, N, stride_x, stride_y, eps,
        HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows = rows.to(tl.int64)  # row * stride can pass 2^31 on large activations
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
            y = y * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_block(DY, X, DX, w, block, M, N, stride_dy, stride_x, stride_dx, eps,
                            HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dx for one block of rows; returns its dw contribution (dy * x * rstd) when there is a weight."""
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        g = dy * w[None, :] if HAS_WEIGHT else dy
        dot = tl.sum(g * x, axis=1) / N
        dx = (g - x * (rstd * rstd * dot)[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        return dy * x * rstd[:, None]

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, DX, DW_PARTIAL, M, N, stride_dy, stride_x, stride_dx, eps,
        HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        if HAS_WEIGHT:
            # persistent grid: each program walks several row blocks, keeping a running dw tile
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
                dw_acc += _rms_norm_bwd_block(DY, X, DX, w, block, M, N, stride_dy, stride_x, stride_dx, eps,
                                              HAS_WEIGHT, BLOCK_M, BLOCK_N)
            tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        else:
            # one row block per program and no loop: a loop here ran the backward ~4x under bandwidth on an H100
            _rms_norm_bwd_block(DY, X, DX, cols, pid, M, N, stride_dy, stride_x, stride_dx, eps,  # w unused
                                HAS_WEIGHT, BLOCK_M, BLOCK_N)


def _launch_config(n_cols: int):
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, TILE_ELEMS // block_n)
    num_warps = min(16, max(4, block_m * block_n // 1024))
    return block_m, block_n, num_warps


@lru_cache(maxsize=None)
def _persistent_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs, enough to exercise the partial-dw reduction
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows_view(t: Tensor, n_cols: int) -> Tensor:
    """(M, N) view of t with unit column stride (copies only if no such view exists)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _use_triton(x: Tensor) -> bool:
    # empty inputs take the torch path too: it handles them and a zero-size grid would not launch
    return triton_available(x.device) and x.numel() > 0 and x.shape[-1] <= MAX_TRITON_WIDTH


@torch.library.custom_op("pgolf::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    if not _use_triton(x):
        # contiguous, as the fake promises: compiled graphs rely on the fake's strides
        return rms_norm_reference(x, weight, eps).contiguous()
    n = x.shape[-1]
    x2 = _rows_view(x, n)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps = _launch_config(n)
    w = weight.contiguous() if weight is not None else None
    _rms_norm_fwd_kernel[(triton.cdiv(x2.shape[0], block_m),)](
        x2, w, y, x2.shape[0], n, x2.stride(0), y.stride(0), eps,
        HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y.view(x.shape)


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


# Returns (dx, dw); dw is an empty tensor when there is no weight (custom ops cannot return None).
@torch.library.custom_op("pgolf::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    if not _use_triton(x):
        dx, dw = _rms_norm_bwd_reference(dy, x, weight, eps)
        return dx.contiguous(), dw
    n = x.shape[-1]
    x2, dy2 = _rows_view(x, n), _rows_view(dy, n)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    m = x2.shape[0]
    block_m, block_n, num_warps = _launch_config(n)
    n_blocks = triton.cdiv(m, block_m)
    if weight is None:
        grid, w, dw_partial = n_blocks, None, None
    else:
        grid = min(n_blocks, _persistent_programs(x.device))
        w = weight.contiguous()
        dw_partial = torch.empty((grid, n), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(grid,)](
        dy2, x2, w, dx, dw_partial, m, n, dy2.stride(0), x2.stride(0), dx.stride(0), eps,
        HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dw = x.new_empty(0) if weight is None else dw_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), (weight.new_empty(weight.shape) if weight is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.pgolf.rms_norm_bwd(dy, x, weight, ctx.eps)
    return dx, (dw if weight is not None else None), None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm of x over its last dimension, optionally times weight (shape (N,)); output in x's dtype."""
    return torch.ops.pgolf.rms_norm_fwd(x, weight, eps)
