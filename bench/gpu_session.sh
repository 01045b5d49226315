#!/usr/bin/env bash
# The GPU measurements of docs/PERF.md, in stages that each fit one 10-minute call on a lent machine that
# cannot download. Run `prepare` here first: it builds what the machine needs into .carry/ (git-ignored),
# which then travels with the working tree (the device tool's `carry: [".carry"]`).
#
#   bash bench/gpu_session.sh prepare      # here: english_mix shards + FineWeb-docs val shard, zstandard wheel
#   bash bench/gpu_session.sh kernels      # GPU: kernel tests (larger sweep), then bench_kernels.py --sweep
#   bash bench/gpu_session.sh train        # GPU: bench_train.py, default config (profiled) vs FUSED_KERNELS=none
#   bash bench/gpu_session.sh losses       # GPU: 200-step loss curves, all kernels off vs the default, 3 seeds, 1/4 batch
#   bash bench/gpu_session.sh scaling      # 2 GPUs (nvidia-h200-x2): per-GPU step on 1 GPU vs 2 under torchrun
#   bash bench/gpu_session.sh distributed  # 2 GPUs: train_gpt.py end to end under torchrun (NCCL), its artifact
#                                          # scored again on 1 GPU, and a wallclock-capped run
#
# Outputs go to stdout and, where $OUT is set (the device tool's result folder), to files there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
export DATA_PATH=.carry/data TOKENIZER_PATH=.carry/data/tokenizer.model

case "${1:-}" in
  prepare)
    python data/build_shards.py --input ../shared/data/english_mix/english_mix.jsonl.zst --output-dir .carry/data \
      --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model --val-docs 1 --shard-tokens 5000000 --overwrite
    # validation = the 200 real FineWeb documents (replaces the 1-document val split made above)
    python - <<'EOF'
import json, sys, sentencepiece as spm
from pathlib import Path
sys.path.insert(0, "data")
from build_shards import split_entry, write_manifest, write_shard
sp = spm.SentencePieceProcessor(model_file=".carry/data/tokenizer.model")
docs = [json.loads(line)["text"] for line in open("../shared/data/fineweb_docs/fineweb_200docs.jsonl")]
n = write_shard(".carry/data/fineweb_val_000000.bin", [t for d in sp.encode(docs) for t in [1] + d])
manifest = json.loads(Path(".carry/data/manifest.json").read_text())  # train_gpt.py checks the val shard against it
manifest["splits"]["val"] = dict(split_entry(Path(".carry/data"), "val"), docs=len(docs))
write_manifest(Path(".carry/data"), manifest)
print(f"val shard: {n} tokens of FineWeb")
EOF
    mkdir -p .carry/wheels && cp ../shared/wheels/zstandard-*cp312*.whl .carry/wheels/
    du -sh .carry
    ;;
  kernels)
    python -m pytest -q tests/test_kernels.py 2>&1 | tail -3
    python bench/bench_kernels.py --sweep | tee "$OUT/bench_kernels.txt"
    ;;
  train)
    python -m pip install --no-deps -q .carry/wheels/*.whl
    for knobs in "" "FUSED_KERNELS=none"; do
      echo "== ${knobs:-default}"
      env $knobs python bench/bench_train.py --steps 8 --warmup 3 \
        $([ -z "$knobs" ] && echo --profile --profile-table "$OUT/kernels_default.tsv") \
        | tee "$OUT/bench_train_${knobs:-default}.txt"
    done
    ;;
  losses)
    python -m pip install --no-deps -q .carry/wheels/*.whl
    # the whole default (every speed change of docs/PERF.md) against the path without our kernels
    TRAIN_BATCH_TOKENS=196608 WARMDOWN_ITERS=100 python bench/compare_losses.py --a FUSED_KERNELS=none --b "" \
      --steps 200 --seeds 3 --json "$OUT/losses_default.json" | tee "$OUT/losses_default.txt"
    ;;
  scaling)
    # per-GPU throughput on one GPU and on two of the same host: at the 8-GPU run's micro-batch (98,304 tokens a
    # GPU, grad-accum 1) and at the default global batch (grad-accum 8 on one GPU, 4 on two)
    python -m pip install --no-deps -q .carry/wheels/*.whl
    for per_gpu in 98304 default; do
      one=(); two=()
      [ "$per_gpu" = default ] || { one=(TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1); two=(TRAIN_BATCH_TOKENS=196608 GRAD_ACCUM_STEPS=1); }
      steps=$([ "$per_gpu" = default ] && echo "--steps 8 --warmup 3" || echo "--steps 30 --warmup 5")
      echo "== $per_gpu, 1 GPU"
      env ${one[@]+"${one[@]}"} CUDA_VISIBLE_DEVICES=0 python bench/bench_train.py $steps | tee "$OUT/scaling_${per_gpu}_1gpu.txt"
      echo "== $per_gpu, 2 GPUs"
      env ${two[@]+"${two[@]}"} torchrun --standalone --nproc_per_node=2 bench/bench_train.py $steps \
        | tee "$OUT/scaling_${per_gpu}_2gpu.txt"
    done
    ;;
  distributed)
    # the whole script under NCCL: 100 steps, artifact, round trip, sliding eval (a 100-step model does not fit
    # 16 MB, so exit 1 with artifact_over_limit is the expected end); then the same artifact scored on one GPU
    # (the sliding windows split across ranks must give the same bpb); then a run stopped by the wallclock cap
    python -m pip install --no-deps -q .carry/wheels/*.whl
    export VAL_LOSS_EVERY=50 TRAIN_LOG_EVERY=10
    ITERATIONS=100 RUN_ID=x2_100 torchrun --standalone --nproc_per_node=2 train_gpt.py && echo "rc=0" || echo "rc=$?"
    EVAL_ONLY=logs/x2_100.ptz RUN_ID=x2_100_eval1 CUDA_VISIBLE_DEVICES=0 python train_gpt.py && echo "rc=0" || echo "rc=$?"
    MAX_WALLCLOCK_SECONDS=30 RUN_ID=x2_cap30 torchrun --standalone --nproc_per_node=2 train_gpt.py && echo "rc=0" || echo "rc=$?"
    cp logs/x2_*.txt "$OUT/"
    ;;
  *)
    sed -n 2,14p "$0"; exit 2
    ;;
esac
