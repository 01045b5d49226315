"""Do two configurations train the same? Loss curves of the first steps against seed-to-seed noise.

    python bench/compare_losses.py --a RESIDUAL_FP32=1 --b RESIDUAL_FP32=0 --steps 200 --seeds 3
    NUM_LAYERS=4 MODEL_DIM=128 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 \\
        python bench/compare_losses.py --a RESIDUAL_FP32=1 --b "" --steps 200 --cpu-bf16   # small, on a CPU

For every seed, each configuration trains `--steps` steps from the same initial weights (seeded) on the same
batches, with train_gpt.py's own model, optimisers, loader and step. The LR schedule runs by step count (no
wallclock), and the first steps see no QAT or weight averaging, so they take no part. Knobs common to both come
from the environment; `--a` / `--b` add comma-separated NAME=value overrides. To compare two versions of the code
rather than two knobs, save one version's curves with `--json` and pass them to the other as `--a-curves FILE`.

It prints, per window of steps, each configuration's mean loss over seeds ± the seeds' standard deviation and the
difference of the means. A speed change that keeps the math should show differences inside the noise: this
prints `within_noise:1` when every window's |difference| is at most 2 x the larger seed std of that window
(two single runs of one configuration differ by sqrt(2) x std on average).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def parse_overrides(text: str) -> dict[str, str]:
    out = {}
    # split at the commas that start another NAME=, so a value may hold commas (FUSED_KERNELS=mlp,qkv)
    for item in filter(None, (s.strip() for s in re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*=)", text))):
        name, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"compare_losses.py: {item!r} is not NAME=value")
        out[name.strip().upper()] = value.strip()
    return out


def train_curve(overrides: dict[str, str], seed: int, steps: int, device: torch.device, autocast) -> list[float]:
    env = dict(os.environ, **overrides, SEED=str(seed), MAX_WALLCLOCK_SECONDS="0", ITERATIONS=str(steps))
    args = tg.resolve(tg.Hyperparameters.from_env(env), 1)
    tg.prepare_runtime(args, device)
    torch._dynamo.reset()  # each run compiles its own model: keep earlier runs' graphs out of the recompile limit
    torch.manual_seed(args.seed)
    model, train_model, optimizers, loader = tg.build_training(args, device, 0, 1, 0)
    losses = []
    for step in range(steps):
        scale = tg.lr_scale(step, 0.0, args)
        losses.append(tg.train_step(train_model, loader, optimizers, args, scale, tg.muon_momentum(step, args),
                                    autocast))
    return [float(x) for x in torch.stack(losses).tolist()]


def window_stats(curves: list[list[float]], lo: int, hi: int) -> tuple[float, float]:
    means = [statistics.fmean(c[lo:hi]) for c in curves]
    return statistics.fmean(means), statistics.stdev(means) if len(means) > 1 else float("nan")


def saved_curves(spec: str, seeds: int, steps: int) -> tuple[dict, list[list[float]]]:
    """One configuration of an earlier run's --json file, spec "FILE[:NAME]" (NAME defaults to B): its overrides
    (with where they came from) and its curves cut to `seeds` x `steps`."""
    path, _, name = spec.partition(":")
    name = name or "B"
    try:
        saved = json.loads(Path(path).read_text())
        held, held_configs = saved["curves"], saved["configs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a file of compare_losses.py --json ({type(e).__name__}: {e})") from None
    if name not in held:
        raise ValueError(f"{path} holds configurations {sorted(held)}, not {name!r}")
    kept = held[name][:seeds]
    if len(kept) < seeds or any(len(c) < steps for c in kept):
        raise ValueError(f"{path}:{name} has fewer than {seeds} seeds of {steps} steps")
    return {"curves_from": f"{path}:{name}", **held_configs.get(name, {})}, [c[:steps] for c in kept]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="", help="overrides of configuration A (e.g. RESIDUAL_FP32=1)")
    ap.add_argument("--b", default="", help="overrides of configuration B")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1337, 1338, ...")
    ap.add_argument("--window", type=int, default=20, help="steps per row of the table")
    ap.add_argument("--cpu-bf16", action="store_true", help="on a CPU, run under bf16 autocast as CUDA does")
    ap.add_argument("--json", help="write every curve to this file")
    ap.add_argument("--a-curves", metavar="FILE[:NAME]",
                    help="take A's curves from an earlier run's --json file (its configuration NAME, default B) "
                         "instead of training A: same seeds and steps, e.g. the code before a change")
    opts = ap.parse_args()
    if opts.seeds < 2:
        ap.error("--seeds must be at least 2: the noise is the spread over seeds")
    if opts.a_curves and opts.a:
        ap.error("--a and --a-curves both describe configuration A: give one of them")
    configs = {"A": parse_overrides(opts.a), "B": parse_overrides(opts.b)}
    curves = {name: [] for name in configs}
    if opts.a_curves:
        try:
            configs["A"], curves["A"] = saved_curves(opts.a_curves, opts.seeds, opts.steps)
        except ValueError as e:
            ap.error(f"--a-curves: {e}")

    _, _, _, device = tg.setup_distributed()
    autocast = tg.make_autocast(device)
    if device.type == "cpu" and opts.cpu_bf16:
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    for i in range(opts.seeds):
        for name, overrides in configs.items():
            if len(curves[name]) > i:  # loaded with --a-curves
                continue
            curves[name].append(train_curve(overrides, 1337 + i, opts.steps, device, autocast))
            last = curves[name][-1]
            print(f"seed:{1337 + i} config:{name} first_loss:{last[0]:.4f} last_loss:{last[-1]:.4f}", flush=True)
            if opts.json:  # after every run, so a run cut short by a time limit keeps the curves it finished
                Path(opts.json).write_text(json.dumps({"configs": configs, "curves": curves}))

    print(f"\ndevice:{device.type} autocast_bf16:{int(device.type == 'cuda' or opts.cpu_bf16)} "
          f"A:{configs['A'] or '{}'} B:{configs['B'] or '{}'} seeds:{opts.seeds}")
    print("| steps | A mean ± std | B mean ± std | B − A | 2 × max std |\n|---|---:|---:|---:|---:|")
    worst = 0.0
    for lo in range(0, opts.steps, opts.window):
        hi = min(lo + opts.window, opts.steps)
        (ma, sa), (mb, sb) = window_stats(curves["A"], lo, hi), window_stats(curves["B"], lo, hi)
        bound = 2 * max(sa, sb)
        diff = abs(mb - ma)
        worst = max(worst, diff / bound if bound > 0 else (math.inf if diff else 0.0))
        print(f"| {lo + 1}–{hi} | {ma:.4f} ± {sa:.4f} | {mb:.4f} ± {sb:.4f} | {mb - ma:+.4f} | {bound:.4f} |")
    print(f"worst |B − A| / (2 × max std): {worst:.2f}  within_noise:{int(worst <= 1)}")


if __name__ == "__main__":
    main()
