"""Entropy coding of artifacts' payloads: what each lossless layout and coder makes of the same bytes.

    python bench/bench_compress.py logs/<RUN_ID>.ptz [more.ptz ...] [--no-slow] [--zpaq-levels 4,5]

Each artifact's payload (decompressed and checked) is re-coded by every row below; a row reports the bytes, the
seconds to write (compress) and to read (decompress, checked equal to the payload) on this machine. The rows:
the COMPRESSOR values train_gpt.py ships (through its own compress()/decompress(): brotli_arrays = brotli-11 one
stream per array, the default; zstd = zstd-22 one frame per array; brotli-11 and lzma-9e of the whole payload); zstd-22 over the whole payload with
long-distance matching (window 2^27); zstd-22 per array with a dictionary trained on the arrays (its bytes
counted); brotli-11 per array; ZPAQ (the `zpaq` wheel, one thread, the best ratio) of the whole payload, of the
arrays grouped by role (attention codes, MLP codes, other codes, steps, the rest), and of the groups with every
int8 matrix's rows sorted by mean |code| (the permutation stored, 2 bytes a row); and the MLP codes alone
re-coded by each coder. Prints one markdown table per artifact; nothing is written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def arrays_of(payload: bytes) -> tuple[bytes, list[tuple[str, str, dict, bytes]]]:
    """(JSON header, [(tensor name, array key, array entry, raw bytes)]) in payload order."""
    m = len(tg.ARTIFACT_MAGIC)
    hlen = int.from_bytes(payload[m:m + 4], "little")
    header = payload[:m + 4 + hlen]
    body = payload[m + 4 + hlen:]
    out = []
    for entry in json.loads(payload[m + 4:m + 4 + hlen])["tensors"]:
        for key, a in entry["arrays"].items():
            out.append((entry["name"], key, a, body[a["offset"]:a["offset"] + a["nbytes"]]))
    return header, out


def role(name: str, key: str, a: dict) -> int:
    if a["dtype"] == "int8":
        return 0 if ".attn." in name else 1 if ".mlp." in name else 2
    return 3 if key.endswith("scale") else 4


def rows_sorted(key: str, a: dict, raw: bytes) -> bytes:
    """An int8 matrix's rows in order of mean |code|, the permutation (uint16 per row) in front; others as they are."""
    if a["dtype"] != "int8" or len(a["shape"]) != 2 or a["shape"][0] > 65535:
        return raw
    q = np.frombuffer(raw, dtype=np.int8).reshape(a["shape"])
    order = np.argsort(np.abs(q.astype(np.int16)).mean(1), kind="stable")
    return order.astype("<u2").tobytes() + q[order].tobytes()


def zstd_pieces(pieces: list[bytes], dict_data=None) -> list[bytes]:
    import zstandard

    def one(p: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=22, dict_data=dict_data).compress(p)

    with concurrent.futures.ThreadPoolExecutor() as pool:
        return list(pool.map(one, pieces))


def zstd_unpieces(blobs: list[bytes], dict_data=None) -> bytes:
    import zstandard

    return b"".join(zstandard.ZstdDecompressor(dict_data=dict_data).decompress(b) for b in blobs)


def coders(pieces: list[bytes], zpaq_levels: list[int], slow: bool) -> dict:
    """name -> (write: pieces -> (blobs, extra bytes), read: blobs -> bytes), each coding `pieces` one by one."""
    import brotli
    import zstandard

    out = {"zstd-22": (lambda ps: (zstd_pieces(ps), 0), zstd_unpieces)}
    if slow:
        out["brotli-11"] = (lambda ps: ([brotli.compress(p, quality=11) for p in ps], 0),
                            lambda bs: b"".join(map(brotli.decompress, bs)))
    try:
        import zpaq
    except ImportError:
        return out
    for level in zpaq_levels:
        out[f"zpaq-{level}"] = (lambda ps, level=level: ([zpaq.compress(p, level=level, threads=1) for p in ps], 0),
                                lambda bs: b"".join(map(zpaq.decompress, bs)))
    if not slow:
        return out
    samples = [p[i:i + 4096] for p in pieces for i in range(0, len(p), 4096)]

    def with_dict(ps):
        d = zstandard.train_dictionary(112_640, samples)
        blobs = zstd_pieces(ps, d)
        blobs.append(d.as_bytes())
        return blobs, 0

    def read_dict(bs):
        return zstd_unpieces(bs[:-1], zstandard.ZstdCompressionDict(bs[-1]))

    out["zstd-22 + trained dictionary (counted)"] = (with_dict, read_dict)
    return out


