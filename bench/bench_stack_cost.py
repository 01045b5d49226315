"""What the 1.0611 stack's document attention and TTT cost in work, counted from the data (no GPU needed):

    python bench/bench_stack_cost.py --data data/datasets/qs2                     # sp1024 QS-2
    PRESET=frontier python bench/bench_stack_cost.py --data data/datasets/fineweb10B_sp8192 --val-tokens 62000000

1. DOC_ATTENTION: of the 128x128 blocks of causal attention in training rows of TRAIN_SEQ_LEN, the share FlexAttention
   computes (listed partial or full) and the share it computes without a mask (full), on the first --rows rows of the
   training stream.
2. Evaluation: the sliding window's forward positions, and TTT's (the knobs of the environment, e.g. PRESET=frontier)
   forward and backward positions, each window as wide as train_gpt.py runs it, per validation token.
Multiply a measured time of one by the ratio to project the other (docs/FRONTIER.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def block_shares(rows: torch.Tensor) -> tuple[float, float]:
    """(computed, unmasked) shares of the causal blocks of rows (B, T) under the document block mask."""
    mask = tg.document_block_mask(tg.document_ids(rows))
    n = rows.size(1) // tg.FLEX_BLOCK
    causal = rows.size(0) * n * (n + 1) // 2
    full = int(mask.full_kv_num_blocks.sum())
    return (int(mask.kv_num_blocks.sum()) + full) / causal, full / causal


def sliding_windows(n_targets: int, seq_len: int, stride: int) -> int:
    return 1 + len(tg.window_starts(n_targets, seq_len, stride))


def ttt_positions(tokens: torch.Tensor, args: tg.Hyperparameters) -> tuple[int, int, int]:
    """(windows, forward positions, backward positions) of TTT on the stream, with train_gpt.py's window rule:
    each window runs up to its last scored target, rounded up to 64, and runs backward unless its lane does not
    learn from the chunk (a document's last chunk under reset)."""
    L, s = args.eval_seq_len, args.eval_stride
    windows = forward = backward = 0
    for first, last in tg.document_spans(tokens):
        length = last - first
        for lo in range(0, length, args.ttt_chunk):
            hi = min(lo + args.ttt_chunk, length)
            learns = args.ttt_lr > 0 and not (hi == length and args.ttt_reset and not args.ttt_warm_a)
            for start in range(tg.scoring_window(lo + 1, L, s), tg.scoring_window(hi, L, s) + 1, s):
                width = min(L, -(-(min(hi, start + L) - start) // 64) * 64)
                windows, forward = windows + 1, forward + width
                backward += width if learns else 0
    return windows, forward, backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder of fineweb_train_*.bin and fineweb_val_*.bin shards")
    ap.add_argument("--rows", type=int, default=4096, help="training rows for the block shares")
    ap.add_argument("--val-tokens", type=int, default=0, help="project to a validation set of this many tokens")
    opts = ap.parse_args()
    args = tg.resolve(tg.Hyperparameters.from_env(), 1)
    T = args.train_seq_len
    train = torch.from_numpy(tg.load_shard(sorted(Path(opts.data).glob("fineweb_train_*.bin"))[0]).astype("int64"))
    rows = train[:min(opts.rows, train.numel() // T) * T].view(-1, T)
    computed, unmasked = block_shares(rows)
    docs = int((rows == tg.BOS_ID).sum())
    print(f"training rows: {rows.size(0)} x {T}, {docs} BOS ({rows.numel() / max(docs, 1):.0f} tokens a document)")
    print(f"| causal blocks computed | of them without a mask | skipped |\n|---:|---:|---:|\n"
          f"| {100 * computed:.1f}% | {100 * unmasked:.1f}% | {100 * (1 - computed):.1f}% |")
    val = tg.load_validation_tokens(opts.data, args.vocab_size)
    n = val.numel() - 1
    slide_windows = sliding_windows(n, args.eval_seq_len, args.eval_stride)
    slide = args.eval_seq_len * slide_windows
    windows, fwd, bwd = ttt_positions(val, args)
    scale = opts.val_tokens / n if opts.val_tokens else 1.0
    print(f"\nvalidation: {n:,} targets, {len(tg.document_spans(val)):,} documents"
          + (f" (x{scale:.1f} to {opts.val_tokens:,})" if opts.val_tokens else ""))
    print("| evaluation | windows | forward positions | backward positions | forward per target |")
    print("|---|---:|---:|---:|---:|")
    print(f"| sliding (L {args.eval_seq_len}, stride {args.eval_stride}) | "
          f"{scale * slide_windows:,.0f} | {scale * slide:,.0f} | 0 | "
          f"{slide / n:.1f} |")
    print(f"| TTT (chunk {args.ttt_chunk}, rank {args.ttt_lora_rank}, {args.ttt_lora_targets}) | {scale * windows:,.0f} | "
          f"{scale * fwd:,.0f} | {scale * bwd:,.0f} | {fwd / n:.1f} |")


if __name__ == "__main__":
    main()
