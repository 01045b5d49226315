"""Training-step benchmark: ms/step, tokens/s per GPU, MFU and peak memory of train_gpt.py's step.

    python bench/bench_train.py --steps 40                       # one GPU, the default config (grad-accum 8)
    torchrun --standalone --nproc_per_node=2 bench/bench_train.py  # per-GPU numbers at 2 GPUs
    NUM_LAYERS=9 ATTENTION=flash python bench/bench_train.py --profile   # any knob, plus a per-kernel profile

It runs the real training step (same model, optimisers, loader and compile settings as train_gpt.py) on the
shards at DATA_PATH: untimed warm-up steps first (compilation), then `--steps` timed steps. With --profile it also
traces one step and prints where the GPU time goes, by kernel family and by kernel.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor datasheets


def flops_per_token(model: tg.GPT, args: tg.Hyperparameters) -> float:
    """6 x (parameters in matmuls, lm_head included, a recurring block's once per run) + causal attention
    6 x block runs x seq_len x model_dim, at the model's current recurrence depth."""
    kinds, schedule = tg.module_kinds(model), [i for i, _ in model.schedule()]
    runs = collections.Counter(schedule)

    def uses(name: str) -> int:  # how often a parameter's matmul runs per token
        parts = name.split(".")
        return runs[int(parts[1])] if parts[0] == "blocks" else 1

    matmul = sum(p.numel() * uses(n) for n, p in model.named_parameters() if kinds.get(n) in ("int6", "matrix"))
    matmul += model.tok_emb.weight.numel()  # tied lm_head
    return 6 * matmul + 6 * len(schedule) * args.train_seq_len * args.model_dim


def kernel_family(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "matmul")):
        return "matmul"
    if "nccl" in n:
        return "nccl"
    if "triton" in n:
        return "triton (fused elementwise/norm/loss)"
    if n.startswith("_") and n.endswith("_kernel"):  # kernels/ (its GEMM is counted with the matmuls above)
        return "triton (kernels/)"
    return "other"


