"""Causal GQA attention backends at the model's shapes: correctness against a float32 reference, then speed.

    python bench/bench_attention.py                  # GPU: B=48 (per-GPU micro-batch), T=2048, 8 q / 4 kv heads, dim 64
    python bench/bench_attention.py --batch 16 --iters 20 --json attention.json
    python bench/bench_attention.py --cpu-smoke      # CPU, tiny shapes: the script's own logic, no GPU backends

Backends (each takes q, k, v as (batch, seq, heads, head_dim) bf16, as the model's attention does; k and v have
the model's 4 KV heads):
  sdpa-math       F.scaled_dot_product_attention, math backend, bf16: the bf16 yardstick of the correctness check
  cudnn / flash   SDPA on that backend only, native GQA (enable_gqa=True); `+repeat_kv` gives every query head its
                  own copy of its KV head first (what train_gpt.py falls back to where native GQA fails)
  fa4             FlashAttention-4 (pip flash-attn-4, import flash_attn.cute), flash_attn_func(q, k, v, causal=True)
  fa4[op]         FA4's forward and backward wrapped as torch.library custom ops (register_fake + register_autograd),
                  so that torch.compile sees one opaque call each way instead of tracing the CuTe DSL
  cudnn_fa4[op]   cuDNN's forward (with its log-sum-exp) before FA4's backward, as custom ops
  fa4_*[op]       FA4 with one SM90 forward choice changed (tile, GQA packing); fa4[op]+repeat_kv:
                  FA4 on KV heads repeated to every query head (fa4_variants)
  reference[op]   the same custom-op wrapper around the torch twin below (fp32 inside): checks the wrapper itself,
                  also on CPU
  ...+compile     the backend inside torch.compile(fullgraph=True); `fa4+compile` compiles FA4's own autograd.Function
                  directly (does it trace?), `fa4[op]+compile` the custom-op wrapper
A line per backend is printed as it finishes (with the seconds it took: FA4's first call includes its JIT compile),
then the table.

Correctness (at --check-batch, default 4, same T and heads): out, dq, dk, dv of each backend against float32
attention computed from the same bf16 inputs (autograd for the gradients). The figure per tensor is the relative L2
error ||x - ref|| / ||ref||; a backend passes when every tensor is within 3x the bf16 math backend's error + 1e-3
(the math backend's own error is what bf16 inputs and outputs cost at this length; a flash-style kernel keeps its
softmax in fp32 and usually lands below it). Custom ops also go through torch.library.opcheck.

Speed (at --batch): median of --iters CUDA-event timings after --warmup calls, inputs requiring grad as in training.
"fwd" is the forward alone, "fwd+bwd" the forward and backward of out.backward(dout). TFLOP/s counts causal
attention as 2 * B * H * T^2 * D for the forward (half the square) and 3.5 times that for forward + backward.
A backend that does not import or fails its first call is skipped with the reason printed; nothing else stops the run.
"""

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402 - the custom-op wrapper and the SDPA call train_gpt.py trains with

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


# -----------------------------------------------------------------------------
# float32 reference and its hand-written backward (the torch twin of FA4's (out, lse) interface)

def expand_kv(x: Tensor, heads: int) -> Tensor:
    return x.repeat_interleave(heads // x.size(2), dim=2)


def reference_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention in fp32. Returns out (B, T, H, D) in q's dtype and the log-sum-exp (B, H, T) in fp32."""
    heads = q.size(2)
    qf, kf, vf = q.float(), expand_kv(k, heads).float(), expand_kv(v, heads).float()
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) * scale
    t = q.size(1)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhts,bshd->bthd", torch.exp(scores - lse[..., None]), vf)
    return out.to(q.dtype).contiguous(), lse.contiguous()  # FA4's layouts: (B, T, H, D) and (B, H, T)


def reference_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of causal attention from the saved out and lse, in fp32 (as a flash backward computes them)."""
    heads, kv_heads, t = q.size(2), k.size(2), q.size(1)
    qf, kf, vf = q.float(), expand_kv(k, heads).float(), expand_kv(v, heads).float()
    do, of = dout.float(), out.float()
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) * scale
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.exp(scores - lse[..., None])
    dv = torch.einsum("bhts,bthd->bshd", p, do)
    dp = torch.einsum("bthd,bshd->bhts", do, vf)
    delta = (do * of).sum(-1).transpose(1, 2)  # (B, H, T): rowsum(dO * O)
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhts,bshd->bthd", ds, kf)
    dk = torch.einsum("bhts,bthd->bshd", ds, qf)

    def per_kv_head(g: Tensor) -> Tensor:  # sum the gradient of each group of query heads into its KV head
        b, s, _, d = g.shape
        return g.reshape(b, s, kv_heads, heads // kv_heads, d).sum(3)

    return (dq.to(q.dtype).contiguous(), per_kv_head(dk).to(k.dtype).contiguous(),
            per_kv_head(dv).to(v.dtype).contiguous())


# -----------------------------------------------------------------------------
# backends

sdpa, sdpa_repeat_kv = tg.sdpa_attention, tg.sdpa_attention_repeat_kv


def import_fa4():
    """FA4's public entry point (the custom op train_gpt.fa4_attention imports its interface when first called)."""
    import flash_attn.cute as fa4
    from flash_attn.cute import interface  # noqa: F401 - fail here, with the reason, rather than inside the op

    return fa4


