#!/usr/bin/env python3
"""The shards of the QS-2 quality protocol (SPEC.md §7) in any tokenizer: english_mix (already shuffled), every
document but the last 400 -> train, the last 400 -> val; the 200 FineWeb documents -> OUT_DIR/fw/ as a second val
set (its train shard a link to the same train shard). BOS before every document, no EOS, one shard per split.

    python data/build_qs2.py OUT_DIR                                                   # sp1024, as ../shared/tools
    python data/build_qs2.py OUT_DIR --tokenizer ../shared/data/tokenizers/fineweb_8192_bpe.model    # sp8192

With sp1024 the counts are those of ../shared/tools/build_qs2.py (train 8,673,806, val 572,876, fw 628,457 tokens).
Train with DATA_PATH=OUT_DIR TOKENIZER_PATH=<the tokenizer> VOCAB_SIZE=<its size>; OUT_DIR/tokenizer.model is a copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

import build_shards

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL_DOCS = 400


def encode(sp, docs: list[str]) -> np.ndarray:
    return np.array([t for ids in sp.encode(docs) for t in [build_shards.BOS_ID] + ids], dtype=np.uint16)


def build(out: Path, tokenizer: Path, mix: list[str], fineweb: list[str], val_docs: int = VAL_DOCS) -> dict:
    """Writes the shards; returns {shard path relative to out: tokens}."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    (out / "fw").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, out / build_shards.TOKENIZER_FILE)
    counts = {}
    for name, docs in (("fineweb_train_000000.bin", mix[:-val_docs]), ("fineweb_val_000000.bin", mix[-val_docs:]),
                       ("fw/fineweb_val_000000.bin", fineweb)):
        counts[name] = build_shards.write_shard(out / name, encode(sp, docs))
    link = out / "fw" / "fineweb_train_000000.bin"
    if not link.exists():
        os.symlink("../fineweb_train_000000.bin", link)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "fineweb_1024_bpe.model")
    p.add_argument("--data", type=Path, default=SHARED, help="folder with english_mix/ and fineweb_docs/")
    a = p.parse_args()
    with build_shards.open_text(a.data / "english_mix" / "english_mix.jsonl.zst", ".zst", "\n") as f:
        mix = [json.loads(line)["text"] for line in f if line.strip()]
    with open(a.data / "fineweb_docs" / "fineweb_200docs.jsonl", encoding="utf-8") as f:
        fineweb = [json.loads(line)["text"] for line in f if line.strip()]
    for name, n in build(a.out, a.tokenizer, mix, fineweb).items():
        print(f"{a.out / name}: {n:,} tokens, {(a.out / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
