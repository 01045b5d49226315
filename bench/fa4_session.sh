#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4 4.0.0b36 on the CuTe DSL, nvidia-cutlass-dsl 4.8.1, cu13) on the lent GPU machine,
# which cannot download and takes at most 64 MiB of carried files per command. Its CUDA flavour of the DSL alone
# (nvidia-cutlass-dsl-libs-cu13) is a 92 MB wheel, so the install comes in two folders, one per command:
#   .carry_fa4a/  the DSL's compiler module _cutlass_ir.cu13...so (193 MB, already stripped), as tar.xz
#   .carry_fa4b/  the rest of libs-cu13 (the 44 MB runtime libcute_dsl_runtime.so, ...) as tar.xz, and the other
#                 wheels: flash_attn_4, nvidia_cutlass_dsl (+ libs_base, libs_core), quack_kernels, apache_tvm_ffi,
#                 torch_c_dlpack_ext, einops (installed only if the image lacks it)
# Both are git-ignored; `prepare` builds them here from downloaded wheels. What the stages unpack goes into the
# machine's python (its venv site-packages, or /tmp/fa4site when that is not writable), outside the repo copy, so it
# survives from one command to the next while the machine is warm (~30 s after a command returns). FA4_SITE=DIR
# installs into DIR instead (a --target folder put on PYTHONPATH), for both stages alike.
#
#   bash bench/fa4_session.sh prepare [WHEEL_DIR]   # here, once (xz -9e: ~25 min on 2 cores); WHEEL_DIR=/tmp/fa4
#   bash bench/fa4_session.sh partA                 # GPU, device tool carry: [".carry_fa4a"]
#   bash bench/fa4_session.sh partB [ARGS...]       # GPU, within 30 s of partA, carry: [".carry_fa4b"]: install the
#                                                   # rest, import FA4, python bench/bench_attention.py ARGS
#   bash bench/fa4_session.sh install               # GPU: partB without the benchmark (then run what needs FA4)
#
# partB also works on its own when partA's files are already installed (a later command on the same warm machine)
# or when .carry_fa4a travels with it. Each stage prints what it installed; partB's outputs go to $OUT when set.
# JIT: FA4 compiles its kernels at the first call with the DSL's embedded PTX compiler (libnvptxcompiler inside
# _cutlass_ir); no nvcc or ptxas is needed. CUTE_DSL_PTXAS_PATH would switch to a system ptxas instead (unset here).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
CARRY_A=.carry_fa4a CARRY_B=.carry_fa4b
IR_TAR=cutlass_ir_cu13.tar.xz REST_TAR=cutlass_libs_cu13_rest.tar.xz
IR_SO=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
IR_SHA256=da0407f709df82a2ae87eea7deadb15abadbd847b8ab5db7b8ee399a8c80557d  # libs-cu13 4.8.1's RECORD
MAX_BYTES=$((60 * 1024 * 1024))  # per folder: the 64 MiB limit of a command, less the repo's own files

site_dir() {  # where the packages go on this machine, and the PYTHONPATH that makes it visible
  PURELIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ -z "${FA4_SITE:-}" ] && [ -w "$PURELIB" ]; then
    SITE=$PURELIB
  else  # a --target folder does not run the DSL's .pth, so its dsl_packages folder goes on the path too
    SITE=${FA4_SITE:-/tmp/fa4site}
    mkdir -p "$SITE"
    export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
    echo "installing into $SITE, not $PURELIB; later commands need PYTHONPATH=$PYTHONPATH"
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

check_ir() {  # the compiler module is there, byte for byte the file of the wheel (sha256 of its RECORD)
  python3 - "$SITE/$IR_SO" "$IR_SHA256" <<'EOF'
import hashlib, pathlib, sys
so = pathlib.Path(sys.argv[1])
if not so.is_file():
    sys.exit(f"missing {so}")
ok = hashlib.sha256(so.read_bytes()).hexdigest() == sys.argv[2]
print(f"{so.name}: {so.stat().st_size} bytes, sha256 {'as in the wheel' if ok else 'DIFFERS from the wheel'}")
sys.exit(not ok)
EOF
}

