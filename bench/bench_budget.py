"""Does the default export of a full-size model fit ARTIFACT_LIMIT, and at which SDClip multiplier? CPU, round to
nearest (GPTQ_ENABLED=0: sampling its calibration text from a full-size model is out of reach of a CPU).

    python bench/bench_budget.py VOCAB_SIZE=8192 [EMBED_BITS=7 ...] [--out DIR]   # knobs as NAME=value

For each weight kind (the untrained initialisation; dense random weights, N(0, 0.03^2) on half the linear layers
and 0.03 * Student-t(3) on the other half, with N(0, 0.05^2) embedding tables) one line: parameters, the search's
tries, the chosen multiplier, total bytes with the code of a CUDA default run, and the bytes left unused. The
embeddings' steps follow the multiplier only down (docs/QUANT.md), so a bigger table mostly costs the matrices a
coarser step. --out DIR writes each kind's artifact as DIR/<kind>.ptz (for bench/bench_compress.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def dense_random(model: tg.GPT) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        linears = [m for m in model.modules() if isinstance(m, tg.CastedLinear)]
        for i, m in enumerate(linears):
            w = torch.randn(m.weight.shape, generator=g) if i % 2 else \
                torch.distributions.StudentT(3.0).sample(m.weight.shape)
            m.weight.copy_(0.03 * w)
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 0.05, generator=g)


def main(argv: list[str]) -> None:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    env = dict(k.split("=", 1) for k in argv if "=" in k)
    env.setdefault("GPTQ_ENABLED", "0")
    args = tg.resolve(tg.Hyperparameters.from_env(env), 1)
    tg.use_fused_kernels(args.fused_kernels)  # their code counts as in a CUDA run
    code_bytes = len(tg.submission_code()[1])
    print(f"knobs: {env} code_bytes: {code_bytes}")
    for kind in ("untrained", "dense"):
        torch.manual_seed(args.seed)
        model = tg.GPT(args)
        if kind == "dense":
            dense_random(model)
        lines: list[str] = []
        t0 = time.time()
        blob, _ = tg.export_artifact(model, args, code_bytes, None, None, 0, 1, lines.append)
        tries = sum(ln.startswith("quant_budget: try:") for ln in lines)
        params = sum(p.numel() for p in model.parameters())
        print(f"{kind}: params {params:,} tries {tries} | {lines[-1]} | total {len(blob) + code_bytes:,} "
              f"unused {args.artifact_limit - len(blob) - code_bytes:,} ({time.time() - t0:.0f} s)")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{kind}.ptz").write_bytes(blob)


if __name__ == "__main__":
    main(sys.argv[1:])
