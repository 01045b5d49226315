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

linear_softcap_cross_entropy fuses the lm_head matmul in: rows of hidden states go through in chunks;
each chunk's logits are made by a matmul, turned into loss and gradient in place by
the forward kernel (WRITE_GRAD: one read and one write of them), and consumed by the two matmuls of the
gradients, so no (N, V) tensor exists. The gradient is computed in the forward pass; the backward only
scales it by the incoming (scalar) gradient.
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
    def _capped_tile(z, softcap, HAS_CAP: tl.constexpr):
        """(c, dc/dz) of an fp32 tile; dc/dz is unused (1.0) without a cap."""
        if HAS_CAP:
            t = _tanh(z * (1.0 / softcap))
            return softcap * t, 1.0 - t * t
        else:
            return z, 1.0

    @triton.jit
    def _store_grad(z_rows, dz_rows, row_mask, y, m, log_s, g, V, softcap,
                    HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """dL/dz = g * (softmax(c) - onehot(y)) * dc/dz for a tile of rows, swept over the vocab in blocks.
        dz_rows may be z_rows: each block is read before it is overwritten, and rows belong to one program."""
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            col = start + cols
            col_mask = col < V
            # -inf in the padding keeps exp() in range there (it is never stored)
            z = tl.load(z_rows[:, None] + col[None, :], mask=col_mask[None, :], other=float("-inf")).to(tl.float32)
            c, dcap = _capped_tile(z, softcap, HAS_CAP)
            p = tl.exp((c - m[:, None]) - log_s[:, None])
            grad = (p - tl.where(col[None, :] == y[:, None], 1.0, 0.0)) * g[:, None] * dcap
            mask = row_mask[:, None] & col_mask[None, :]
            tl.store(dz_rows[:, None] + col[None, :], grad.to(dz_rows.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_fwd_kernel(
        Z, T, LOSS, STATS, DZ, N, V, stride_z, stride_dz, softcap, grad_scale,
        HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        # Rows past N recompute row N-1 so that every lane stays finite; only the stores are masked.
        safe_rows = tl.minimum(rows, N - 1).to(tl.int64)
        z_rows = Z + safe_rows * stride_z
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            col_mask = start + cols < V
            z = tl.load(z_rows[:, None] + start + cols[None, :], mask=col_mask[None, :], other=0.0).to(tl.float32)
            c, _ = _capped_tile(z, softcap, HAS_CAP)
            c = tl.where(col_mask[None, :], c, float("-inf"))
            # the first block always holds column 0, so m_new is finite and exp(m - m_new) is 0, not NaN
            m_new = tl.maximum(m, tl.max(c, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new[:, None]), axis=1)
            m = m_new
        log_s = tl.log(s)

        y = tl.load(T + safe_rows)
        valid = (y >= 0) & (y < V)
        c_y, _ = _capped_tile(tl.load(z_rows + tl.where(valid, y, 0)).to(tl.float32), softcap, HAS_CAP)
        loss = tl.where(valid, (m - c_y) + log_s, float("nan"))
        tl.store(LOSS + rows, loss, mask=row_mask)
        tl.store(STATS + 2 * rows, m, mask=row_mask)
        tl.store(STATS + 2 * rows + 1, log_s, mask=row_mask)
        if WRITE_GRAD:  # the gradient of grad_scale * loss, possibly over the logits themselves (DZ = Z)
            g = tl.full([BLOCK_M], 1.0, tl.float32) * grad_scale
            _store_grad(z_rows, DZ + safe_rows * stride_dz, row_mask, y, m, log_s, g, V, softcap, HAS_CAP, BLOCK_V)

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
        _store_grad(Z + safe_rows * stride_z, DZ + safe_rows * stride_dz, row_mask, y, m, log_s, g, V, softcap,
                    HAS_CAP, BLOCK_V)


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


def _launch_ce_fwd(z: Tensor, targets: Tensor, softcap: float, grad_scale: float | None) -> tuple[Tensor, Tensor]:
    """Per-row losses and stats of row-contiguous logits z (N, V); with a grad_scale the kernel also overwrites
    z with grad_scale * dloss/dz."""
    n, v = z.shape
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    stats = torch.empty((n, 2), dtype=torch.float32, device=z.device)
    block_m, block_v, num_warps = _launch_config(v)
    _ce_fwd_kernel[(triton.cdiv(n, block_m),)](
        z, targets, loss, stats, z, n, v, z.stride(0), z.stride(0), softcap, grad_scale or 0.0,
        HAS_CAP=softcap > 0, WRITE_GRAD=grad_scale is not None, BLOCK_M=block_m, BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return loss, stats


@torch.library.custom_op("pgolf::softcap_ce_fwd", mutates_args=())
def _softcap_ce_fwd(logits: Tensor, targets: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and softmax stats (N, 2) = (max c, log sum exp(c - max)), fp32, for logits (N, V)."""
    if not _use_triton(logits):
        return _ce_fwd_reference(logits, targets, softcap)
    return _launch_ce_fwd(_logits_rows(logits), targets.contiguous(), softcap, grad_scale=None)


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


# --------------------------------------------------------------------------------------------------
# lm_head matmul fused in: logits = h @ weight.T, one chunk of rows at a time

# Rows per chunk: 8192 rows = 16 MiB of bf16 logits at vocab 1024, 128 MiB at 8192 (a twelfth of the logits
# of a 98,304-token micro-batch). Chunks of a fixed 2^23 logits instead made 96 chunks at vocab 8192, and
# that loop of small matmuls and launches ran 4x slower on the H100 (docs/PERF.md).
CHUNK_ROWS = 8192


def _ce_loss_and_grad_(logits: Tensor, targets: Tensor, softcap: float, grad_scale: float) -> Tensor:
    """Per-row losses (fp32) of a contiguous (n, V) block of logits; the block is overwritten with
    grad_scale * dloss/dlogits (one read and one write of it in all)."""
    if not _use_triton(logits):
        loss, stats = _ce_fwd_reference(logits, targets, softcap)
        logits.copy_(_ce_bwd_reference(torch.full_like(loss, grad_scale), logits, targets, stats, softcap))
        return loss
    return _launch_ce_fwd(logits, targets, softcap, grad_scale)[0]


@torch.library.custom_op("pgolf::linear_softcap_ce", mutates_args=())
def _linear_softcap_ce(h: Tensor, weight: Tensor, targets: Tensor, softcap: float, mean: bool,
                       chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dh, dloss/dweight) for the sum (or mean) over rows of the soft-capped cross-entropy of
    h (N, d) @ weight (V, d).T. The gradients are computed here, in the forward: the loss is a terminal node,
    so the backward only scales them by the incoming gradient, and no (N, V) tensor ever exists."""
    n = h.shape[0]
    w = weight.to(h.dtype)
    grad_scale = 1.0 / n if mean and n else 1.0
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    for start in range(0, n, chunk_rows):
        hc = h[start:start + chunk_rows]
        logits = hc @ w.t()
        total += _ce_loss_and_grad_(logits, targets[start:start + chunk_rows], softcap, grad_scale).sum()
        torch.mm(logits, w, out=grad_h[start:start + chunk_rows])
        grad_w += (logits.t() @ hc).float()
    loss = total / n if mean else total
    return loss, grad_h, grad_w.to(weight.dtype)


@_linear_softcap_ce.register_fake
def _(h, weight, targets, softcap, mean, chunk_rows):
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight)


def _linear_setup_context(ctx, inputs, output):
    _, grad_h, grad_w = output
    ctx.mark_non_differentiable(grad_h, grad_w)
    ctx.save_for_backward(grad_h, grad_w)


def _linear_backward(ctx, dloss, _dgrad_h, _dgrad_w):
    grad_h, grad_w = ctx.saved_tensors
    return grad_h * dloss.to(grad_h.dtype), grad_w * dloss.to(grad_w.dtype), None, None, None, None


_linear_softcap_ce.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_softcap_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                                 reduction: str = "mean", chunk_rows: int | None = None) -> Tensor:
    """softcap_cross_entropy(h @ weight.T, targets, softcap, reduction) without materialising the logits:
    rows go through in chunks of `chunk_rows` (default CHUNK_ROWS). The matmuls run in h's dtype
    (weight is cast to it), the loss is fp32 and weight's gradient comes back in weight's dtype.

    With a gradient to compute and reduction "mean" or "sum", the gradient is made in the forward pass
    (memory: one chunk of logits plus the gradients themselves). Per-row losses ("none") with a gradient
    take the unfused path; without a gradient every reduction is chunked.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    rows = chunk_rows or CHUNK_ROWS
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    h2, t = h.reshape(-1, h.shape[-1]).contiguous(), targets.reshape(-1).contiguous()
    if needs_grad and reduction != "none":
        loss, _, _ = torch.ops.pgolf.linear_softcap_ce(h2, weight, t, float(softcap), reduction == "mean", rows)
        return loss
    if needs_grad:
        return softcap_cross_entropy(h @ weight.to(h.dtype).t(), targets, softcap, reduction)
    w = weight.to(h.dtype)
    losses = [torch.ops.pgolf.softcap_ce_fwd(h2[s:s + rows] @ w.t(), t[s:s + rows], float(softcap))[0]
              for s in range(0, h2.shape[0], rows)]
    loss = torch.cat(losses) if losses else h2.new_empty(0, dtype=torch.float32)
    if reduction == "none":
        return loss.view(targets.shape)
    return loss.sum() if reduction == "sum" else loss.mean()