def profile_step(step_fn, verbose: bool, steps: int = 1, table_path: str | None = None) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
    if not verbose:
        return
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) or 1.0
    families: dict[str, float] = {}
    for e in events:
        families[kernel_family(e.key)] = families.get(kernel_family(e.key), 0.0) + e.self_device_time_total
    print(f"\nGPU time by kernel family ({steps} step(s)):")
    print("| family | ms/step | share |\n|---|---:|---:|")
    for fam, us in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {us / 1000 / steps:.1f} | {100 * us / total:.1f}% |")
    print("\nTop kernels:")
    print("| kernel | calls/step | ms/step | share |\n|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"| {e.key[:90]} | {e.count // steps} | {e.self_device_time_total / 1000 / steps:.2f} | "
              f"{100 * e.self_device_time_total / total:.1f}% |")
    print_idle_gaps([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA], steps)
    if table_path:  # every kernel, full names, as tab-separated family, calls/step, ms/step, name
        rows = sorted(events, key=lambda e: -e.self_device_time_total)
        Path(table_path).write_text("".join(
            f"{kernel_family(e.key)}\t{e.count / steps:g}\t{e.self_device_time_total / 1000 / steps:.3f}\t{e.key}\n"
            for e in rows))


def print_idle_gaps(kernels, steps: int, top: int = 10) -> None:
    """GPU idle time of the traced step(s): the span from the first kernel's start to the last one's end minus
    the time some kernel was running, and the largest gaps with the kernels on either side (host-bound phases
    show up as many gaps around small kernels)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    if not spans:
        return
    busy, gaps, end, prev = 0.0, [], spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, prev, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, prev = stop, name
    span = end - spans[0][0]
    print(f"\nGPU busy {busy / 1000 / steps:.1f} of {span / 1000 / steps:.1f} ms/step; idle {(span - busy) / 1000 / steps:.1f} "
          f"ms/step in {len(gaps) / steps:.0f} gaps (over 5 us: {sum(g > 5 for g, _, _ in gaps) / steps:.0f}, "
          f"{sum(g for g, _, _ in gaps if g > 5) / 1000 / steps:.1f} ms)")
    print("| gap us | after | before |\n|---:|---|---|")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"| {gap:.0f} | {before[:60]} | {after[:60]} |")


def time_steps(step_fn, steps: int, sync_every_step: bool) -> tuple[list[float], list[float]]:
    """GPU ms between consecutive step ends, and the host's ms to queue each step. Queued back to back (as the
    training loop runs) the GPU time is the step's cost while the host keeps ahead, and the host's time includes
    waiting once it is as far ahead as the CUDA queue and the loader's two buffers allow. With sync_every_step the
    host's time is its own work per step, which has to stay below the GPU's for the queued timing to hold."""
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    host = []
    torch.cuda.synchronize()
    ends[0].record()
    for i in range(steps):
        t0 = time.perf_counter()
        step_fn()
        host.append(1000 * (time.perf_counter() - t0))
        ends[i + 1].record()
        if sync_every_step:
            ends[i + 1].synchronize()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(ends, ends[1:])], host


def use_mlp_tiles(keys: str) -> str:
    """Set kernels/mlp.py's forward and backward tiles to bench_gemm.MLP_TILES[FWD] and [BWD] (from "FWD,BWD")."""
    from bench_gemm import MLP_TILES
    from kernels import mlp

    fwd, bwd = keys.split(",")
    for key, entry in (fwd, "gpu"), (bwd, "gpu_bwd"):
        if key not in MLP_TILES:
            sys.exit(f"--mlp-tiles: {key!r} is not one of {', '.join(MLP_TILES)}")
        mlp._TILES[entry] = MLP_TILES[key][1] or mlp._TILES[entry]
    return f"fwd {fwd}, bwd {bwd}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--profile", action="store_true", help="trace one more step and print a kernel table")
    ap.add_argument("--profile-table", help="with --profile: write every kernel's time to this file (TSV)")
    ap.add_argument("--qat", action="store_true", help="time the step with late QAT on")
    ap.add_argument("--passes", type=int, help="recurrence depth of RECUR_LAYERS to time (default: the full depth, "
                    "the run's last phase; 1 = before the first RECUR_AT switch)")
    ap.add_argument("--losses", help="write every step's training loss to this file (one per line)")
    ap.add_argument("--sync-every-step", action="store_true",
                    help="wait for each step before starting the next (train_gpt.py reads a step's loss one step "
                         "late, so its host never drains the GPU's queue; this shows what that hides)")
    ap.add_argument("--expand-kv", action="store_true",
                    help="give every query head its own copy of its KV head before attention (MHA inside the "
                         "compiled graph), to time FA4's backward without its GQA accumulators")
    ap.add_argument("--mlp-tiles", metavar="FWD,BWD",
                    help="kernels/mlp.py's forward and backward GEMMs at these bench_gemm.MLP_TILES keys")
    opts = ap.parse_args()

    rank, world, local_rank, device = tg.setup_distributed()
    if device.type != "cuda":
        sys.exit("bench_train.py measures GPU steps; no CUDA device is visible")
    args = tg.resolve(tg.Hyperparameters.from_env(), world)
    torch.manual_seed(args.seed)
    runtime = tg.prepare_runtime(args, device)
    if opts.expand_kv:
        attention = tg.ATTENTION
        tg.ATTENTION = lambda q, k, v: attention(q, *(x.repeat_interleave(q.size(2) // x.size(2), dim=2)
                                                      for x in (k, v)))
        runtime += " +expand_kv"
    if opts.mlp_tiles:
        runtime += " mlp tiles " + use_mlp_tiles(opts.mlp_tiles)
    autocast = tg.make_autocast(device)
    model, train_model, optimizers, loader = tg.build_training(args, device, rank, world, local_rank)
    model.set_qat(opts.qat)
    if opts.passes is not None:
        if not 1 <= opts.passes <= model.passes:  # a new model runs at the full depth
            sys.exit(f"--passes {opts.passes}: must lie in 1..{model.passes} (the full depth of this config)")
        model.passes = opts.passes

    losses = []

    def step() -> None:
        losses.append(tg.train_step(train_model, loader, optimizers, args, 1.0, 0.95, autocast))

    t0 = time.perf_counter()
    for _ in range(opts.warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times, host = time_steps(step, opts.steps, opts.sync_every_step)
    if world > 1:  # the slowest rank sets the pace
        t = torch.tensor(times, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
    peak = torch.cuda.max_memory_allocated() / 2**30
    ms = statistics.median(times)
    tok_s_gpu = args.train_batch_tokens / world / (ms / 1000)
    gpu = torch.cuda.get_device_name()
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), float("nan"))
    mfu = flops_per_token(model, args) * tok_s_gpu / (peak_tflops * 1e12)
    if rank == 0:
        print(f"device: {world}x{gpu}  torch {torch.__version__}  {runtime}  qat:{int(opts.qat)}  "
              f"passes:{model.passes}")
        print(f"config: layers={args.num_layers} dim={args.model_dim} batch_tokens={args.train_batch_tokens} "
              f"seq={args.train_seq_len} grad_accum={args.grad_accum_steps} world={world}")
        print(f"warm-up ({opts.warmup} steps, compile included): {warm_s:.1f}s")
        print(f"losses (first, last timed): {losses[0].item():.4f} {losses[-1].item():.4f}")
        print(f"timing: {'host synced after every step' if opts.sync_every_step else 'steps queued back to back'}")
        print("| ms/step (median) | ms/step (mean) | host ms/step | tokens/s/GPU | MFU | peak mem GiB |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {ms:.1f} | {statistics.mean(times):.1f} | {statistics.median(host):.1f} | {tok_s_gpu / 1e6:.3f} M | "
              f"{100 * mfu:.1f}% | {peak:.1f} |")
    if opts.losses and rank == 0:
        Path(opts.losses).write_text("".join(f"{loss.item():.6f}\n" for loss in losses))
    if opts.profile:  # every rank steps (collectives), rank 0 reports
        profile_step(step, verbose=rank == 0, table_path=opts.profile_table if rank == 0 else None)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
