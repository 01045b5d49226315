#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4 4.0.0b36 on the CuTe DSL, nvidia-cutlass-dsl 4.8.1, cu13) on the lent GPU machine,
# which cannot download and takes at most 64 MiB of working tree per command (repo + carried files). The install
# travels as one folder, .carry_fa4/ (git-ignored, built here by `prepare`), small enough for one command:
#   fa4_site.tar.xz  every package pip installs from the 9 wheels (--target, python 3.12), less what FA4 never loads:
#                    the DSL's iket profiler, tvm_ffi's libbacktrace sources, torch_c_dlpack_ext
#                    (prebuilt for torch <= 2.9 only; torch >= 2.10 has the DLPack exchange API itself). One xz -9e
#                    stream with the x86 filter and a dictionary over the whole 265 MB (the DSL's compiler module
#                    _cutlass_ir.so alone is 193 MB), ~61 MiB
#   qs2_head.tar.xz  the first HEAD_TOKENS tokens of QS-2's training shard, for bench_train.py and compare_losses.py
#   zstandard-*.whl  train_gpt.py's compressor (the image lacks it), from .carry/wheels (quant_session.sh prepare)
#
#   bash bench/fa4_session.sh prepare [WHEEL_DIR]    # here, once (~5 min on 2 cores); WHEEL_DIR=/tmp/fa4
#   bash bench/fa4_session.sh bench [ARGS...]        # GPU, carry [".carry_fa4"]: install, bench_attention.py ARGS
#   bash bench/fa4_session.sh train [ATTENTION...]   # GPU: install, bench_train.py at each ATTENTION (cudnn fa4);
#                                                    # NAME+expand_kv times NAME on K/V repeated to every query head,
#                                                    # NAME@FWD,BWD with kernels/mlp.py at bench_gemm.py's MLP_TILES
#   bash bench/fa4_session.sh losses [STEPS] [SEEDS] # GPU: install, compare_losses.py ATTENTION=cudnn vs fa4
#   bash bench/fa4_session.sh gemm [ARGS...]         # GPU: install, bench_gemm.py: cuBLAS vs quack's GEMMs (quack-kernels
#                                                    # comes with FA4), kernels/mlp.py vs quack's relu^2 GEMMs
#   bash bench/fa4_session.sh profile [KNOB=V ...]   # GPU: install, bench_train.py ATTENTION=fa4 --profile: the kernel
#                                                    # families and a per-kernel TSV in $OUT (e.g. PRESET=frontier)
#   bash bench/fa4_session.sh install                # GPU: install only, e.g. before frontier_session.sh speed with
#                                                    # SPEED_DATA=/tmp/fa4data/qs2_head (ATTENTION=auto then picks FA4)
#
# Every stage installs first (~25 s with its checks; ~1 s when an earlier stage on the same machine did), into the
# machine's python (its site-packages, or /tmp/fa4site on PYTHONPATH when that is not writable). Outputs go to $OUT.
# JIT: FA4 compiles its kernels at the first call with the DSL's embedded PTX compiler (libnvptxcompiler inside
# _cutlass_ir); no nvcc or ptxas is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
CARRY=.carry_fa4 SITE_TAR=fa4_site.tar.xz DATA_TAR=qs2_head.tar.xz DATA=/tmp/fa4data/qs2_head
HEAD_TOKENS=${HEAD_TOKENS:-1500000}
IR_SO=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
IR_SHA256=da0407f709df82a2ae87eea7deadb15abadbd847b8ab5db7b8ee399a8c80557d  # libs-cu13 4.8.1's RECORD
LIMIT=$((64 * 1024 * 1024))  # the working tree a command takes: tracked + untracked files + carried folders
WHEELS=(flash_attn_4-4.0.0b36 nvidia_cutlass_dsl-4.8.1 nvidia_cutlass_dsl_libs_base-4.8.1
        nvidia_cutlass_dsl_libs_core-4.8.1 nvidia_cutlass_dsl_libs_cu13-4.8.1 quack_kernels-0.6.5
        apache_tvm_ffi-0.1.15.post2 einops-0.8.2)
