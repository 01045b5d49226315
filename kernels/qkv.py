"""Attention inputs from the qkv matmul's output: per-head RMSNorm of q and k, partial rotary, q gain, and v
(+ value embedding), in one Triton pass forward and one backward.

For each token of qkv = [q | k | v] (heads, kv_heads, kv_heads blocks of D columns), per head (fp32 math):
    x^   = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)
    y    = R x^       R rotates the pairs (i, i + h), i < h = rope/2, by the token's angle; the rest pass through
    q'   = gain[head] * y(q),   k' = y(k),   v' = v + value_embed
Backward, with g the gradient of q' (gain 1 for k):
    dgain[head] = sum over tokens of g . y
    dx^  = R^T (gain * g)
    dx   = rstd * (dx^ - x^ * mean(dx^ * x^))
and dv' is copied to the v columns, so the whole gradient of qkv is written by one kernel. Unfused, inductor
splits each of q and k into a norm + rotary pass and a norm-backward pass with a bf16 intermediate, and writes
the gradient of qkv by concatenation: ~52 ms of an H100 step at ~1.6-2 TB/s, against 31.5 ms for these two
kernels (~2.7 TB/s; docs/PERF.md).

x^ and rstd are recomputed in the backward from the saved qkv (the kernel reads the row anyway).
"""

from typing import Optional

import torch
from torch import Tensor

from . import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_TOKENS = 16  # tokens per program: 16 x 1024 columns of the model's qkv = 32 KiB of bf16 in each direction


def _head_dim(qkv: Tensor, heads: int, kv_heads: int) -> int:
    return qkv.shape[-1] // (heads + 2 * kv_heads)


def _head_shapes(qkv: Tensor, heads: int, kv_heads: int) -> list[tuple[int, ...]]:
    """The shapes of q, k and v: qkv's leading dims, then (heads, D), (kv_heads, D), (kv_heads, D)."""
    d = _head_dim(qkv, heads, kv_heads)
    return [(*qkv.shape[:-1], h, d) for h in (heads, kv_heads, kv_heads)]


def _split_heads(qkv: Tensor, heads: int, kv_heads: int):
    d = _head_dim(qkv, heads, kv_heads)
    parts = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return tuple(part.reshape(shape) for part, shape in zip(parts, _head_shapes(qkv, heads, kv_heads)))


def _norm_rope_reference(x: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    """x (N, T, heads, D) -> R x^ in fp32; cos, sin (T, rope/2)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    half = cos.shape[-1]
    c, s = cos[None, :, None, :].float(), sin[None, :, None, :].float()
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    return torch.cat((x1 * c + x2 * s, x2 * c - x1 * s, rest), dim=-1)


def qkv_heads_reference(qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, value_embed: Optional[Tensor],
                        heads: int, kv_heads: int, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Plain torch (fp32 math, outputs in qkv's dtype), differentiable by autograd. qkv (N, T, (heads + 2
    kv_heads) D); cos, sin (T, rope/2); q_gain (heads,); value_embed (N, T, kv_heads D) or None. Returns q
    (N, T, heads, D), k and v (N, T, kv_heads, D)."""
    q, k, v = _split_heads(qkv, heads, kv_heads)
    if value_embed is not None:
        v = v + value_embed.reshape(v.shape)
    q = _norm_rope_reference(q, cos, sin, eps) * q_gain.float()[:, None]
    k = _norm_rope_reference(k, cos, sin, eps)
    return q.to(qkv.dtype), k.to(qkv.dtype), v.to(qkv.dtype)


def _qkv_heads_bwd_reference(dq, dk, dv, qkv, cos, sin, q_gain, heads, kv_heads, eps):
    """The backward formulas of the module docstring in plain torch (the op's non-Triton path)."""
    q, k, _ = _split_heads(qkv, heads, kv_heads)
    half = cos.shape[-1]
    c, s = cos[None, :, None, :].float(), sin[None, :, None, :].float()

    def norm_rope_bwd(x, g):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        xhat = xf * rstd
        g1, g2, rest = g[..., :half], g[..., half:2 * half], g[..., 2 * half:]
        dxhat = torch.cat((g1 * c - g2 * s, g2 * c + g1 * s, rest), dim=-1)
        return rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))

    gain = q_gain.float()[:, None]
    y = _norm_rope_reference(q, cos, sin, eps)
    dgain = (dq.float() * y).sum(dim=(0, 1, 3)).to(q_gain.dtype)
    dqkv = torch.cat([norm_rope_bwd(q, dq.float() * gain).flatten(2), norm_rope_bwd(k, dk.float()).flatten(2),
                      dv.float().flatten(2)], dim=-1)
    return dqkv.to(qkv.dtype), dgain


