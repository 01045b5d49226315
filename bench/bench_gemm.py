"""The matmuls of one block at one micro-batch (98,304 tokens, bf16): cuBLAS against quack's CuTe-DSL GEMMs
(`quack-kernels`, which flash-attn-4 brings along), and kernels/mlp.py's fused relu^2 GEMMs against quack's
activation GEMMs (gemm_act / gemm_dact with relu_sq). Could a different GEMM take time off the step's ~200 ms of
matmuls (docs/PERF.md)?

    python bench/bench_gemm.py [--tuned] [--fused-only]   # needs an sm90 GPU; quack rows only where quack imports
    bash bench/fa4.sh gemm [ARGS...]                        # installs flash-attn-4 (and quack) first

Each row is checked against a float32 torch product before it is timed (relative L2 error, pass under 1e-2) and
timed as triton.testing.do_bench's median (L2 flushed before each run). The fused rows differ in what they move:
ours reads x and writes a = relu(h)^2 (forward), reads a and writes g_h (backward); quack's gemm_act can write h
as well, and its gemm_dact reads h and writes g_h and the recomputed a, which the backward's dW2 = g.T @ a needs.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import median_ms  # noqa: E402
from kernels import mlp  # noqa: E402

TOKENS, DIM, KV_DIM, HIDDEN = 98_304, 512, 256, 1536
# (name, out features, in features) of a block's weights: qkv packs q (512) and k, v (256 each)
WEIGHTS = [("qkv", DIM + 2 * KV_DIM, DIM), ("attn proj", DIM, DIM), ("mlp fc", HIDDEN, DIM), ("mlp proj", DIM, HIDDEN)]


def quack_or_reason():
    """quack's gemm interface, or why it cannot run here."""
    try:
        from quack import gemm_interface
    except Exception as e:  # noqa: BLE001 - any import failure (missing package, DSL, driver) is a reason
        return None, f"{type(e).__name__}: {e}"
    return gemm_interface, None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def timed(name: str, flops: float, fn, want: torch.Tensor, tiles_key: tuple[str, str] | None = None) -> dict:
    """A row; a call that raises (a config quack or Triton cannot build here) is a row that says why. tiles_key:
    (direction, MLP_TILES key) of a kernels/mlp.py row."""
    try:
        err = rel_err(fn(), want)
        us = 1000 * median_ms(fn)
    except Exception as e:  # noqa: BLE001 - report and go on to the next row
        print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return dict(name=f"{name} (failed: {type(e).__name__})", tiles_key=tiles_key, us=float("nan"),
                    tflops=float("nan"), err=float("nan"), ok=False)
    return dict(name=name, tiles_key=tiles_key, us=us, tflops=flops / us / 1e6, err=err, ok=err < 1e-2)


def matmul_rows(quack) -> list[dict]:
    """Forward x @ W.T, input gradient g @ W and weight gradient g.T @ x of each weight."""
    rows = []
    for weight, n_out, n_in in WEIGHTS:
        x = torch.randn(TOKENS, n_in, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(TOKENS, n_out, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n_out, n_in, device="cuda") / n_in ** 0.5).to(torch.bfloat16)
        flops = 2 * TOKENS * n_in * n_out
        for what, a, b in [("fwd", x, w.t()), ("dgrad", g, w), ("wgrad", g.t(), x)]:
            want = a.float() @ b.float()
            rows.append(timed(f"{weight} {what} cuBLAS", flops, lambda: a @ b, want))
            if quack is not None:
                rows.append(timed(f"{weight} {what} quack", flops, lambda: quack.gemm(a, b, tuned=False), want))
    return rows


def tile(bm, bn, warps, stages, flatten=True, per_sm=1) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=warps, num_stages=stages, FLATTEN=flatten,
                PROGRAMS_PER_SM=per_sm)


# kernels/mlp.py's GEMM with other tiles. Triton 3.6's ptxas for sm90 (compiled here, no GPU) puts the backward at
# 128 x 256, 8 warps, 3 stages at 213 KB of shared memory: one program per SM, so its epilogue (reading a, writing
# g_h) stalls the tensor cores. The 128 x 128 tiles fit two programs per SM, whose epilogues can overlap each other's
# main loops. Measured on an H100 (docs/PERF.md), kept is the fastest in both directions; dropped after that
# measurement: 128 x 128 at 2 stages, 2 per SM (8 warps flattened or not, 4 warps flattened), and a loaded into
# registers before the main loop (commit 0e6c788).
MLP_TILES = {  # key (bench_train.py --mlp-tiles): (what, tiles; None = kernels/mlp.py's own)
    "kept": ("128x256, 8 warps, 3 stages, flattened (kernels/mlp.py)", None),
    "256_s3_noflat": ("128x256, 8 warps, 3 stages, not flattened", tile(128, 256, 8, 3, flatten=False)),
    "128_w8_s3_noflat_x2": ("128x128, 8 warps, 3 stages, not flattened, 2 per SM",
                            tile(128, 128, 8, 3, flatten=False, per_sm=2)),
    "128_w4_s3_noflat_x2": ("128x128, 4 warps, 3 stages, not flattened, 2 per SM",
                            tile(128, 128, 4, 3, flatten=False, per_sm=2)),
}