def timed(write, read, pieces: list[bytes]) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    blobs, extra = write(pieces)
    t1 = time.perf_counter()
    back = read(blobs)
    t2 = time.perf_counter()
    if back != b"".join(pieces):
        raise AssertionError("a coder did not round-trip")
    return sum(map(len, blobs)) + extra, t1 - t0, t2 - t1


def shipped(payload: bytes, name: str) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    blob = tg.compress(payload, name)
    t1 = time.perf_counter()
    if tg.decompress(blob, name) != payload:
        raise AssertionError(f"{name} did not round-trip")
    return len(blob), t1 - t0, time.perf_counter() - t1


def ldm(payload: bytes) -> tuple[int, float, float]:
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(22, enable_ldm=True, window_log=27)
    t0 = time.perf_counter()
    blob = zstandard.ZstdCompressor(compression_params=params).compress(payload)
    t1 = time.perf_counter()
    if zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(blob) != payload:
        raise AssertionError("zstd LDM did not round-trip")
    return len(blob), t1 - t0, time.perf_counter() - t1


def bench(path: Path, zpaq_levels: list[int], slow: bool) -> None:
    payload = tg.decompress(path.read_bytes(), path)
    header, arrays = arrays_of(payload)
    grouped = sorted(arrays, key=lambda a: role(a[0], a[1], a[2]))
    groups = [b"".join(a[3] for a in grouped if role(a[0], a[1], a[2]) == r) for r in range(5)]
    sorted_groups = [b"".join(rows_sorted(a[1], a[2], a[3]) for a in grouped if role(a[0], a[1], a[2]) == r)
                     for r in range(5)]
    mlp = [a[3] for a in arrays if role(a[0], a[1], a[2]) == 1]
    print(f"\n{path}: payload {len(payload):,} B, {len(arrays)} arrays, file {path.stat().st_size:,} B; MLP codes "
          f"{sum(map(len, mlp)):,} B")
    print("| layout | coder | bytes | write s | read s |\n|---|---|---:|---:|---:|")

    def row(layout: str, coder: str, result: tuple[int, float, float]) -> None:
        print(f"| {layout} | {coder} | {result[0]:,} | {result[1]:.1f} | {result[2]:.1f} |", flush=True)

    for name in tg.COMPRESSORS if slow else ("brotli_arrays", "zstd"):
        row("COMPRESSOR=" + name, "train_gpt.py", shipped(payload, name))
    if slow:
        row("whole payload", "zstd-22, long-distance matching", ldm(payload))
    layouts = [("one piece per array", [header] + [a[3] for a in arrays]),
               ("whole payload", [payload]),
               ("grouped by role", [header] + groups),
               ("grouped, int8 rows sorted (+ permutation)", [header] + sorted_groups),
               ("the MLP codes alone, per array", mlp)]
    for layout, pieces in layouts:
        for coder, (write, read) in coders(pieces, zpaq_levels, slow).items():
            if coder.startswith("zstd-22 + trained") and layout != "one piece per array":
                continue
            if layout == "whole payload" and not coder.startswith("zpaq"):
                continue  # the shipped rows above code it
            row(layout, coder, timed(write, read, pieces))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--zpaq-levels", default="4,5", help="ZPAQ levels to try (with the zpaq wheel installed)")
    parser.add_argument("--no-slow", action="store_true", help="skip brotli, lzma, LDM and the trained dictionary")
    opts = parser.parse_args()
    for path in opts.artifacts:
        bench(path, [int(x) for x in opts.zpaq_levels.split(",") if x], not opts.no_slow)


if __name__ == "__main__":
    main()
