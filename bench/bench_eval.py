"""Evaluation and artifact benchmark: sliding-window eval throughput and quantise + compress time.

    python bench/bench_eval.py                      # the default config on the val shards at DATA_PATH
    EVAL_STRIDE=64 EVAL_BATCH_SEQS=64 python bench/bench_eval.py

Runs the real evaluate() of train_gpt.py on a freshly initialised full-size model (the throughput does not depend
on the weights) twice: the first call includes torch.compile, the second is the steady state. Then quantises it
(QUANT_MODE's grid at multiplier 1, round to nearest) and compresses it. Prints a markdown table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main() -> None:
    rank, world, _, device = tg.setup_distributed()
    if device.type != "cuda":
        sys.exit("bench_eval.py measures GPU evaluation; no CUDA device is visible")
    args = tg.resolve(tg.Hyperparameters.from_env(), world)
    runtime = tg.prepare_runtime(args, device)
    autocast = tg.make_autocast(device)
    token_bytes, tokens, _ = tg.load_inputs(args)
    model = tg.GPT(args).to(device).eval()
    fwd = tg.make_window_forward(model, args.eval_stride, args.compile)
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast():
            _, _, n_tok, _ = tg.evaluate(model, fwd, tokens, token_bytes, args.eval_seq_len, args.eval_stride,
                                         args.eval_batch_seqs, rank, world, device)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # the export's quantiser at one multiplier, round to nearest (GPTQ's cost: quant_sweep.py)
    stored = tg.quantize_tensors(model, model.state_dict(), args)
    t_quant = time.perf_counter() - t0
    blob = tg.compress(tg.serialize(stored, tg.model_config(args)), args.compressor)
    t_total = time.perf_counter() - t0
    if rank == 0:
        print(f"device: {world}x{torch.cuda.get_device_name()}  {runtime}  seq {args.eval_seq_len} stride "
              f"{args.eval_stride} batch {args.eval_batch_seqs}")
        print("| tokens scored | first call s (compile incl.) | steady s | tokens/s | quantise s | quantise+compress s |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {n_tok} | {times[0]:.1f} | {times[1]:.2f} | {n_tok / times[1]:,.0f} | {t_quant:.1f} | "
              f"{t_total:.1f} ({len(blob):,} B) |")


if __name__ == "__main__":
    main()
