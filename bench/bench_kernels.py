"""Benchmark kernels/ on the local CUDA GPU: Triton op vs eager torch reference vs torch.compile'd reference.

    python bench/bench_kernels.py            # the model's shapes, final markdown table
    python bench/bench_kernels.py --sweep    # also time the Triton kernels over a few tile and chunk sizes

RMSNorm (fwd+bwd, bf16): achieved GB/s counting the nominal traffic read x + write y (fwd) and
read x, dy + write dx (bwd) = 5 * x.nbytes, the same count for every implementation (our kernel
saves no rstd: it recomputes it). Soft-capped CE (fwd+bwd, bf16 logits): median ms and the peak
memory the step allocates beyond its inputs (torch.cuda.max_memory_allocated delta; the returned
logits gradient counts). lm_head + soft-capped CE (fwd+bwd, bf16 hidden states h of width 512, fp32 tied
weight as in the model): the same two numbers, the gradients of h and the weight counted. The relu^2 MLP
(fwd+bwd, bf16, the model's 98304 x 512 -> 1536 -> 512): the same numbers. The attention's inputs from the qkv
matmul (q/k RMSNorm + rotary + gain, v + value embedding; fwd+bwd, bf16, the model's shape): GB/s and memory.

Two times per row: "wall" = triton.testing.do_bench median (L2 flushed before each run), which includes the host
work of autograd and the custom ops whenever that outlasts the kernels; "GPU" = the sum of the step's kernel
durations from the torch profiler, the time the step occupies the GPU. Inside a compiled training step the host
runs ahead, so GPU time is the one that adds up to ms/step; bandwidth (GB/s) is computed from it.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from kernels import cross_entropy, rmsnorm  # noqa: E402

HBM_PEAK_GBS = 3000.0  # H100 80GB HBM3 copy bandwidth, measured (docs/PERF.md)
RMS_SHAPES = [(98304, 512), (98304, 8, 64)]  # residual stream; per-head q/k norm (tokens, heads, head_dim)
CE_SHAPES = [(98304, 1024), (98304, 8192)]  # tokens per GPU × vocab
MODEL_DIM = 512
SOFTCAP = 30.0


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def gpu_ms(step, reps: int = 10) -> float:
    """GPU time of one step without the host: the sum of its kernels' durations (torch profiler), per step.
    do_bench's wall time also counts the gaps in which the GPU waits for the custom ops' and autograd's Python
    work; at these sizes that work is longer than the kernels, and inside a training step it overlaps them."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernels_us / reps / 1000


def rms_step(fn, x, dy):
    def step():
        y = fn(x)
        torch.autograd.grad(y, x, dy)

    return step


def ce_step(fn, logits, targets):
    def step():
        loss = fn(logits, targets, SOFTCAP)
        torch.autograd.grad(loss, logits)

    return step


def linear_ce_step(fn, h, weight, targets):
    def step():
        loss = fn(h, weight, targets, SOFTCAP)
        torch.autograd.grad(loss, (h, weight))

    return step


def unfused_linear_ce(h, weight, targets, softcap):
    """The model's torch path: bf16 logits from the matmul, then the loss."""
    return kernels.softcap_cross_entropy_reference(h @ weight.to(h.dtype).t(), targets, softcap)


def matmul_then_triton_ce(h, weight, targets, softcap):
    return kernels.softcap_cross_entropy(h @ weight.to(h.dtype).t(), targets, softcap)


def peak_mib(step) -> float:
    step()  # compile / autotune / allocator warm-up outside the measurement
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def implementations(triton_fn, reference_fn):
    return [
        ("triton", triton_fn),
        ("eager ref", reference_fn),
        ("compiled ref", torch.compile(reference_fn, dynamic=False)),
    ]