def fa4_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels",
                 "apache-tvm-ffi", "cuda-bindings"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} -")
    return ", ".join(parts)


def cudnn_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """cuDNN's causal forward (SDPA's kernel, native GQA) with its log-sum-exp, in FA's layouts, for FA4's backward:
    at head dim 64 cuDNN has the faster forward and FA4 the faster backward. Both keep the natural-log LSE of the
    same scaled scores."""
    b, t, h, _ = q.shape
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, True, False, scale=scale)[:2]
    return out.transpose(1, 2).contiguous(), lse.reshape(b, h, t).contiguous()


def fa4_variants() -> list["Backend"]:
    """FA4 changed one way at a time, to see whether its defaults suit this shape: cuDNN's forward before FA4's
    backward; the forward's 192 x 128 tile (128 x 128 here) and query-head packing for GQA (off here); every query
    head given its own KV head (MHA, where FA4's backward stores dk, dv directly instead of through zeroed fp32
    accumulators and a conversion pass). Custom ops, timed beside fa4[op]. (The backward's own pack_gqa argument is
    not among them: 4.0.0b36 overrides it to False.)"""
    from flash_attn.cute.interface import _flash_attn_fwd

    def fwd_with(**kw):
        def fwd(q, k, v, scale):
            return _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True, **kw)[:2]
        return fwd

    def fa4_mha(q, k, v):
        return tg.fa4_attention(q, expand_kv(k, q.size(2)), expand_kv(v, q.size(2)))

    variants = {"cudnn_fa4": (cudnn_forward, tg.fa4_backward),
                "fa4_fwd_tile128": (fwd_with(tile_mn=(128, 128)), tg.fa4_backward),
                "fa4_fwd_nopack": (fwd_with(pack_gqa=False), tg.fa4_backward)}
    ops = {name: tg.attention_custom_op(name, fwd, bwd) for name, (fwd, bwd) in variants.items()}
    # opcheck only the hybrid: the tiling variants are fa4[op]'s wrapper again, and each opcheck JIT-compiles FA4
    backends = [Backend(f"{name}[op]", op, ops=op.ops if name == "cudnn_fa4" else ()) for name, op in ops.items()]
    backends.append(Backend("cudnn_fa4[op]+compile", ops["cudnn_fa4"], compile=True))
    # under compile the expansion and its backward (a sum over each KV head's queries) fuse as in training
    backends += [Backend("fa4[op]+repeat_kv", fa4_mha), Backend("fa4[op]+repeat_kv+compile", fa4_mha, compile=True)]
    return backends


@dataclass
class Backend:
    name: str
    fn: Attention
    sdpa: str | None = None  # the one SDPA backend to enable, if any
    compile: bool = False
    ops: tuple = ()  # custom ops to opcheck
    yardstick: bool = False  # materialises the scores: checked, timed only on CPU, never "fastest"
    result: dict = field(default_factory=dict)


def build_backends(device: torch.device, wanted: set[str] | None) -> tuple[list[Backend], list[tuple[str, str]]]:
    backends, skipped = [], []
    ref_op = tg.attention_custom_op("reference", reference_forward, reference_backward)
    backends.append(Backend("sdpa-math", sdpa, sdpa="math", yardstick=True))
    backends.append(Backend("reference[op]", ref_op, ops=ref_op.ops, yardstick=True))
    backends.append(Backend("reference[op]+compile", ref_op, compile=True, yardstick=True))
    if device.type == "cpu":
        backends.append(Backend("sdpa", sdpa))
        backends.append(Backend("sdpa+compile", sdpa, compile=True))
        skipped += [(n, "CPU run (--cpu-smoke)") for n in ("cudnn", "flash", "fa4")]
    else:
        for name in ("cudnn", "flash"):
            backends.append(Backend(name, sdpa, sdpa=name))
            backends.append(Backend(f"{name}+repeat_kv", sdpa_repeat_kv, sdpa=name))
            backends.append(Backend(f"{name}+compile", sdpa, sdpa=name, compile=True))
        try:
            fa4 = import_fa4()
        except Exception as e:  # noqa: BLE001 - not installed / does not import: say why, go on
            skipped.append(("fa4*", f"import flash_attn.cute failed: {type(e).__name__}: {first_line(e)}"))
        else:
            def fa4_plain(q, k, v):
                return fa4.flash_attn_func(q, k, v, causal=True)[0]

            fa4_op = tg.fa4_attention  # the custom ops ATTENTION=fa4 trains with
            backends += [Backend("fa4", fa4_plain), Backend("fa4[op]", fa4_op, ops=fa4_op.ops),
                         Backend("fa4[op]+compile", fa4_op, compile=True)]
            backends += fa4_variants()
            # fa4+compile last: dynamo tracing into the CuTe DSL may take long before it gives up
            backends.append(Backend("fa4+compile", fa4_plain, compile=True))
    if wanted:
        backends = [b for b in backends if b.name in wanted or b.name == "sdpa-math"]
    return backends, skipped


