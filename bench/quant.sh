#!/usr/bin/env bash
# The measurements of docs/QUANT.md (the export: card fidelity, the quantisers' rate-distortion, the byte budget)
# on your own CUDA machine, on the QS-2 protocol (bench/qs2_protocol.sh; QS2_DATA names its shards).
#
#   bash bench/quant.sh fidelity [SEED...]   # per seed (default 1 2): the record's exact run (QUANT_MODE=card
#                                            # GPTQ_ENABLED=0) and the default export, weights saved
#   bash bench/quant.sh sweep RUN [ROWS]     # bench/quant_sweep.py on logs/RUN.weights.pt: every quantiser on the
#                                            # same weights (ROWS: its --only list; default: the rate-distortion rows)
#   bash bench/quant.sh short                # the default export after 40 steps (weights near their initialisation)
#   bash bench/quant.sh long                 # 5000 steps of an 8-GPU run's per-GPU batch (98,304 tokens, grad-accum 1),
#                                            # weights saved; then `sweep long5000`
#   bash bench/quant.sh qat-flag             # does torch.compile see the record's class-level late-QAT flag flip?
#
# The entropy-coding table runs on a CPU: python bench/bench_compress.py logs/qs2_default_s1.ptz
# Logs: logs/<RUN>.txt; sweep tables: $RESULTS (default logs/bench/).
set -euo pipefail
SUMMARY='^(averaging|gptq_calibration|quant_budget|quantize_compress_time|Total submission|final_int6|artifact_|step:(240|40|5000)/|peak_memory)'
RATE_DISTORTION=card,lite,sdclip_rtn_m0.5,sdclip_gptq_m0.5,sdclip_gptq_m1.0,default_budget,gptq_at_card_bytes,budget_embed_int8
case "${1:-}" in fidelity|sweep|short|long) source "$(dirname "$0")/qs2_protocol.sh" ;; esac

case "${1:-}" in
  fidelity)
    seeds=("${@:2}")
    [ ${#seeds[@]} -gt 0 ] || seeds=(1 2)
    for seed in "${seeds[@]}"; do
      run "qs2_card_s$seed" "${QS2[@]}" SEED="$seed" QUANT_MODE=card GPTQ_ENABLED=0 SAVE_WEIGHTS=1
      run "qs2_default_s$seed" "${QS2[@]}" SEED="$seed" SAVE_WEIGHTS=1
    done
    ;;
  sweep)
    run_id=${2:?sweep needs the RUN_ID of a run made with SAVE_WEIGHTS=1}
    python bench/quant_sweep.py "logs/$run_id.weights.pt" --out "$RESULTS/sweep_$run_id.md" \
      --only "${3:-$RATE_DISTORTION}" 2>&1 | grep -v Warning || true
    ;;
  short)
    run qs2_default_40steps "${QS2[@]}" SEED=1 ITERATIONS=40 WARMDOWN_ITERS=17
    ;;
  long)
    # english_mix holds 8.67 M training tokens: 5000 steps of 98,304 tokens read it ~57 times (a memorised model)
    run long5000 TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 ITERATIONS=5000 MAX_WALLCLOCK_SECONDS=0 \
      VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1000 SAVE_WEIGHTS=1
    python bench/quant_sweep.py logs/long5000.weights.pt --out "$RESULTS/sweep_long5000.md" \
      --only card,lite,sdclip_rtn_m0.5,sdclip_gptq_m0.5,sdclip_gptq_m1.0,default_budget,gptq_at_card_bytes \
      2>&1 | grep -v Warning || true
    ;;
  qat-flag)
    cd "$(dirname "$0")/.." && python bench/qat_flag_fold.py
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"
    exit 2
    ;;
esac