def bench_rms_norm():
    rows = []
    for shape in RMS_SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).mul_(2).add_(0.3).requires_grad_()
        dy = torch.randn_like(x)
        nbytes = 5 * x.numel() * x.element_size()
        expected = torch.autograd.grad(kernels.rms_norm_reference(x), x, dy)[0]
        got = torch.autograd.grad(kernels.rms_norm(x), x, dy)[0]
        assert (got.float() - expected.float()).norm() / expected.float().norm() < 1e-2, "rms_norm mismatch"
        times = {}
        for name, fn in implementations(kernels.rms_norm, kernels.rms_norm_reference):
            fwd_ms = median_ms(lambda: fn(x))
            wall_ms = median_ms(rms_step(fn, x, dy))
            times[name] = ms = gpu_ms(rms_step(fn, x, dy))
            gbs = nbytes / ms / 1e6
            rows.append({
                "op": f"rms_norm {'x'.join(map(str, shape))} bf16", "impl": name, "fwd ms": f"{fwd_ms:.3f}",
                "fwd+bwd ms (wall)": f"{wall_ms:.3f}", "fwd+bwd ms (GPU)": f"{ms:.3f}", "GB/s (GPU)": f"{gbs:.0f}",
                "% of 3.0 TB/s": f"{100 * gbs / HBM_PEAK_GBS:.0f}%",
            })
        for row in rows[-3:]:
            row["GPU speedup vs compiled"] = f"{times['compiled ref'] / float(row['fwd+bwd ms (GPU)']):.2f}x"
    return rows


def bench_ce():
    rows = []
    for n, vocab in CE_SHAPES:
        logits = (torch.randn(n, vocab, device="cuda") * 4).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, vocab, (n,), device="cuda")
        expected = kernels.softcap_cross_entropy_reference(logits, targets, SOFTCAP)
        got = kernels.softcap_cross_entropy(logits, targets, SOFTCAP)
        assert abs(got.item() - expected.item()) < 1e-4 * abs(expected.item()), "cross-entropy mismatch"
        impls = implementations(kernels.softcap_cross_entropy, kernels.softcap_cross_entropy_reference)
        rows += time_and_memory_rows(f"softcap CE {n}x{vocab} bf16",
                                     [(name, ce_step(fn, logits, targets)) for name, fn in impls])
    return rows


def time_and_memory_rows(op: str, steps) -> list[dict]:
    """One row per (name, step): wall and GPU ms and peak MiB, each against the "compiled ref" step."""
    stats = {name: (median_ms(step), gpu_ms(step), peak_mib(step)) for name, step in steps}
    ref_wall, ref_gpu, ref_mem = stats["compiled ref"]
    return [{"op": op, "impl": name, "fwd+bwd ms (wall)": f"{wall:.3f}", "fwd+bwd ms (GPU)": f"{gpu:.3f}",
             "peak MiB": f"{mem:.0f}", "wall speedup vs compiled": f"{ref_wall / wall:.2f}x",
             "GPU speedup vs compiled": f"{ref_gpu / gpu:.2f}x", "memory vs compiled": f"{mem / ref_mem:.2f}x"}
            for name, (wall, gpu, mem) in stats.items()]


def linear_ce_inputs(n, vocab):
    h = torch.randn(n, MODEL_DIM, device="cuda").to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, MODEL_DIM, device="cuda") * 0.1).requires_grad_()
    return h, weight, torch.randint(0, vocab, (n,), device="cuda")


def bench_linear_ce():
    rows = []
    for n, vocab in CE_SHAPES:
        h, weight, targets = linear_ce_inputs(n, vocab)
        expected = unfused_linear_ce(h, weight, targets, SOFTCAP)
        got = kernels.linear_softcap_cross_entropy(h, weight, targets, SOFTCAP)
        assert abs(got.item() - expected.item()) < 1e-3 * abs(expected.item()), "lm_head + CE mismatch"
        impls = [("chunked triton", kernels.linear_softcap_cross_entropy), ("matmul + triton CE", matmul_then_triton_ce),
                 ("eager ref", unfused_linear_ce), ("compiled ref", torch.compile(unfused_linear_ce, dynamic=False))]
        rows += time_and_memory_rows(f"lm_head+CE {n}x{MODEL_DIM}x{vocab}",
                                     [(name, linear_ce_step(fn, h, weight, targets)) for name, fn in impls])
    return rows


