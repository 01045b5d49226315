#!/usr/bin/env bash
# The training-speed measurements of docs/PERF.md on your own CUDA machine, one stage at a time.
#
#   bash bench/perf.sh kernels      # kernel tests on the GPU, then bench_kernels.py --sweep
#   bash bench/perf.sh train        # bench_train.py: the default config (profiled) and FUSED_KERNELS=none
#   bash bench/perf.sh micro        # bench_train.py at an 8-GPU run's per-GPU micro-batch (98,304 tokens, grad-accum 1)
#   bash bench/perf.sh losses       # 200-step loss curves, 3 seeds, 1/4 batch: our kernels off vs the default
#   bash bench/perf.sh scaling      # 2 GPUs: the per-GPU step on one GPU, then on two under torchrun
#   bash bench/perf.sh distributed  # 2 GPUs: train_gpt.py end to end under torchrun, its artifact scored again on
#                                   # one GPU, and a run stopped by a 30 s wallclock cap
#
# Training shards and tokenizer: DATA_PATH and TOKENIZER_PATH, as for train_gpt.py (default: the official sp1024
# download of README.md). Speed does not depend on the text; `losses` wants at least ~40 M training tokens so that
# 200 steps of 196,608 tokens read no text twice. Results go to stdout and to $RESULTS (default logs/bench/).
# FA4 (pip install flash-attn-4, bench/fa4.sh install) is picked by ATTENTION=auto when installed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
export DATA_PATH=${DATA_PATH:-./data/datasets/fineweb10B_sp1024}
export TOKENIZER_PATH=${TOKENIZER_PATH:-./data/tokenizers/fineweb_1024_bpe.model}

case "${1:-}" in
  kernels)
    python -m pytest -q tests/test_kernels.py 2>&1 | tail -3
    python bench/bench_kernels.py --sweep | tee "$RESULTS/bench_kernels.txt"
    ;;
  train)
    for knobs in "" "FUSED_KERNELS=none"; do
      echo "== ${knobs:-default}"
      env $knobs python bench/bench_train.py --steps 8 --warmup 3 \
        $([ -z "$knobs" ] && echo --profile --profile-table "$RESULTS/kernels_default.tsv") \
        | tee "$RESULTS/bench_train_${knobs:-default}.txt"
    done
    ;;
  micro)
    TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 python bench/bench_train.py --steps 40 --warmup 5 \
      | tee "$RESULTS/bench_train_micro.txt"
    ;;
  losses)
    # the whole default (every speed change of docs/PERF.md) against the path without our kernels
    TRAIN_BATCH_TOKENS=196608 WARMDOWN_ITERS=100 python bench/compare_losses.py --a FUSED_KERNELS=none --b "" \
      --steps 200 --seeds 3 --json "$RESULTS/losses_default.json" | tee "$RESULTS/losses_default.txt"
    ;;
  scaling)
    # per-GPU throughput on one GPU and on two of the same host: at the 8-GPU run's micro-batch (98,304 tokens a
    # GPU, grad-accum 1) and at the default global batch (grad-accum 8 on one GPU, 4 on two)
    for per_gpu in 98304 default; do
      one=(); two=()
      [ "$per_gpu" = default ] || { one=(TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1); two=(TRAIN_BATCH_TOKENS=196608 GRAD_ACCUM_STEPS=1); }
      steps=$([ "$per_gpu" = default ] && echo "--steps 8 --warmup 3" || echo "--steps 30 --warmup 5")
      echo "== $per_gpu, 1 GPU"
      env ${one[@]+"${one[@]}"} CUDA_VISIBLE_DEVICES=0 python bench/bench_train.py $steps | tee "$RESULTS/scaling_${per_gpu}_1gpu.txt"
      echo "== $per_gpu, 2 GPUs"
      env ${two[@]+"${two[@]}"} torchrun --standalone --nproc_per_node=2 bench/bench_train.py $steps \
        | tee "$RESULTS/scaling_${per_gpu}_2gpu.txt"
    done
    ;;
  distributed)
    # 100 steps, artifact, round trip, sliding eval (a 100-step model does not fit 16 MB, so exit 1 with
    # artifact_over_limit is the expected end); the same artifact scored on one GPU (the sliding windows split
    # across ranks must give the same bpb); a run stopped by the wallclock cap. Logs: logs/perf_x2_*.txt
    export VAL_LOSS_EVERY=50 TRAIN_LOG_EVERY=10
    ITERATIONS=100 RUN_ID=perf_x2_100 torchrun --standalone --nproc_per_node=2 train_gpt.py && echo "rc=0" || echo "rc=$?"
    EVAL_ONLY=logs/perf_x2_100.ptz RUN_ID=perf_x2_100_eval1 CUDA_VISIBLE_DEVICES=0 python train_gpt.py \
      && echo "rc=0" || echo "rc=$?"
    MAX_WALLCLOCK_SECONDS=30 RUN_ID=perf_x2_cap30 torchrun --standalone --nproc_per_node=2 train_gpt.py \
      && echo "rc=0" || echo "rc=$?"
    grep -h -E "^(final_int6|stopping_early|val_bpb)" logs/perf_x2_*.txt
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"
    exit 2
    ;;
esac