UNUSED=(nvidia_cutlass_dsl/dsl_packages/iket tvm_ffi/3rdparty/libbacktrace bin)  # tvm_ffi's core links its testing lib

site_dir() {  # where the packages go on this machine, and the PYTHONPATH that makes them visible
  local purelib
  purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ -w "$purelib" ]; then
    SITE=$purelib
  else  # a folder on PYTHONPATH does not run the DSL's .pth, so its dsl_packages folder goes on the path too
    SITE=/tmp/fa4site
    mkdir -p "$SITE"
    export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "site: $SITE"
}

untar() {  # python's tarfile, so the machine needs no xz binary
  python3 - "$1" "$2" <<'EOF'
import sys, tarfile, time
t0 = time.time()
with tarfile.open(sys.argv[1]) as tar:
    members = tar.getmembers()
    tar.extractall(sys.argv[2], filter="tar")
size = sum(m.size for m in members if m.isfile())
print(f"unpacked {sys.argv[1]}: {len(members)} entries, {size / 2**20:.1f} MiB in {time.time() - t0:.1f} s")
EOF
}

install() {
  site_dir
  [ -f "$CARRY/$SITE_TAR" ] || { echo "no $CARRY/$SITE_TAR: this command needs carry: [\"$CARRY\"]" >&2; exit 1; }
  [ -f "$SITE/$IR_SO" ] || untar "$CARRY/$SITE_TAR" "$SITE"
  [ -d "$DATA" ] || untar "$CARRY/$DATA_TAR" "$(dirname "$DATA")"
  python3 -c 'import zstandard' 2>/dev/null || python3 -m pip install -q --no-index --no-deps "$CARRY"/zstandard-*.whl
  if [ -f "$SITE/.fa4_checked" ]; then  # an earlier stage on this machine hashed the module and imported FA4
    echo "FA4 install checked earlier on this machine: $(cat "$SITE/.fa4_checked")"
    return
  fi
  python3 - "$SITE/$IR_SO" "$IR_SHA256" <<'EOF'
import hashlib, pathlib, sys
so = pathlib.Path(sys.argv[1])
ok = hashlib.sha256(so.read_bytes()).hexdigest() == sys.argv[2]
print(f"{so.name}: {so.stat().st_size} bytes, sha256 {'as in the wheel' if ok else 'DIFFERS from the wheel'}")
sys.exit(not ok)
EOF
  # what FA4 needs from the image (cuda-bindings >= 12.8, protobuf, typing-extensions) and what came: version or "-"
  python3 - <<'EOF'
from importlib.metadata import version, PackageNotFoundError
def v(dist):
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"
print("versions: " + ", ".join(f"{d} {v(d)}" for d in (
    "torch", "triton", "cuda-bindings", "cuda-pathfinder", "protobuf", "typing-extensions", "numpy", "einops",
    "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "apache-tvm-ffi")))
import time
t0 = time.time()
import torch
import flash_attn.cute  # noqa: F401
from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401 - what ATTENTION=fa4 calls
print(f"import flash_attn.cute ok ({time.time() - t0:.1f} s); torch's own DLPack exchange API: "
      f"{hasattr(torch.Tensor, '__dlpack_c_exchange_api__')}")
EOF
  date -u +"sha256 and import ok at %H:%M:%S UTC" >"$SITE/.fa4_checked"
}

case "${1:-}" in
  prepare)
    wheels=${2:-/tmp/fa4}
    files=()
    for w in "${WHEELS[@]}"; do
      f=$(ls "$wheels/$w"-*.whl) || { echo "no $w wheel in $wheels (pip download it first)" >&2; exit 1; }
      files+=("$f")
    done
    for f in .carry/qs2/fineweb_train_000000.bin .carry/wheels/zstandard-*.whl; do
      [ -f "$f" ] || { echo "no $f: run bash bench/quant_session.sh prepare first" >&2; exit 1; }
    done
    stage=$(mktemp -d)
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    python3 -m pip install -q --no-deps --no-compile --target "$stage" --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --only-binary=:all: "${files[@]}" 2>&1 | grep -v WARNING || true
    (cd "$stage" && rm -rf "${UNUSED[@]}" && find . -name __pycache__ -prune -exec rm -rf {} +)
    # x86 filter (BCJ): machine code compresses better; the dictionary spans the whole tree
    (cd "$stage" && tar cf - --sort=name .) | xz -T1 --x86 --lzma2=preset=9e,dict=256MiB >"$CARRY/$SITE_TAR"
    rm -rf "$stage"
    python3 - "$CARRY" "$HEAD_TOKENS" <<'EOF'
import sys, tarfile, tempfile
from pathlib import Path
sys.path[:0] = [".", "data"]
from build_shards import write_shard
from train_gpt import load_shard  # checks the header and the size
carry, n = Path(sys.argv[1]), int(sys.argv[2])
tokens = load_shard(".carry/qs2/fineweb_train_000000.bin")[:n]
with tempfile.TemporaryDirectory() as tmp:
    shard = Path(tmp) / "fineweb_train_000000.bin"
    write_shard(shard, tokens)
    with tarfile.open(carry / "qs2_head.tar.xz", "w:xz", preset=9) as tar:
        tar.add(shard, arcname="qs2_head/fineweb_train_000000.bin")
print(f"qs2_head: the first {tokens.size:,} tokens of .carry/qs2's training shard")
EOF
    cp .carry/wheels/zstandard-*.whl "$CARRY/"
    carried=$(du -sb "$CARRY" | cut -f1)
    repo=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
    echo "$CARRY: $carried bytes ($((carried / 1024 / 1024)) MiB); with the repo's $repo bytes: $((carried + repo))"
    [ $((carried + repo)) -le "$LIMIT" ] || { echo "over the 64 MiB a command takes" >&2; exit 1; }
    ;;
  install)
    install
    ;;
  bench)
    shift
    install
    nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader || true
    python3 bench/bench_attention.py --json "$OUT/attention.json" "$@" 2>&1 | tee "$OUT/bench_attention.txt"
    ;;
  train)
    shift
    [ $# -gt 0 ] || set -- cudnn fa4
    install
    for spec in "$@"; do  # ATTENTION[+expand_kv][@FWD,BWD]: bench_train.py --expand-kv, --mlp-tiles FWD,BWD
      attention=${spec%%[+@]*}
      echo "== bench_train ATTENTION=$attention ($spec)"
      extra=()
      [[ $spec == *+expand_kv* ]] && extra+=(--expand-kv)
      [[ $spec == *@* ]] && extra+=(--mlp-tiles "${spec#*@}")
      log=$OUT/train_$(printf %s "$spec" | tr -c 'A-Za-z0-9_-' _).txt  # $OUT brings back plain names only
      DATA_PATH=$DATA ATTENTION=$attention python3 bench/bench_train.py --steps 20 "${extra[@]}" >"$log" 2>&1 \
        || echo "rc=$?"
      grep -E "^(device|attention|\| [0-9])" "$log" || tail -5 "$log"
    done
    ;;
  gemm)
    shift
    install
    python3 bench/bench_gemm.py --json "$OUT/bench_gemm.json" "$@" 2>&1 | grep -vE "UserWarning|exe_args" | tee "$OUT/bench_gemm.txt"
    ;;
  profile)
    shift
    install
    tag=$(printf '%s' "${*:-default}" | tr -c 'A-Za-z0-9=.,-' _)
    DATA_PATH=$DATA ATTENTION=fa4 env "$@" python3 bench/bench_train.py --steps 10 --profile \
      --profile-table "$OUT/kernels_fa4_$tag.tsv" >"$OUT/profile_fa4_$tag.txt" 2>&1 || echo "rc=$?"
    grep -vE "UserWarning|exe_args" "$OUT/profile_fa4_$tag.txt" | tail -40
    ;;
  losses)
    install
    DATA_PATH=$DATA TRAIN_BATCH_TOKENS=131072 python3 bench/compare_losses.py --a ATTENTION=cudnn --b ATTENTION=fa4 \
      --steps "${2:-100}" --seeds "${3:-2}" --json "$OUT/losses_fa4.json" 2>&1 | tee "$OUT/losses_fa4.txt"
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"
    exit 2
    ;;
esac