MLP_SHAPE = (98304, 512, 1536)  # tokens per micro-batch, model dim, hidden (MLP_MULT=3)


def bench_mlp():
    """relu(x @ w1.T)^2 @ w2.T fwd+bwd, bf16, gradients of x, w1 and w2."""
    n, dim, hidden = MLP_SHAPE
    x = torch.randn(n, dim, device="cuda").to(torch.bfloat16).requires_grad_()
    w1 = (torch.randn(hidden, dim, device="cuda") / dim ** 0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(dim, hidden, device="cuda") / hidden ** 0.5).to(torch.bfloat16).requires_grad_()
    g = torch.randn(n, dim, device="cuda").to(torch.bfloat16)
    want, got = kernels.relu2_mlp_reference(x, w1, w2).float(), kernels.relu2_mlp(x, w1, w2).float()
    assert (got - want).norm() / want.norm() < 1e-2, "relu2_mlp mismatch"

    def step(fn):
        def run():
            torch.autograd.grad(fn(x, w1, w2), (x, w1, w2), g)
        return run

    impls = implementations(kernels.relu2_mlp, kernels.relu2_mlp_reference)
    return time_and_memory_rows(f"relu2 MLP {n}x{dim}x{hidden} bf16", [(name, step(fn)) for name, fn in impls])


QKV_SHAPE = (48, 2048, 8, 4, 64, 8)  # sequences x seq_len per micro-batch, heads, KV heads, head dim, rotary pairs


def bench_qkv():
    """The attention's inputs from qkv (q/k RMSNorm + rotary + gain, v + value embedding) fwd+bwd, bf16, with the
    gradients of qkv, q_gain and the value embedding. GB/s counts reading qkv and the value embedding and
    writing q, k, v (fwd), reading their gradients and q, k and writing the gradient of qkv (bwd)."""
    n, t, heads, kv_heads, d, half = QKV_SHAPE
    width = (heads + 2 * kv_heads) * d
    qkv = torch.randn(n, t, width, device="cuda").to(torch.bfloat16).requires_grad_()
    ve = torch.randn(n, t, kv_heads * d, device="cuda").to(torch.bfloat16).requires_grad_()
    angles = torch.rand(t, half, device="cuda") * 6.3
    cos, sin = angles.cos(), angles.sin()
    gain = (torch.rand(heads, device="cuda") + 0.5).requires_grad_()
    grads = [torch.randn(n, t, h, d, device="cuda").to(torch.bfloat16) for h in (heads, kv_heads, kv_heads)]
    want = kernels.qkv_heads_reference(qkv, cos, sin, gain, ve, heads, kv_heads)
    got = kernels.qkv_heads(qkv, cos, sin, gain, ve, heads, kv_heads)
    assert all((a.float() - b.float()).norm() / b.float().norm() < 1e-2 for a, b in zip(got, want)), "qkv mismatch"
    nbytes = n * t * 2 * (2 * width + kv_heads * d + 2 * width + (heads + kv_heads) * d)

    def step(fn):
        def run():
            torch.autograd.grad(fn(qkv, cos, sin, gain, ve, heads, kv_heads), (qkv, gain, ve), grads)
        return run

    rows = time_and_memory_rows(f"qkv heads {n * t}x{width} bf16",
                                [(name, step(fn)) for name, fn in implementations(kernels.qkv_heads,
                                                                                  kernels.qkv_heads_reference)])
    for row in rows:
        row["GB/s (GPU)"] = f"{nbytes / float(row['fwd+bwd ms (GPU)']) / 1e6:.0f}"
    return rows


