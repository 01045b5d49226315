#!/usr/bin/env python3
"""The shards of the QS-2 quality protocol (SPEC.md §7) in any tokenizer: english_mix (already shuffled), every
document but the last 400 -> train, the last 400 -> val; the 200 FineWeb documents -> OUT_DIR/fw/ as a second val
set (its train shard a link to the same train shard). BOS before every document, no EOS, one shard per split.

    python data/build_qs2.py OUT_DIR                                                   # sp1024, as ../shared/tools
    python data/build_qs2.py OUT_DIR --tokenizer ../shared/data/tokenizers/fineweb_8192_bpe.model    # sp8192
    python data/build_qs2.py OUT_DIR --vocab-size 8192             # a tokenizer trained here on the train split
    python data/build_qs2.py OUT_DIR --vocab-size 8192 --caseops   # the same, on caseops text (data/caseops.py)

With sp1024 the counts are those of ../shared/tools/build_qs2.py (train 8,673,806, val 572,876, fw 628,457 tokens).
--vocab-size trains with data/build_shards.py's trainer (official settings) on the train split only, so a plain and
a caseops tokenizer of the same size come from the same documents. --caseops also writes each val set's byte sidecar.
Train with DATA_PATH=OUT_DIR (or OUT_DIR/fw) TOKENIZER_PATH=OUT_DIR/tokenizer.model VOCAB_SIZE=<its size>; each
folder's manifest.json, in build_shards.py's format, names the tokenizer, each shard's token count and sha256 (and,
with --caseops, the sidecar's). The build is written beside OUT_DIR and renamed into place at the end, as
build_shards.py's: an interrupted or failed one leaves nothing at OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import build_shards
from build_shards import BuildError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL_DOCS = 400
SIDECAR = build_shards.BYTES_PATTERN.format(split="val", index=0)


def write_split(folder: Path, name: str, encoded: list, docs: list[str]) -> dict:
    """One shard of BOS + ids per document (and, where the encoder counted bytes, a caseops val split, its byte
    sidecar); the split's manifest entry."""
    ids = [np.concatenate([[build_shards.BOS_ID], d]).astype(np.uint16) for d, _ in encoded]
    tokens = build_shards.write_shard(folder / name, np.concatenate(ids))
    entry = {"docs": len(docs), "tokens": tokens}
    if encoded[0][1] is not None:
        counts = np.concatenate([np.concatenate([[0], c]) for _, c in encoded]).astype(np.uint16)
        build_shards.write_shard(folder / SIDECAR, counts, build_shards.BYTES_MAGIC)
        sidecars = build_shards.shard_entries(folder, "valbytes", magic=build_shards.BYTES_MAGIC)
        entry["caseops"] = build_shards.caseops_manifest(sidecars, int(counts.sum(dtype=np.int64)),
                                                         sum(len(d.encode("utf-8")) for d in docs))
    return entry


def build(out: Path, model_proto: bytes, mix: list[str], fineweb: list[str], val_docs: int = VAL_DOCS,
          case_ops: bool = False, tokenizer_info: dict | None = None) -> dict:
    """Writes the shards, tokenizer.model and a manifest.json in the folder out and in out/fw; returns {shard path
    relative to out: tokens}."""
    encoder = build_shards.DocumentEncoder(model_proto, case_ops)
    (out / "fw").mkdir(parents=True, exist_ok=True)
    (out / build_shards.TOKENIZER_FILE).write_bytes(model_proto)
    train = write_split(out, "fineweb_train_000000.bin", encoder(mix[:-val_docs], 0), mix[:-val_docs])
    train.update(build_shards.split_entry(out, "train"))  # the same shard in out/fw, through the link below
    for name in ("fineweb_train_000000.bin", build_shards.TOKENIZER_FILE):
        link = out / "fw" / name
        if not link.exists():
            os.symlink(f"../{name}", link)
    tokenizer = {"file": build_shards.TOKENIZER_FILE, "sha256": build_shards.sha256_file(out / "tokenizer.model"),
                 "vocab_size": encoder.sp.get_piece_size(), **(tokenizer_info or {})}
    counts = {"fineweb_train_000000.bin": train["tokens"]}
    for folder, docs in ((out, mix[-val_docs:]), (out / "fw", fineweb)):
        val = write_split(folder, "fineweb_val_000000.bin", encoder(docs, len(docs)), docs)
        counts[str((folder / "fineweb_val_000000.bin").relative_to(out))] = val["tokens"]
        val.update(build_shards.split_entry(folder, "val"))
        manifest = {"format": build_shards.SHARD_FORMAT, "source": "data/build_qs2.py", "tokenizer": tokenizer,
                    "bos_id": build_shards.BOS_ID, "append_eos": False, "splits": {"val": val, "train": train}}
        if "caseops" in val:
            manifest["caseops"] = val.pop("caseops")
        build_shards.write_manifest(folder, manifest)
    return counts


