"""Would fp8 matmuls pay at this model's shapes? Times bf16 matmuls against torch._scaled_mm (fp8 e4m3, tensorwise
and rowwise scales) for every matmul shape of a block at one micro-batch (98,304 tokens), and what it costs to make
the fp8 operand: a cast on its own, or fused into the RMSNorm that produces the activation.

    python bench/bench_fp8.py          # needs an sm89+ GPU (fp8 tensor cores)

Prints markdown tables; docs/PERF.md holds the H100's.
"""

import torch
import torch.nn.functional as F

from bench_kernels import median_ms

TOKENS = 98_304
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SHAPES = [(512, 1024, "qkv fwd"), (512, 512, "attn proj fwd / dgrad"), (1536, 512, "mlp proj fwd / fc dgrad"),
          (512, 1536, "fc fwd / mlp proj dgrad"), (1024, 512, "qkv dgrad")]


def us(fn) -> float:
    return 1000 * median_ms(fn)


def matmul_table() -> str:
    rows = ["| matmul (M = 98,304) | K | N | bf16 µs | TFLOP/s | fp8 tensorwise µs | TFLOP/s | fp8 rowwise µs | TFLOP/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, n, what in SHAPES:
        a = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        a8, w8 = a.to(E4M3), (w * 8).to(E4M3)
        one = torch.ones((), device="cuda")
        row_a, row_w = torch.ones(TOKENS, 1, device="cuda"), torch.ones(1, n, device="cuda")
        times = [us(lambda: a @ w.t()),
                 us(lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)),
                 us(lambda: torch._scaled_mm(a8, w8.t(), scale_a=row_a, scale_b=row_w, out_dtype=torch.bfloat16))]
        tflop = 2 * TOKENS * k * n / 1e12
        rows.append(f"| {what} | {k} | {n} | " + " | ".join(f"{t:.1f} | {tflop / t * 1e6:.0f}" for t in times) + " |")
    return "\n".join(rows)


def rms_norm(x):
    return F.rms_norm(x.float(), (x.size(-1),)).to(torch.bfloat16)


def rms_norm_and_fp8(x):
    y = F.rms_norm(x.float(), (x.size(-1),))
    scale = y.abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return y.to(torch.bfloat16), (y / scale).to(E4M3), scale


def cast_rowwise(x):
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


def cast_tensorwise(x):
    scale = x.float().abs().amax().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


def cast_table() -> str:
    rows = ["| producing the fp8 operand (compiled) | µs |", "|---|---:|"]
    for width in (512, 1536):
        x = torch.randn(TOKENS, width, device="cuda", dtype=torch.bfloat16)
        cases = [("rowwise cast alone", cast_rowwise), ("tensorwise cast alone", cast_tensorwise)]
        if width == 512:
            cases = [("RMSNorm, bf16 out", rms_norm), ("RMSNorm + rowwise fp8 copy", rms_norm_and_fp8)] + cases
        for name, fn in cases:
            compiled = torch.compile(fn)
            compiled(x)
            rows.append(f"| {name} (M × {width}) | {us(lambda: compiled(x)):.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}\n")
    print(matmul_table() + "\n")
    print(cast_table())