def fused_rows(quack, tuned: bool) -> list[dict]:
    """The MLP's first GEMM with relu^2 (forward) and its derivative (backward) in the epilogue; with tuned, also
    quack's autotuned configs (each tried config is JIT-compiled: minutes)."""
    x = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(HIDDEN, DIM, device="cuda") / DIM ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(DIM, HIDDEN, device="cuda") / HIDDEN ** 0.5).to(torch.bfloat16)
    flops = 2 * TOKENS * DIM * HIDDEN
    h = x.float() @ w1.float().t()
    a_want = torch.relu(h).square()
    a = a_want.to(torch.bfloat16)
    g_h_want = 2 * torch.relu(h) * (g.float() @ w2.float())
    h_bf16 = h.to(torch.bfloat16)
    rows = [timed("relu2 fwd: cuBLAS matmul alone (no epilogue)", flops, lambda: x @ w1.t(), h),
            timed("relu2 bwd: cuBLAS matmul alone (no epilogue)", flops, lambda: g @ w2, g.float() @ w2.float())]
    for key, (what, tiles) in MLP_TILES.items():
        rows += [timed(f"relu2 fwd: {what}", flops, lambda: mlp._launch(x, w1, None, True, False, 0.0, tiles), a_want,
                       tiles_key=("fwd", key)),
                 timed(f"relu2 bwd (reads a): {what}", flops, lambda: mlp._launch(g, w2, a, False, True, 0.0, tiles),
                       g_h_want, tiles_key=("bwd", key))]
    if quack is not None:
        rows += [
            timed("relu2 fwd: quack gemm_act, writes a", flops,
                  lambda: quack.gemm_act(x, w1.t(), activation="relu_sq", store_preact=False, tuned=False)[1], a_want),
            timed("relu2 fwd: quack gemm_act, writes h and a", flops,
                  lambda: quack.gemm_act(x, w1.t(), activation="relu_sq", tuned=False)[1], a_want),
            timed("relu2 bwd: quack gemm_dact (reads h, writes g_h and a)", flops,
                  lambda: quack.gemm_dact(g, w2, h_bf16, activation="relu_sq", tuned=False)[0], g_h_want)]
    if quack is not None and tuned:
        rows += [
            timed("relu2 fwd: quack gemm_act, writes a, autotuned", flops,
                  lambda: quack.gemm_act(x, w1.t(), activation="relu_sq", store_preact=False)[1], a_want),
            timed("relu2 bwd: quack gemm_dact, autotuned", flops,
                  lambda: quack.gemm_dact(g, w2, h_bf16, activation="relu_sq")[0], g_h_want)]
    return rows


def fastest_tiles(rows: list[dict]) -> dict[str, str]:
    """The MLP_TILES key of the fastest correct kernels/mlp.py row in each direction ("kept" where none passed)."""
    return {way: min((r for r in rows if r["ok"] and r["tiles_key"] and r["tiles_key"][0] == way),
                     key=lambda r: r["us"], default=dict(tiles_key=(way, "kept")))["tiles_key"][1]
            for way in ("fwd", "bwd")}


def markdown(rows: list[dict]) -> str:
    lines = ["| matmul (M = 98,304 tokens) | µs | TFLOP/s | rel err | ok |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['name']} | {r['us']:.1f} | {r['tflops']:.0f} | {r['err']:.1e} | {'yes' if r['ok'] else 'NO'} |"
              for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuned", action="store_true", help="also time quack's autotuned relu^2 GEMMs")
    parser.add_argument("--json", help="write every row here, and the fastest correct MLP_TILES key per direction")
    parser.add_argument("--fused-only", action="store_true", help="only the relu^2 GEMMs, not the block's matmuls")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    quack, reason = quack_or_reason()
    print("quack: " + (f"{getattr(sys.modules.get('quack'), '__version__', '?')}" if quack else f"absent ({reason})"))
    fused = fused_rows(quack, args.tuned)
    print(markdown(fused), flush=True)
    best = fastest_tiles(fused)
    print(f"fastest correct tiles: bench_train.py --mlp-tiles {best['fwd']},{best['bwd']}")
    rows = [] if args.fused_only else matmul_rows(quack)
    if rows:
        print("\n" + markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(fused=fused, matmuls=rows, best=best), indent=1))


if __name__ == "__main__":
    main()