def read_texts(path: Path) -> list[str]:
    """The documents of a .jsonl[.zst] file, through build_shards' reader: a missing, truncated or malformed file is
    a BuildError naming it."""
    build_shards.check_inputs([path])
    return list(build_shards.iter_documents([path]))


def build_into_place(out: Path, tokenizer: Path, vocab_size: int | None, case_ops: bool, data: Path,
                     overwrite: bool) -> None:
    if vocab_size is None and not tokenizer.is_file():
        raise BuildError(f"tokenizer not found: {tokenizer}")
    mix = read_texts(data / "english_mix" / "english_mix.jsonl.zst")
    fineweb = read_texts(data / "fineweb_docs" / "fineweb_200docs.jsonl")
    if len(mix) <= VAL_DOCS:
        raise BuildError(f"english_mix holds {len(mix)} documents; QS-2 needs more than its {VAL_DOCS} val ones")
    t0 = time.perf_counter()
    with build_shards.staged(out, overwrite, build_shards.BUILD_FILES + ("fw",)) as folder:
        if vocab_size is None:
            proto, info = tokenizer.read_bytes(), {"source": str(tokenizer)}
        else:
            proto, facts = build_shards.train_tokenizer(mix[:-VAL_DOCS], vocab_size,
                                                        build_shards.DEFAULT_TOKENIZER_MAX_DOC_BYTES, case_ops)
            info = {"source": "trained on the QS-2 train split", "train_docs": facts["docs_used"],
                    "settings": build_shards.tokenizer_settings(case_ops)}
            print(f"tokenizer: {vocab_size} pieces trained on {facts['docs_used']:,} documents in "
                  f"{time.perf_counter() - t0:.1f} s")
        counts = build(folder, proto, mix, fineweb, VAL_DOCS, case_ops, info)
    for name, n in counts.items():
        print(f"{out / name}: {n:,} tokens, {(out / name).stat().st_size:,} bytes")
    for folder in (out, out / "fw"):
        manifest = json.loads((folder / build_shards.MANIFEST_FILE).read_text())
        if "caseops" in manifest:
            print(f"{folder}: val bytes {manifest['caseops']['val_bytes']:,} (caseops sidecar; raw UTF-8 "
                  f"{manifest['caseops']['val_raw_bytes']:,})")
    print(f"built in {time.perf_counter() - t0:.1f} s; train with DATA_PATH={out} "
          f"TOKENIZER_PATH={out / build_shards.TOKENIZER_FILE} VOCAB_SIZE={manifest['tokenizer']['vocab_size']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "fineweb_1024_bpe.model")
    tok.add_argument("--vocab-size", type=int, help="train a tokenizer of this size on the train split instead")
    p.add_argument("--caseops", action="store_true", help="lowercase text with case markers (data/caseops.py); "
                                                          "writes each val set's byte sidecar")
    p.add_argument("--data", type=Path, default=SHARED, help="folder with english_mix/ and fineweb_docs/")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in OUT_DIR")
    a = p.parse_args(argv)
    return build_shards.cli("build_qs2.py", a.out, lambda: build_into_place(a.out, a.tokenizer, a.vocab_size,
                                                                             a.caseops, a.data, a.overwrite))


if __name__ == "__main__":
    sys.exit(main())