if triton is not None:

    @triton.jit
    def _rope_coefficients(COS, SIN, pos, d, HALF: tl.constexpr):
        """Per (token, column): c and a signed s such that y_d = c x_d + s x_partner(d) (c = 1, s = 0 past rope)."""
        in_rope = d[None, :] < 2 * HALF
        if HALF > 0:
            j = d % HALF
        else:
            j = d * 0
        offs = pos[:, None] * HALF + j[None, :]
        c = tl.load(COS + offs, mask=in_rope, other=1.0)
        s = tl.load(SIN + offs, mask=in_rope, other=0.0)
        s = tl.where(d[None, :] < HALF, s, -s)
        return c[:, None, :], s[:, None, :]

    @triton.jit
    def _partner(d, HALF: tl.constexpr):
        return tl.where(d < HALF, d + HALF, tl.where(d < 2 * HALF, d - HALF, d))

    @triton.jit
    def _norm_rope_fwd(QKV, OUT, GAIN, tok, live, c, s, qkv_stride, col0, eps,
                       NH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr):
        h = tl.arange(0, NH)
        d = tl.arange(0, D)
        row = tok[:, None, None] * qkv_stride + col0 + h[None, :, None] * D
        mask = live[:, None, None]
        x = tl.load(QKV + row + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(QKV + row + _partner(d, HALF)[None, None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=2) / D + eps)
        y = (x * c + xp * s) * rstd[:, :, None]
        if HAS_GAIN:
            y = y * tl.load(GAIN + h)[None, :, None]
        out = tok[:, None, None] * (NH * D) + h[None, :, None] * D + d[None, None, :]
        tl.store(OUT + out, y.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_heads_fwd_kernel(QKV, VE, COS, SIN, GAIN, Q, K, V, n_tok, seq_len, qkv_stride, eps,
                              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                              HAS_VE: tl.constexpr, BLOCK_T: tl.constexpr):
        tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        live = tok < n_tok
        c, s = _rope_coefficients(COS, SIN, tok % seq_len, tl.arange(0, D), HALF)
        _norm_rope_fwd(QKV, Q, GAIN, tok, live, c, s, qkv_stride, 0, eps, H, D, HALF, True)
        _norm_rope_fwd(QKV, K, GAIN, tok, live, c, s, qkv_stride, H * D, eps, HKV, D, HALF, False)
        cols = tl.arange(0, HKV * D)
        mask = live[:, None]
        v = tl.load(QKV + tok[:, None] * qkv_stride + (H + HKV) * D + cols[None, :], mask=mask, other=0.0)
        if HAS_VE:
            v = (v.to(tl.float32) + tl.load(VE + tok[:, None] * (HKV * D) + cols[None, :], mask=mask,
                                            other=0.0).to(tl.float32))
        tl.store(V + tok[:, None] * (HKV * D) + cols[None, :], v.to(V.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_bwd(QKV, G, DQKV, GAIN, tok, live, c, s, qkv_stride, col0, eps,
                       NH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr):
        """Writes dx into DQKV's columns of this block; returns sum over the tile of g . y per head (gain grad)."""
        h = tl.arange(0, NH)
        d = tl.arange(0, D)
        pd = _partner(d, HALF)
        row = tok[:, None, None] * qkv_stride + col0 + h[None, :, None] * D
        mask = live[:, None, None]
        x = tl.load(QKV + row + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(QKV + row + pd[None, None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=2) / D + eps)[:, :, None]
        grow = tok[:, None, None] * (NH * D) + h[None, :, None] * D
        g = tl.load(G + grow + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
        gp = tl.load(G + grow + pd[None, None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GAIN:
            gain = tl.load(GAIN + h)[None, :, None]
            dgain = tl.sum(tl.sum(g * (x * c + xp * s) * rstd, axis=2), axis=0)
            g, gp = g * gain, gp * gain
        else:
            dgain = tl.zeros((NH,), dtype=tl.float32)
        dxhat = g * c - gp * s  # R^T g: the partner's signed sine is minus this column's
        xhat = x * rstd
        dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=2) / D)[:, :, None])
        tl.store(DQKV + row + d[None, None, :], dx.to(DQKV.dtype.element_ty), mask=mask)
        return dgain

    @triton.jit
    def _qkv_heads_bwd_kernel(QKV, COS, SIN, GAIN, DQ, DK, DV, DQKV, DGAIN, n_tok, seq_len, qkv_stride, eps,
                              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                              BLOCK_T: tl.constexpr):
        tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        live = tok < n_tok
        c, s = _rope_coefficients(COS, SIN, tok % seq_len, tl.arange(0, D), HALF)
        dgain = _norm_rope_bwd(QKV, DQ, DQKV, GAIN, tok, live, c, s, qkv_stride, 0, eps, H, D, HALF, True)
        tl.store(DGAIN + tl.program_id(0) * H + tl.arange(0, H), dgain)  # one partial row per program
        _norm_rope_bwd(QKV, DK, DQKV, GAIN, tok, live, c, s, qkv_stride, H * D, eps, HKV, D, HALF, False)
        cols = tl.arange(0, HKV * D)
        mask = live[:, None]
        dv = tl.load(DV + tok[:, None] * (HKV * D) + cols[None, :], mask=mask, other=0.0)
        tl.store(DQKV + tok[:, None] * qkv_stride + (H + HKV) * D + cols[None, :], dv, mask=mask)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _use_triton(qkv: Tensor, heads: int, kv_heads: int) -> bool:
    d = _head_dim(qkv, heads, kv_heads)
    return (triton_available(qkv.device) and 0 < qkv.numel() < 2**31  # the kernels' offsets are int32
            and all(_is_pow2(n) for n in (heads, kv_heads, d))
            and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32))


def _launch_args(qkv: Tensor, cos: Tensor, heads: int, kv_heads: int):
    n_tok, seq_len = qkv.shape[0] * qkv.shape[1], qkv.shape[1]
    grid = (triton.cdiv(n_tok, BLOCK_TOKENS),)
    consts = dict(H=heads, HKV=kv_heads, D=_head_dim(qkv, heads, kv_heads), HALF=cos.shape[-1],
                  BLOCK_T=BLOCK_TOKENS, num_warps=8)
    return grid, n_tok, seq_len, consts


@torch.library.custom_op("pgolf::qkv_heads", mutates_args=())
def _qkv_heads(qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, value_embed: Optional[Tensor], heads: int,
               kv_heads: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    if not _use_triton(qkv, heads, kv_heads):
        q, k, v = qkv_heads_reference(qkv, cos, sin, q_gain, value_embed, heads, kv_heads, eps)
        return q.contiguous(), k.contiguous(), v.clone(memory_format=torch.contiguous_format)  # v: not a view of qkv
    q, k, v = (qkv.new_empty(shape) for shape in _head_shapes(qkv, heads, kv_heads))
    grid, n_tok, seq_len, consts = _launch_args(qkv, cos, heads, kv_heads)
    _qkv_heads_fwd_kernel[grid](qkv, value_embed if value_embed is not None else qkv, cos, sin, q_gain, q, k, v,
                                n_tok, seq_len, qkv.stride(1), eps, HAS_VE=value_embed is not None, **consts)
    return q, k, v


@_qkv_heads.register_fake
def _(qkv, cos, sin, q_gain, value_embed, heads, kv_heads, eps):
    return tuple(qkv.new_empty(shape) for shape in _head_shapes(qkv, heads, kv_heads))


@torch.library.custom_op("pgolf::qkv_heads_bwd", mutates_args=())
def _qkv_heads_bwd(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor,
                   heads: int, kv_heads: int, eps: float) -> tuple[Tensor, Tensor]:
    """(d qkv, d q_gain) for the gradients of q, k, v (d value_embed is dv itself)."""
    if not _use_triton(qkv, heads, kv_heads):
        return _qkv_heads_bwd_reference(dq, dk, dv, qkv, cos, sin, q_gain, heads, kv_heads, eps)
    dqkv = torch.empty_like(qkv)
    grid, n_tok, seq_len, consts = _launch_args(qkv, cos, heads, kv_heads)
    partial = torch.empty((grid[0], heads), dtype=torch.float32, device=qkv.device)
    _qkv_heads_bwd_kernel[grid](qkv, cos, sin, q_gain, dq, dk, dv, dqkv, partial, n_tok, seq_len, qkv.stride(1),
                                eps, **consts)
    return dqkv, partial.sum(0).to(q_gain.dtype)


@_qkv_heads_bwd.register_fake
def _(dq, dk, dv, qkv, cos, sin, q_gain, heads, kv_heads, eps):
    return torch.empty_like(qkv), torch.empty_like(q_gain)


def _setup_context(ctx, inputs, output):
    qkv, cos, sin, q_gain, value_embed, heads, kv_heads, eps = inputs
    ctx.save_for_backward(qkv, cos, sin, q_gain)
    ctx.heads, ctx.kv_heads, ctx.eps, ctx.has_ve = heads, kv_heads, eps, value_embed is not None


def _backward(ctx, dq, dk, dv):
    qkv, cos, sin, q_gain = ctx.saved_tensors
    dq, dk, dv = (qkv.new_zeros(shape) if g is None else g.contiguous()
                  for g, shape in zip((dq, dk, dv), _head_shapes(qkv, ctx.heads, ctx.kv_heads)))
    dqkv, dgain = torch.ops.pgolf.qkv_heads_bwd(dq, dk, dv, qkv, cos, sin, q_gain, ctx.heads, ctx.kv_heads, ctx.eps)
    return dqkv, None, None, dgain, (dv.reshape(*dv.shape[:2], -1) if ctx.has_ve else None), None, None, None


_qkv_heads.register_autograd(_backward, setup_context=_setup_context)


def qkv_heads(qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, value_embed: Optional[Tensor], heads: int,
              kv_heads: int, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """The attention's q, k, v from the qkv matmul's output; same arguments and results as qkv_heads_reference
    (value_embed in qkv's dtype; cos and sin may also come shaped (1, T, 1, rope/2), as the model's rotary gives
    them). Gradients flow to qkv, q_gain and value_embed."""
    if value_embed is not None and value_embed.dtype != qkv.dtype:
        raise TypeError(f"qkv_heads needs value_embed in qkv's dtype {qkv.dtype}, got {value_embed.dtype}")
    cos, sin = (t.reshape(qkv.shape[1], t.shape[-1]).contiguous().float() for t in (cos, sin))
    return torch.ops.pgolf.qkv_heads(qkv.contiguous(), cos, sin, q_gain,
                                     None if value_embed is None else value_embed.contiguous(), heads, kv_heads, eps)