def sweep():
    """Triton fwd+bwd time over tile sizes, to pick TILE_ELEMS / MAX_BLOCK_V for this GPU."""
    rows = []
    defaults = (rmsnorm.TILE_ELEMS, cross_entropy.TILE_ELEMS, cross_entropy.MAX_BLOCK_V)
    for shape in RMS_SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        for tile in (1024, 2048, 4096, 8192, 16384):
            rmsnorm.TILE_ELEMS = tile
            ms = median_ms(rms_step(kernels.rms_norm, x, dy))
            rows.append({"op": f"rms_norm {'x'.join(map(str, shape))}", "config": f"TILE_ELEMS={tile}",
                         "fwd+bwd ms": f"{ms:.3f}", "GB/s": f"{5 * x.numel() * 2 / ms / 1e6:.0f}"})
    for n, vocab in CE_SHAPES:
        logits = (torch.randn(n, vocab, device="cuda") * 4).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, vocab, (n,), device="cuda")
        for tile in (2048, 4096, 8192, 16384):
            for block_v in (1024, 2048, 4096, 8192):
                if block_v > min(tile, vocab):  # BLOCK_V would be clipped: a duplicate config
                    continue
                cross_entropy.TILE_ELEMS, cross_entropy.MAX_BLOCK_V = tile, block_v
                ms = median_ms(ce_step(kernels.softcap_cross_entropy, logits, targets))
                rows.append({"op": f"softcap CE {n}x{vocab}", "config": f"TILE_ELEMS={tile} MAX_BLOCK_V={block_v}",
                             "fwd+bwd ms": f"{ms:.3f}", "GB/s": f"{3 * logits.numel() * 2 / ms / 1e6:.0f}"})
    rmsnorm.TILE_ELEMS, cross_entropy.TILE_ELEMS, cross_entropy.MAX_BLOCK_V = defaults
    chunk_default = cross_entropy.CHUNK_ROWS
    for n, vocab in CE_SHAPES:
        h, weight, targets = linear_ce_inputs(n, vocab)
        for chunk in (2048, 4096, 8192, 16384, 32768, 98304):
            cross_entropy.CHUNK_ROWS = chunk
            step = linear_ce_step(kernels.linear_softcap_cross_entropy, h, weight, targets)
            rows.append({"op": f"lm_head+CE {n}x{MODEL_DIM}x{vocab}", "config": f"CHUNK_ROWS={chunk}",
                         "fwd+bwd ms": f"{median_ms(step):.3f}", "peak MiB": f"{peak_mib(step):.0f}"})
    cross_entropy.CHUNK_ROWS = chunk_default
    return rows


def markdown(rows) -> str:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernels over tile sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (none visible); the CPU path is covered by tests/test_kernels.py")
    if not kernels.triton_available("cuda"):
        sys.exit("bench_kernels.py needs triton importable: the ops would fall back to torch")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {__import__('triton').__version__}")
    print(f"cross-entropy: Triton TILE_ELEMS={cross_entropy.TILE_ELEMS} MAX_BLOCK_V={cross_entropy.MAX_BLOCK_V}; "
          f"rms_norm: TILE_ELEMS={rmsnorm.TILE_ELEMS}\n")
    qkv_rows = bench_qkv()
    print("## Attention inputs from qkv fwd+bwd (q/k norm + rotary + gain, v + value embedding)\n")
    print(markdown(qkv_rows) + "\n", flush=True)
    rms_rows, ce_rows, linear_rows, mlp_rows = bench_rms_norm(), bench_ce(), bench_linear_ce(), bench_mlp()
    print("## RMSNorm fwd+bwd (nominal bytes 5 x x.nbytes)\n")
    print(markdown(rms_rows))
    print("\n## Soft-capped cross-entropy fwd+bwd (softcap 30, mean)\n")
    print(markdown(ce_rows))
    print(f"\n## lm_head matmul + soft-capped CE fwd+bwd (d={MODEL_DIM}, CHUNK_ROWS={cross_entropy.CHUNK_ROWS})\n")
    print(markdown(linear_rows))
    print("\n## MLP relu(x W1^T)^2 W2^T fwd+bwd (relu^2 in the matmul epilogues vs torch)\n")
    print(markdown(mlp_rows))
    if args.sweep:
        print("\n## Triton tile and chunk sweep (fwd+bwd; CE GB/s counts 3 x logits.nbytes)\n")
        print(markdown(sweep()))


if __name__ == "__main__":
    main()