install_rest() {
  site_dir
  if [ ! -f "$SITE/$IR_SO" ]; then
    if [ -f "$CARRY_A/$IR_TAR" ]; then
      untar "$CARRY_A/$IR_TAR" "$SITE"
    else
      echo "missing $SITE/$IR_SO: run partA (carry: [\"$CARRY_A\"]) less than 30 s before this command" >&2
      exit 1
    fi
  fi
  check_ir
  [ -d "$CARRY_B" ] || { echo "no $CARRY_B here: this command needs carry: [\"$CARRY_B\"]" >&2; exit 1; }
  untar "$CARRY_B/$REST_TAR" "$SITE"
  local wheels=()
  for w in "$CARRY_B"/*.whl; do
    case $(basename "$w") in
      einops-*) python3 -c 'import einops' 2>/dev/null && continue ;;
    esac
    wheels+=("$w")
  done
  local pip=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
  if [ "$SITE" = "$PURELIB" ]; then
    "${pip[@]}" "${wheels[@]}"
  else  # pip --target --upgrade replaces whole top-level folders (nvidia_cutlass_dsl/ with the cu13 files in it): merge
    local tmp
    tmp=$(mktemp -d)
    "${pip[@]}" --target "$tmp" "${wheels[@]}"
    cp -a "$tmp"/. "$SITE"/ && rm -rf "$tmp"
  fi
  printf 'installed: %s\n' "${wheels[@]##*/}"
  check_ir
  # what FA4 needs from the image (cuda-bindings >= 12.8, protobuf, typing-extensions): version or "missing"
  python3 - <<'EOF'
from importlib.metadata import version, PackageNotFoundError
for dist in ("torch", "triton", "cuda-bindings", "cuda-pathfinder", "protobuf", "typing-extensions", "numpy", "einops",
             "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
             "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "apache-tvm-ffi", "torch-c-dlpack-ext"):
    try:
        print(f"  {dist} {version(dist)}")
    except PackageNotFoundError:
        print(f"  {dist} missing")
EOF
  # a failing import is reported, not fatal: partB's benchmark then runs the SDPA backends and says why FA4 is missing
  FA4_IMPORTS=1
  python3 - <<'EOF' || { FA4_IMPORTS=0; echo "FA4 does not import here (traceback above)"; }
import time
t0 = time.time()
import torch
import flash_attn.cute as fa4
from flash_attn.cute.interface import _flash_attn_bwd  # noqa: F401 - the backward the custom op calls
import cutlass
print(f"import flash_attn.cute ok ({time.time() - t0:.1f} s): flash_attn_func from {fa4.flash_attn_func.__module__}; "
      f"cutlass from {cutlass.__file__}; torch's own DLPack exchange API: "
      f"{hasattr(torch.Tensor, '__dlpack_c_exchange_api__')}")
EOF
}

case "${1:-}" in
  prepare)
    wheels=${2:-/tmp/fa4}
    work=$(mktemp -d)
    rm -rf "$CARRY_A" "$CARRY_B" && mkdir -p "$CARRY_A" "$CARRY_B"
    (cd "$work" && unzip -q "$wheels"/nvidia_cutlass_dsl_libs_cu13-4.8.1-*.whl && find . -type f | sort >all.txt \
      && grep -v '^./all.txt$' all.txt | grep _cutlass_ir >ir.txt \
      && grep -v -e _cutlass_ir -e '^./all.txt$' all.txt >rest.txt)
    # xz's x86 filter (BCJ) makes machine code compress better; -9e, one thread: the smallest output
    # (XZ_PRESET=0 for a quick trial of this stage: its output is too large to carry)
    (cd "$work" && tar cf - -T ir.txt) | xz -T1 --x86 --lzma2=preset="${XZ_PRESET:-9e}" >"$CARRY_A/$IR_TAR" &
    (cd "$work" && tar cf - -T rest.txt) | xz -T1 --x86 --lzma2=preset="${XZ_PRESET:-9e}" >"$CARRY_B/$REST_TAR" &
    wait
    for w in flash_attn_4-4.0.0b36 nvidia_cutlass_dsl-4.8.1 nvidia_cutlass_dsl_libs_base-4.8.1 \
             nvidia_cutlass_dsl_libs_core-4.8.1 quack_kernels-0.6.5 apache_tvm_ffi-0.1.15.post2 \
             torch_c_dlpack_ext-0.1.5 einops-0.8.2; do
      cp "$wheels"/"$w"-*.whl "$CARRY_B/"
    done
    rm -rf "$work"
    for d in "$CARRY_A" "$CARRY_B"; do
      bytes=$(du -sb "$d" | cut -f1)
      echo "$d: $bytes bytes ($((bytes / 1024 / 1024)) MiB)"
      [ "$bytes" -le "$MAX_BYTES" ] || { echo "$d is over 60 MiB" >&2; exit 1; }
    done
    ;;
  partA)
    [ -f "$CARRY_A/$IR_TAR" ] || { echo "no $CARRY_A/$IR_TAR: this command needs carry: [\"$CARRY_A\"]" >&2; exit 1; }
    site_dir
    untar "$CARRY_A/$IR_TAR" "$SITE"
    check_ir
    ls -la "$SITE/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/"
    ;;
  install)
    install_rest
    [ "$FA4_IMPORTS" = 1 ]
    ;;
  partB)
    shift
    install_rest
    nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader || true
    python3 bench/bench_attention.py --json "$OUT/attention.json" "$@" 2>&1 | tee "$OUT/bench_attention.txt"
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"
    exit 2
    ;;
esac