# -----------------------------------------------------------------------------
# correctness

def make_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_()

    q = rand(batch, seq, heads, head_dim)
    k, v = rand(batch, seq, kv_heads, head_dim), rand(batch, seq, kv_heads, head_dim)
    dout = torch.randn(batch, seq, heads, head_dim, generator=g).to(device=device, dtype=torch.bfloat16)
    return q, k, v, dout


def run_once(fn: Attention, q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> list[Tensor]:
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def fp32_reference(q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> list[Tensor]:
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = reference_forward(qf, kf, vf, 1.0 / math.sqrt(q.size(-1)))[0]
    out.backward(dout.float())
    return [out.detach(), qf.grad, kf.grad, vf.grad]


def rel_errors(got: list[Tensor], ref: list[Tensor]) -> list[float]:
    errs = []
    for g, r in zip(got, ref, strict=True):
        if g is None or g.shape != r.shape:
            errs.append(float("nan"))
            continue
        errs.append(((g.float() - r).norm() / r.norm().clamp_min(1e-30)).item())
    return errs


def prepared(b: Backend, cuda: bool) -> Attention:
    """The callable to run for b, with its SDPA backend switched on. Several backends compile the same Python function
    (sdpa, the custom-op wrapper), so dynamo's cache, which lives on the function's code, is reset for each."""
    if cuda:
        tg.only_sdpa(b.sdpa)
    if not b.compile:
        return b.fn
    torch._dynamo.reset()
    return torch.compile(b.fn, fullgraph=True, dynamic=False)


def check(b: Backend, fn: Attention, inputs, ref: list[Tensor]) -> None:
    """Errors of out, dq, dk, dv against the fp32 reference (and opcheck for custom ops) into b.result."""
    got = run_once(fn, *inputs)
    b.result["err"] = rel_errors(got, ref)
    if b.ops:
        b.result["opcheck"] = opcheck(b.ops, *inputs)


def progress(b: Backend, seconds: float) -> None:
    """One line per backend as it finishes, so a run cut short by a time limit still says what it found."""
    r = b.result
    errs = " / ".join(f"{e:.1e}" for e in r.get("err", []))
    times = f"fwd {fmt(r.get('fwd_ms'))} ms, fwd+bwd {fmt(r.get('fwd_bwd_ms'))} ms" if "fwd_ms" in r else "not timed"
    print(f"[{seconds:5.1f} s] {b.name}: rel err {errs or '-'}; {times}", flush=True)


def judge(backends: list[Backend]) -> None:
    """ok: every tensor within 3x the bf16 math backend's relative error + 1e-3, and opcheck passed."""
    base = next((b.result["err"] for b in backends if b.name == "sdpa-math"), None)
    for b in backends:
        b.result["ok"] = base is not None and b.result.get("opcheck", "ok") == "ok" and all(
            math.isfinite(e) and e <= 3 * be + 1e-3 for e, be in zip(b.result["err"], base, strict=True))


def opcheck(ops: tuple, q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> str:
    """torch.library.opcheck on the forward and backward op (schema, fake tensors, autograd registration)."""
    op_fwd, op_bwd = ops
    scale = 1.0 / math.sqrt(q.size(-1))
    small = [t[:1, :128].detach().clone().requires_grad_(t.requires_grad) for t in (q, k, v, dout)]
    try:
        torch.library.opcheck(op_fwd, (*small[:3], scale))
        with torch.no_grad():
            out, lse = op_fwd(*small[:3], scale)
        torch.library.opcheck(op_bwd, (small[3], *(t.detach() for t in small[:3]), out, lse, scale))
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {first_line(e)}"
    return "ok"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


# -----------------------------------------------------------------------------
# speed

def median_ms(step: Callable[[], None], warmup: int, iters: int, cuda: bool) -> float:
    for _ in range(warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_backend(b: Backend, fn: Attention, inputs, warmup: int, iters: int) -> None:
    q, k, v, dout = inputs

    def fwd():
        fn(q, k, v)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    b.result["fwd_ms"] = median_ms(fwd, warmup, iters, q.is_cuda)
    b.result["fwd_bwd_ms"] = median_ms(fwd_bwd, warmup, iters, q.is_cuda)


def run_all(backends: list[Backend], check_inputs, time_inputs, warmup: int, iters: int,
            skipped: list[tuple[str, str]], verbose: bool) -> list[Backend]:
    """Check, then time, one backend at a time; returns those whose first call worked."""
    cuda = check_inputs[0].is_cuda
    ref = fp32_reference(*check_inputs)
    kept = []
    for b in backends:
        stage, t0 = "first call", time.perf_counter()
        try:
            fn = prepared(b, cuda)
            check(b, fn, check_inputs, ref)
            kept.append(b)
            if cuda and b.yardstick:
                continue  # correctness only: their B x H x T x T fp32 scores do not belong in a speed table
            stage = "timing"
            time_backend(b, fn, time_inputs, warmup, iters)
        except Exception as e:  # noqa: BLE001 - a backend that fails is reported, the others still run
            skipped.append((b.name, f"{stage} failed: {type(e).__name__}: {first_line(e)}"))
            if verbose:
                traceback.print_exc()
        finally:
            if cuda:
                tg.only_sdpa(None)
                torch.cuda.empty_cache()
        progress(b, time.perf_counter() - t0)
    judge(kept)
    return kept


# -----------------------------------------------------------------------------
# report

def table(backends: list[Backend], shape: tuple[int, ...], check_batch: int) -> str:
    b_, t, h, _, d = shape
    fwd_flops = 2 * b_ * h * t * t * d
    rows = [f"attention, causal, bf16: B={b_} T={t} H={h} KV heads={shape[3]} D={d} (correctness at B={check_batch})",
            "",
            "| backend | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | rel err out / dq / dk / dv | ok |",
            "|---|---|---|---|---|---|---|"]
    for b in backends:
        r = b.result
        f, fb = r.get("fwd_ms"), r.get("fwd_bwd_ms")
        errs = " / ".join(f"{e:.1e}" for e in r["err"])
        note = "" if r.get("opcheck", "ok") == "ok" else f" (opcheck: {r['opcheck']})"
        rows.append(f"| {b.name} | {fmt(f)} | {fmt(fb)} | {fmt(f and fwd_flops / f / 1e9)} | "
                    f"{fmt(fb and 3.5 * fwd_flops / fb / 1e9)} | {errs} | {'yes' if r['ok'] else 'NO'}{note} |")
    return "\n".join(rows)


def fmt(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def environment(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts += [torch.cuda.get_device_name(device), f"CUDA {torch.version.cuda}",
                  f"cuDNN {torch.backends.cudnn.version()}"]
    parts.append(fa4_versions())
    return "; ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=48, help="sequences per call for the timings (per-GPU micro-batch)")
    p.add_argument("--check-batch", type=int, default=4, help="sequences for the correctness check")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--backends", default="", help="comma-separated names to run (default: all)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks this script, no GPU backends")
    p.add_argument("-v", action="store_true", help="print tracebacks of failing backends")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.batch, a.check_batch, a.seq, a.heads, a.kv_heads, a.head_dim, a.warmup, a.iters = 2, 2, 64, 4, 2, 16, 1, 3
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU check of this script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.cpu_smoke else "cuda")
    print(environment(device))
    wanted = {n.strip() for n in a.backends.split(",") if n.strip()} or None
    backends, skipped = build_backends(device, wanted)
    shape = (a.batch, a.seq, a.heads, a.kv_heads, a.head_dim)
    check_inputs = make_inputs(a.check_batch, *shape[1:], device, seed=0)
    checked = run_all(backends, check_inputs, make_inputs(*shape, device, seed=1), a.warmup, a.iters, skipped, a.v)
    print(table(checked, shape, a.check_batch))
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    timed = [b for b in checked if b.result["ok"] and b.result.get("fwd_bwd_ms") and b.compile and not b.yardstick]
    if timed:
        best = min(timed, key=lambda b: b.result["fwd_bwd_ms"])
        print(f"fastest correct fwd+bwd under torch.compile: {best.name} ({best.result['fwd_bwd_ms']:.3f} ms)")
    if a.json:
        rows = {b.name: b.result for b in checked}
        with open(a.json, "w") as f:
            json.dump({"shape": shape, "environment": environment(device), "results": rows,
                       "skipped": dict(skipped)}, f, indent=1)
    return 0 if all(b.result["ok"] for b in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
