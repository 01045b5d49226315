#!/usr/bin/env bash
# FlashAttention-4 (pip flash-attn-4, on NVIDIA's CuTe DSL) on your own Hopper or Blackwell GPU: install it, then
# the measurements of docs/PERF.md's FA4 tables. ATTENTION=auto (the default) trains with FA4 once it is installed.
#
#   bash bench/fa4.sh install                  # pip install the measured versions, then import FA4's interface
#   bash bench/fa4.sh bench [ARGS...]          # bench_attention.py: cuDNN, flash, FA4 and its variants, checked
#                                              # against float32 attention, then timed at the model's shapes
#   bash bench/fa4.sh train [SPEC...]          # bench_train.py at each SPEC (default: cudnn fa4): ATTENTION value,
#                                              # +expand_kv (K/V repeated to every query head), @FWD,BWD (kernels/mlp.py
#                                              # tiles of bench_gemm.py's MLP_TILES), e.g. fa4 fa4+expand_kv fa4@kept,kept
#   bash bench/fa4.sh losses [STEPS] [SEEDS]   # compare_losses.py ATTENTION=cudnn vs fa4 (default 100 steps, 2 seeds)
#   bash bench/fa4.sh gemm [ARGS...]           # bench_gemm.py: cuBLAS vs quack's GEMMs, kernels/mlp.py vs quack's
#                                              # relu^2 GEMMs (quack-kernels comes with flash-attn-4)
#   bash bench/fa4.sh profile [KNOB=V ...]     # bench_train.py ATTENTION=fa4 --profile: kernel families and a
#                                              # per-kernel TSV (e.g. PRESET=frontier)
#
# The measured versions are flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1 and quack-kernels 0.6.5 (FA4_VERSION,
# CUTLASS_DSL_VERSION, QUACK_VERSION override them); a CUDA 13 torch gets their [cu13] builds. FA4 needs no CUDA
# toolkit: the DSL compiles its kernels at the first call (~5 s) with the PTX compiler it ships.
# Without network, fetch the wheels on a machine that has it, for the target's Python, and point WHEELS at them:
#   pip download -d fa4_wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     "flash-attn-4[cu13]==4.0.0b36" "nvidia-cutlass-dsl[cu13]==4.8.1" "quack-kernels==0.6.5"
#   WHEELS=fa4_wheels bash bench/fa4.sh install
# Training shards: DATA_PATH and TOKENIZER_PATH as for train_gpt.py (default: the official sp1024 download).
# Results go to stdout and to $RESULTS (default logs/bench/).
set -euo pipefail
source "$(dirname "$0")/common.sh"
export DATA_PATH=${DATA_PATH:-./data/datasets/fineweb10B_sp1024}
export TOKENIZER_PATH=${TOKENIZER_PATH:-./data/tokenizers/fineweb_1024_bpe.model}
quiet() { grep -vE "UserWarning|exe_args" || true; }  # FA4 warns once per compiled kernel about its own aux_data

install() {
  if ! python -c 'import flash_attn.cute.interface' 2>/dev/null; then
    local cu13 source=()
    cu13=$(python -c 'import torch; print("[cu13]" if int((torch.version.cuda or "0").split(".")[0]) >= 13 else "")')
    [ -z "${WHEELS:-}" ] || source=(--no-index --find-links "$WHEELS")
    python -m pip install "${source[@]+"${source[@]}"}" "flash-attn-4$cu13==${FA4_VERSION:-4.0.0b36}" \
      "nvidia-cutlass-dsl$cu13==${CUTLASS_DSL_VERSION:-4.8.1}" "quack-kernels==${QUACK_VERSION:-0.6.5}"
  fi
  python - <<'PY'
from importlib.metadata import version, PackageNotFoundError
def v(dist):
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"
print("versions: " + ", ".join(f"{d} {v(d)}" for d in (
    "torch", "triton", "flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "cuda-bindings")))
from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401 - what ATTENTION=fa4 calls
print("flash_attn.cute imports")
PY
}

case "${1:-}" in
  install)
    install
    ;;
  bench)
    shift
    install
    nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader || true
    python bench/bench_attention.py --json "$RESULTS/attention.json" "$@" 2>&1 | quiet | tee "$RESULTS/bench_attention.txt"
    ;;
  train)
    shift
    [ $# -gt 0 ] || set -- cudnn fa4
    install
    for spec in "$@"; do
      attention=${spec%%[+@]*}
      echo "== bench_train ATTENTION=$attention ($spec)"
      extra=()
      [[ $spec == *+expand_kv* ]] && extra+=(--expand-kv)
      [[ $spec == *@* ]] && extra+=(--mlp-tiles "${spec#*@}")
      log=$RESULTS/train_$(printf %s "$spec" | tr -c 'A-Za-z0-9_-' _).txt
      ATTENTION=$attention python bench/bench_train.py --steps 20 "${extra[@]+"${extra[@]}"}" >"$log" 2>&1 \
        || echo "rc=$?"
      grep -E "^(device|attention|\| [0-9])" "$log" || tail -5 "$log"
    done
    ;;
  gemm)
    shift
    install
    python bench/bench_gemm.py --json "$RESULTS/bench_gemm.json" "$@" 2>&1 | quiet | tee "$RESULTS/bench_gemm.txt"
    ;;
  profile)
    shift
    install
    tag=$(printf '%s' "${*:-default}" | tr -c 'A-Za-z0-9=.,-' _)
    ATTENTION=fa4 env "$@" python bench/bench_train.py --steps 10 --profile \
      --profile-table "$RESULTS/kernels_fa4_$tag.tsv" >"$RESULTS/profile_fa4_$tag.txt" 2>&1 || echo "rc=$?"
    quiet <"$RESULTS/profile_fa4_$tag.txt" | tail -40
    ;;
  losses)
    install
    TRAIN_BATCH_TOKENS=131072 python bench/compare_losses.py --a ATTENTION=cudnn --b ATTENTION=fa4 \
      --steps "${2:-100}" --seeds "${3:-2}" --json "$RESULTS/losses_fa4.json" 2>&1 | tee "$RESULTS/losses_fa4.txt"
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"
    exit 2
    ;;
esac
