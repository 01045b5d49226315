#!/usr/bin/env python3
"""The shards of the QS-2 quality protocol (SPEC.md §7) in any tokenizer: english_mix (already shuffled), every
document but the last 400 -> train, the last 400 -> val; the 200 FineWeb documents -> OUT_DIR/fw/ as a second val
set (its train shard a link to the same train shard). BOS before every document, no EOS, one shard per split.

    python data/build_qs2.py OUT_DIR                                                   # sp1024, as ../shared/tools
    python data/build_qs2.py OUT_DIR --tokenizer ../shared/data/tokenizers/fineweb_8192_bpe.model    # sp8192

With sp1024 the counts are those of ../shared/tools/build_qs2.py (train 8,673,806, val 572,876, fw 628,457 tokens).
Train with DATA_PATH=OUT_DIR TOKENIZER_PATH=<the tokenizer> VOCAB_SIZE=<its size>; OUT_DIR/tokenizer.model is a copy.
OUT_DIR and OUT_DIR/fw each get a manifest.json in build_shards.py's format. The build is written beside OUT_DIR and
renamed into place at the end, as build_shards.py's: an interrupted or failed one leaves nothing at OUT_DIR.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

import build_shards
from build_shards import BuildError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL_DOCS = 400


def encode(sp, docs: list[str]) -> np.ndarray:
    return np.array([t for ids in sp.encode(docs) for t in [build_shards.BOS_ID] + ids], dtype=np.uint16)


def build(out: Path, tokenizer: Path, mix: list[str], fineweb: list[str], val_docs: int = VAL_DOCS) -> dict:
    """Writes the shards and their manifests into the folder out; returns {shard path relative to out: tokens}."""
    sp = build_shards.load_tokenizer(tokenizer.read_bytes(), str(tokenizer))
    (out / "fw").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, out / build_shards.TOKENIZER_FILE)
    counts = {}
    for name, docs in (("fineweb_train_000000.bin", mix[:-val_docs]), ("fineweb_val_000000.bin", mix[-val_docs:]),
                       ("fw/fineweb_val_000000.bin", fineweb)):
        counts[name] = build_shards.write_shard(out / name, encode(sp, docs))
    link = out / "fw" / "fineweb_train_000000.bin"
    if not link.exists():
        os.symlink("../fineweb_train_000000.bin", link)
    for folder, tokenizer_file in ((out, build_shards.TOKENIZER_FILE), (out / "fw", "../tokenizer.model")):
        splits = {split: build_shards.split_entry(folder, split) for split in ("val", "train")}
        build_shards.write_manifest(folder, {
            "format": build_shards.SHARD_FORMAT, "source": "data/build_qs2.py",
            "tokenizer": {"file": tokenizer_file, "sha256": build_shards.sha256_file(tokenizer),
                          "vocab_size": sp.get_piece_size()},
            "bos_id": build_shards.BOS_ID, "append_eos": False, "splits": splits})
    return counts


def read_texts(path: Path) -> list[str]:
    """The documents of a .jsonl[.zst] file, through build_shards' reader: a missing, truncated or malformed file is
    a BuildError naming it."""
    build_shards.check_inputs([path])
    return list(build_shards.iter_documents([path]))


def build_into_place(out: Path, tokenizer: Path, data: Path, overwrite: bool) -> None:
    if not tokenizer.is_file():
        raise BuildError(f"tokenizer not found: {tokenizer}")
    mix = read_texts(data / "english_mix" / "english_mix.jsonl.zst")
    fineweb = read_texts(data / "fineweb_docs" / "fineweb_200docs.jsonl")
    if len(mix) <= VAL_DOCS:
        raise BuildError(f"english_mix holds {len(mix)} documents; QS-2 needs more than its {VAL_DOCS} val ones")
    with build_shards.staged(out, overwrite, build_shards.BUILD_FILES + ("fw",)) as folder:
        counts = build(folder, tokenizer, mix, fineweb)
    for name, n in counts.items():
        print(f"{out / name}: {n:,} tokens, {(out / name).stat().st_size:,} bytes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "fineweb_1024_bpe.model")
    p.add_argument("--data", type=Path, default=SHARED, help="folder with english_mix/ and fineweb_docs/")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in OUT_DIR")
    a = p.parse_args(argv)
    return build_shards.cli("build_qs2.py", a.out, lambda: build_into_place(a.out, a.tokenizer, a.data, a.overwrite))


if __name__ == "__main__":
    sys.exit(main())
