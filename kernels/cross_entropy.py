"""Cross-entropy of soft-capped logits: fused Triton forward and backward.

With logits z (one row of V), target y and cap > 0, the model scores c = cap * tanh(z / cap)
(cap <= 0 means no cap: c = z). Per row, with fp32 math whatever the storage dtype:

Forward, online over vocab blocks (running max m, running s = sum_j exp(c_j - m)):
    loss = (m - c_y) + log(s)             (= logsumexp(c) - c_y)
Backward, with g the incoming gradient of the row's loss:
    dL/dz_j = g * (exp((c_j - m) - log(s)) - [j == y]) * dc_j/dz_j,   dc/dz = 1 - tanh^2(z / cap)

The forward writes three fp32 numbers a row (loss, m, log s); the backward re-reads the logits, takes
m and log s from the forward (so loss and gradient agree exactly) and writes dL/dz in the logits'
dtype. That is 3 passes over the logits in all and no fp32 copy of them: cheaper than computing the
gradient in the forward and then rescaling it by g in the backward (4 passes). m and log s are kept
apart rather than summed into lse because, for large uncapped logits, lse rounds to a multiple of
ulp(m) while c - m is exact near the max: the split keeps torch's accuracy at |z| ~ 1e4.

Reductions ("mean", "sum") are ordinary torch ops over the per-row losses, so the backward receives
g per row (an expanded, stride-0 tensor for mean/sum) and one kernel serves all three reductions.
A target outside [0, V) reads nothing out of bounds and gives a NaN loss for its row.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Logits per program tile (BLOCK_M rows × BLOCK_V vocab columns) and the widest vocab block; a row
# wider than MAX_BLOCK_V is swept in several blocks. Warps scale with the tile (~16 elements a thread:
# the exp/tanh work makes this kernel less purely memory-bound than RMSNorm).
TILE_ELEMS = 4096
MAX_BLOCK_V = 4096


def softcap_cross_entropy_reference(logits: Tensor, targets: Tensor, softcap: float, reduction: str = "mean") -> Tensor:
    """Plain-torch reference (fp32 math); differentiable by autograd. Materialises fp32 logits."""
    c = logits.float()
    if softcap > 0:
        c = softcap * torch.tanh(c / softcap)
    loss = F.cross_entropy(c.reshape(-1, c.shape[-1]), targets.reshape(-1), reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def _capped(z: Tensor, softcap: float):
    """(c, dc/dz) in fp32 for the non-Triton path."""
    z = z.float()
    if softcap <= 0:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, 1 - t * t


def _ce_fwd_reference(logits: Tensor, targets: Tensor, softcap: float):
    c, _ = _capped(logits, softcap)
    m = c.amax(-1)
    log_s = torch.exp(c - m[:, None]).sum(-1).log()
    valid = (targets >= 0) & (targets < c.shape[-1])
    c_y = c.gather(1, torch.where(valid, targets, 0).long()[:, None])[:, 0]
    loss = torch.where(valid, (m - c_y) + log_s, float("nan"))
    return loss, torch.stack([m, log_s], dim=1)


def _ce_bwd_reference(dloss: Tensor, logits: Tensor, targets: Tensor, stats: Tensor, softcap: float):
    c, dcap = _capped(logits, softcap)
    grad = torch.exp((c - stats[:, :1]) - stats[:, 1:])
    valid = (targets >= 0) & (targets < c.shape[-1])
    rows = torch.arange(c.shape[0], device=c.device)[valid]
    grad[rows, targets[valid].long()] -= 1
    grad = grad * dloss.float()[:, None]
    if dcap is not None:
        grad = grad * dcap
    return grad.to(logits.dtype)


if triton is not None:

    @triton.jit
    def _tanh(u):
        # exp of a non-positive number never overflows, so huge |u| gives ±1, not inf/inf
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0, -t, t)

    @triton.jit
    def _ce_fwd_kernel(
        Z, T, LOSS, STATS, N, V, stride_z, softcap,
        HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        # Rows past N recompute row N-1 so that every lane stays finite; only the stores are masked.
        safe_rows = tl.minimum(rows, N - 1)
        z_rows = Z + safe_rows.to(tl.int64) * stride_z
        cols = tl.arange(0, BLOCK_V)
        if HAS_CAP:
            inv_cap = 1.0 / softcap  # one division a program, a multiply per element
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            col_mask = start + cols < V
            z = tl.load(z_rows[:, None] + start + cols[None, :], mask=col_mask[None, :], other=0.0).to(tl.float32)
            if HAS_CAP:
                c = softcap * _tanh(z * inv_cap)
            else:
                c = z
            c = tl.where(col_mask[None, :], c, float("-inf"))
            # the first block always holds column 0, so m_new is finite and exp(m - m_new) is 0, not NaN
            m_new = tl.maximum(m, tl.max(c, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new[:, None]), axis=1)
            m = m_new
        log_s = tl.log(s)

        y = tl.load(T + safe_rows)
        valid = (y >= 0) & (y < V)
        z_y = tl.load(z_rows + tl.where(valid, y, 0)).to(tl.float32)
        if HAS_CAP:
            c_y = softcap * _tanh(z_y * inv_cap)
        else:
            c_y = z_y
        loss = tl.where(valid, (m - c_y) + log_s, float("nan"))
        tl.store(LOSS + rows, loss, mask=row_mask)
        tl.store(STATS + 2 * rows, m, mask=row_mask)
        tl.store(STATS + 2 * rows + 1, log_s, mask=row_mask)

    @triton.jit
    def _ce_bwd_kernel(
        DLOSS, Z, T, STATS, DZ, N, V, stride_dloss, stride_z, stride_dz, softcap,
        HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        safe_rows = tl.minimum(rows, N - 1).to(tl.int64)
        m = tl.load(STATS + 2 * safe_rows)
        log_s = tl.load(STATS + 2 * safe_rows + 1)
        y = tl.load(T + safe_rows)
        g = tl.load(DLOSS + safe_rows * stride_dloss).to(tl.float32)
        z_rows = Z + safe_rows * stride_z
        dz_rows = DZ + safe_rows * stride_dz
        cols = tl.arange(0, BLOCK_V)
        if HAS_CAP:
            inv_cap = 1.0 / softcap
        for start in range(0, V, BLOCK_V):
            col = start + cols
            col_mask = col < V
            # -inf in the padding keeps exp() in range there (it is never stored)
            z = tl.load(z_rows[:, None] + col[None, :], mask=col_mask[None, :], other=float("-inf")).to(tl.float32)
            if HAS_CAP:
                t = _tanh(z * inv_cap)
                c = softcap * t
            else:
                c = z
            grad = (tl.exp((c - m[:, None]) - log_s[:, None]) - tl.where(col[None, :] == y[:, None], 1.0, 0.0)) * g[:, None]
            if HAS_CAP:
                grad = grad * (1.0 - t * t)
            mask = row_mask[:, None] & col_mask[None, :]
            tl.store(dz_rows[:, None] + col[None, :], grad.to(DZ.dtype.element_ty), mask=mask)


def _launch_config(vocab: int):
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    block_m = max(1, TILE_ELEMS // block_v)
    num_warps = min(16, max(4, block_m * block_v // 512))
    return block_m, block_v, num_warps


def _use_triton(logits: Tensor) -> bool:
    # empty inputs take the torch path too: it handles them and a zero-size grid would not launch
    return triton_available(logits.device) and logits.numel() > 0


def _logits_rows(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


@torch.library.custom_op("pgolf::softcap_ce_fwd", mutates_args=())
def _softcap_ce_fwd(logits: Tensor, targets: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and softmax stats (N, 2) = (max c, log sum exp(c - max)), fp32, for logits (N, V)."""
    if not _use_triton(logits):
        return _ce_fwd_reference(logits, targets, softcap)
    z = _logits_rows(logits)
    n, v = z.shape
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    stats = torch.empty((n, 2), dtype=torch.float32, device=z.device)
    block_m, block_v, num_warps = _launch_config(v)
    _ce_fwd_kernel[(triton.cdiv(n, block_m),)](
        z, targets.contiguous(), loss, stats, n, v, z.stride(0), softcap,
        HAS_CAP=softcap > 0, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss, stats


@_softcap_ce_fwd.register_fake
def _(logits, targets, softcap):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty((n, 2), dtype=torch.float32)


@torch.library.custom_op("pgolf::softcap_ce_bwd", mutates_args=())
def _softcap_ce_bwd(dloss: Tensor, logits: Tensor, targets: Tensor, stats: Tensor, softcap: float) -> Tensor:
    """dL/dlogits (N, V) in the logits' dtype, given dloss (N,) for the per-row losses."""
    if not _use_triton(logits):
        return _ce_bwd_reference(dloss, logits, targets, stats, softcap).contiguous()  # the fake's strides
    z = _logits_rows(logits)
    n, v = z.shape
    dz = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    block_m, block_v, num_warps = _launch_config(v)
    _ce_bwd_kernel[(triton.cdiv(n, block_m),)](
        dloss, z, targets.contiguous(), stats.contiguous(), dz, n, v, dloss.stride(0), z.stride(0), dz.stride(0),
        softcap, HAS_CAP=softcap > 0, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
    )
    return dz


@_softcap_ce_bwd.register_fake
def _(dloss, logits, targets, stats, softcap):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, targets, softcap = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, targets, stats)
    ctx.softcap = softcap


def _backward(ctx, dloss, _dstats):
    logits, targets, stats = ctx.saved_tensors
    return torch.ops.pgolf.softcap_ce_bwd(dloss, logits, targets, stats, ctx.softcap), None, None


_softcap_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


def softcap_cross_entropy(logits: Tensor, targets: Tensor, softcap: float, reduction: str = "mean") -> Tensor:
    """Cross-entropy of softcap * tanh(logits / softcap) (no cap if softcap <= 0).

    logits (..., V) bf16/fp16/fp32, targets (...) integer class ids. reduction "mean" or "sum" gives an
    fp32 scalar, "none" fp32 losses shaped like targets. The gradient comes back in the logits' dtype.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    loss, _ = torch.ops.pgolf.softcap_ce_fwd(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), float(softcap))
    if reduction == "none":
        return loss.view(targets.shape)
    return loss.sum() if reduction == "sum" else loss.mean()
