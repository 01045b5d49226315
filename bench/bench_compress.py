"""Entropy coding of one artifact's payload: what each lossless layout and coder would make of the same bytes.

    python bench/bench_compress.py logs/<RUN_ID>.ptz [--frames 0.5,1,2,4] [--no-slow]

The payload (decompressed and checked) is re-coded as: zstd-22 in one frame (what a run writes, unless frames are
smaller), zstd-22 in frames of N MiB (what the budget search measures; each frame gets its own entropy tables),
one frame per tensor array, the arrays grouped by role (int codes of attention / MLP / tables, then fp16 steps,
then the rest) in frames, fp16 arrays split into byte planes, and brotli-11 / lzma-9e of the whole payload.
Prints a markdown table of bytes and seconds; nothing is written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import lzma
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def zstd_frames(pieces: list[bytes]) -> int:
    import zstandard

    with concurrent.futures.ThreadPoolExecutor() as pool:
        return sum(pool.map(lambda p: len(zstandard.ZstdCompressor(level=22).compress(p)), pieces))


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def arrays_of(payload: bytes) -> tuple[bytes, list[tuple[str, str, str, bytes]]]:
    """(JSON header, [(tensor name, array key, dtype, raw bytes)]) in payload order."""
    m = len(tg.ARTIFACT_MAGIC)
    hlen = int.from_bytes(payload[m:m + 4], "little")
    header = payload[m + 4:m + 4 + hlen]
    body = payload[m + 4 + hlen:]
    out = []
    for entry in json.loads(header)["tensors"]:
        for key, a in entry["arrays"].items():
            out.append((entry["name"], key, a["dtype"], body[a["offset"]:a["offset"] + a["nbytes"]]))
    return header, out


def role(name: str, key: str, dtype: str) -> int:
    if dtype == "int8" and key == "q":
        return 0 if ".attn." in name else 1 if ".mlp." in name else 2
    return 3 if key.endswith("scale") else 4


def byte_planes(raw: bytes, dtype: str) -> bytes:
    if dtype != "float16":
        return raw
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2)
    return b[:, 1].tobytes() + b[:, 0].tobytes()  # high bytes (sign, exponent) together, then the low bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--frames", default="0.5,1,2,4", help="frame sizes in MiB to try")
    parser.add_argument("--no-slow", action="store_true", help="skip one-frame zstd, brotli and lzma")
    opts = parser.parse_args()
    payload = tg.decompress(opts.artifact.read_bytes(), opts.artifact)
    header, arrays = arrays_of(payload)
    rows = []

    def row(name: str, fn) -> None:
        t = time.perf_counter()
        n = fn()
        rows.append((name, n, time.perf_counter() - t))
        print(f"| {name} | {n:,} | {rows[-1][2]:.1f} |", flush=True)

    print(f"{opts.artifact}: payload {len(payload):,} B, {len(arrays)} arrays, file {opts.artifact.stat().st_size:,} B")
    print("| layout and coder | bytes | s |\n|---|---:|---:|")
    if not opts.no_slow:
        row("zstd-22, one frame", lambda: zstd_frames([payload]))
    for mib in (float(x) for x in opts.frames.split(",")):
        row(f"zstd-22, {mib:g} MiB frames", lambda mib=mib: zstd_frames(split(payload, int(mib * 2**20))))
    row("zstd-22, one frame per array", lambda: zstd_frames([header] + [a[3] for a in arrays]))
    grouped = sorted(arrays, key=lambda a: role(a[0], a[1], a[2]))
    by_role = b"".join(a[3] for a in grouped)
    row("grouped by role, 2 MiB frames", lambda: zstd_frames([header] + split(by_role, 2 << 20)))
    planes = header + b"".join(byte_planes(a[3], a[2]) for a in arrays)
    row("fp16 byte planes, 2 MiB frames", lambda: zstd_frames(split(planes, 2 << 20)))
    if not opts.no_slow:
        import brotli

        row("brotli-11, whole payload", lambda: len(brotli.compress(payload, quality=11)))
        row("lzma-9e, whole payload", lambda: len(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)))


if __name__ == "__main__":
    main()
