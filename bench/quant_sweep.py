"""Rate-distortion table of the export quantisers on one set of trained weights.

    SAVE_WEIGHTS=1 python train_gpt.py ...            # writes logs/<RUN_ID>.weights.pt beside the run's artifact
    python bench/quant_sweep.py logs/<RUN_ID>.weights.pt [--out table.md] [--keep DIR]

On the same weights, for each quantiser: model + code bytes (the real compressor) and val_bpb after the round trip
(plain windows of TRAIN_SEQ_LEN and the sliding-window eval), against the weights before quantisation. The
variants: the card's quantiser exactly (QUANT_MODE=card GPTQ_ENABLED=0), the project's GPTQ-lite without the floor
(lite), SDClip by round to nearest and by full GPTQ at fixed multipliers, the budget-targeted default at
ARTIFACT_LIMIT, GPTQ+SDClip fitted to the card's byte count, and the default with EMBED_BITS=8 or LQER. Knobs
(DATA_PATH, TOKENIZER_PATH, GPTQ_CALIB_*, EVAL_*, COMPRESSOR, ARTIFACT_LIMIT) are read as train_gpt.py reads them;
the network is the checkpoint's. GPTQ's calibration text is sampled once and shared by every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FIXED_MULTIPLIERS = (0.35, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, help="a .weights.pt written by SAVE_WEIGHTS=1")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--keep", type=Path, help="write each variant's artifact (.ptz) into this folder")
    parser.add_argument("--only", default="", help="comma list of variant names to run (default: all)")
    opts = parser.parse_args()
    saved = torch.load(opts.weights, map_location="cpu", weights_only=True)
    _, _, _, device = tg.setup_distributed()
    base = tg.Hyperparameters.from_env()
    base = tg.resolve(dataclasses.replace(base, **{k.lower(): v for k, v in saved["config"].items()}), 1)
    runtime = tg.prepare_runtime(base, device)
    autocast = tg.make_autocast(device)
    compile_on = base.compile and device.type == "cuda"
    token_bytes, val, _ = tg.load_inputs(base)
    code_bytes = len(tg.submission_code()[1])

    model = tg.GPT(base).to(device)
    model.load_state_dict(saved["state"])
    state = model.state_dict()
    scored = tg.GPT(base).to(device).eval()
    windows = {stride: tg.make_window_forward(scored, stride, compile_on) for stride in {base.train_seq_len, base.eval_stride}}
    plain_batch = max(1, base.val_batch_tokens // base.train_seq_len)

    def score(weights: dict) -> tuple[float, float]:
        scored.load_state_dict(weights)
        with autocast():
            plain = tg.evaluate(scored, windows[base.train_seq_len], val, token_bytes, base.train_seq_len,
                                base.train_seq_len, plain_batch, 0, 1, device)[1]
            sliding = tg.evaluate(scored, windows[base.eval_stride], val, token_bytes, base.eval_seq_len,
                                  base.eval_stride, base.eval_batch_seqs, 0, 1, device)[1]
        return plain, sliding

    pre = score(state)
    t0 = time.perf_counter()
    seqs = tg.calibration_sequences(model, base, None, 0, 1, autocast)
    t1 = time.perf_counter()
    hessians, factors = tg.gptq_factors(model, seqs, base, 1, autocast)
    t2 = time.perf_counter()
    print(f"{runtime}; calibration {base.gptq_calib_seqs}x{base.gptq_calib_len} sampled in {t1 - t0:.1f} s, "
          f"Hessians + factors in {t2 - t1:.1f} s; pre-quant val_bpb plain {pre[0]:.4f} sliding {pre[1]:.4f}",
          flush=True)

    rows = []
    card_bytes = None

    def run(name: str, multiplier: float | None, gptq: bool, **knobs) -> None:
        """multiplier None: the budget search at ARTIFACT_LIMIT (or at knobs' artifact_limit)."""
        nonlocal card_bytes
        if opts.only and name not in opts.only.split(","):
            return
        args = dataclasses.replace(base, **knobs)
        t = time.perf_counter()
        chosen = factors
        if gptq and args.gptq_act_order != base.gptq_act_order:  # the factors depend on the column order
            chosen = tg.factors_of(hessians, args)
        lines: list[str] = []
        if multiplier is None and args.quant_mode != "sdclip":
            multiplier = 1.0
        if multiplier is None:
            blob, stored = tg.export_artifact(model, args, code_bytes, hessians if gptq else None,
                                              chosen if gptq else None, 0, 1, lines.append)
            multiplier = float(lines[-1].split("multiplier:")[1].split()[0])
        else:
            stored = tg.quantize_tensors(model, state, args, multiplier, chosen if gptq else None)
            if args.lqer_rank:
                tg.add_low_rank_corrections(stored, state, hessians, args.lqer_rank, args.lqer_top)
            blob = tg.compress(tg.serialize(tg.sorted_hidden_units(stored), tg.model_config(args)), args.compressor)
        seconds = time.perf_counter() - t
        plain, sliding = score(tg.dequantize_state(stored))
        total = len(blob) + code_bytes
        if name == "card":
            card_bytes = total
        if opts.keep:
            opts.keep.mkdir(parents=True, exist_ok=True)
            (opts.keep / f"{name}.ptz").write_bytes(blob)
        rows.append((name, "" if args.quant_mode != "sdclip" else f"{multiplier:.4f}", total, plain, sliding, seconds))
        print(f"| {name} | {rows[-1][1]} | {total:,} | {plain:.4f} | {plain - pre[0]:+.4f} | {sliding:.4f} | "
              f"{sliding - pre[1]:+.4f} | {seconds:.1f} |", flush=True)

    print("| quantiser | SDClip multiplier | bytes (model + code) | roundtrip bpb | gap | sliding bpb | gap | "
          "quantise + compress s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    run("card", None, False, quant_mode="card", gptq_enabled=False)
    run("lite", None, False, quant_mode="lite", gptq_enabled=False)
    for m in FIXED_MULTIPLIERS:
        run(f"sdclip_rtn_m{m}", m, False, gptq_enabled=False)
        run(f"sdclip_gptq_m{m}", m, True)
    run("default_budget", None, True)
    if card_bytes is not None:
        run("gptq_at_card_bytes", None, True, artifact_limit=card_bytes)
    run("budget_embed_int8", None, True, embed_bits=8)
    run("budget_lqer_r4_top3", None, True, lqer_rank=4, lqer_top=3)
    run("budget_act_order", None, True, gptq_act_order=True)
    if opts.out:
        opts.out.write_text("\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows) + "\n")


if __name__ == "__main__":
    main()
