#!/usr/bin/env bash
# The GPU measurements of docs/FRONTIER.md and docs/TTT.md (issues 20 and 21), in stages that each fit one
# 10-minute call on the lent machine. Needs .carry/ (bash bench/quant_session.sh prepare) and, for `ttt`, a QS-2
# artifact at .carry/artifacts/qs2_default_s2.ptz (the default export of QS-2 seed 2, quant_session.sh lqer).
#
#   bash bench/frontier_session.sh ttt            # EVAL_ONLY on the artifact: TTT_LR 0 / 0.003 / 0.01
#   bash bench/frontier_session.sh pair SEED      # QS-2: the card and PRESET=frontier on one seed (~8 min)
#   bash bench/frontier_session.sh runs ARM:SEED ...  # QS-2 runs in one call, e.g. frontier:1 card:1 frontier:2
#   bash bench/frontier_session.sh speed NAME[:PASSES]=K=V+K=V ...  # full-batch ms/step, e.g. card= \
#                                                 # frontier:1=PRESET=frontier frontier:3=PRESET=frontier mlp4=MLP_MULT=4
#                                                 # (SPEED_DATA=DIR: other training shards, e.g. fa4_session.sh's)
#   bash bench/frontier_session.sh long ARM:SEED ...  # ITERATIONS=1000 (LONG_STEPS), each arm's own EMA and warmdown
#                                                 # (LONG_DATA=DIR: shards with >= 65 M tokens, so no text repeats;
#                                                 # or LONG_BATCH=8192: QS-2's own shard, read 0.94 times)
#   bash bench/frontier_session.sh ablate KNOB=V ...  # QS-2 seed 1: the preset with each knob set back, one run each
#   bash bench/frontier_session.sh add KNOB=V ...     # QS-2 seed 1: the card with each knob added, one run each
#                                                 # (the card's seeds spread 7x less than the preset's: smaller effects show)
#
# Logs go to $OUT as one tarball; the summary lines to stdout.
set -euo pipefail
OUT=${OUT:-/tmp/frontier_session}
SUMMARY="^(train_data|recurrence|averaging|quant_budget: chosen|final_|ttt_rank0|step:(240|${LONG_STEPS:-1000})/|peak_memory|artifact_bytes)"
source "$(dirname "$0")/qs2_common.sh"
# The longer comparison: QS-2's data and batch, but ITERATIONS=1000 with each arm's own EMA decay and warmdown
# (card 0.997 and 50% of the run, preset 0.9965 and 85%), one 32-sequence micro-batch a step (the same math as
# QS-2's 8 of 4 up to summation order; 8 launch-bound micro-batches would take 4x the time) and calibration on
# training sequences (self-generation at the preset's depth takes 80 s), so that both arms fit one call.
# LONG_BATCH=8192 reads 1000 x 8,192 tokens: 0.94 of QS-2's training split, so no sequence is seen twice.
LONG=(TRAIN_BATCH_TOKENS=${LONG_BATCH:-65536} ITERATIONS=${LONG_STEPS:-1000} GRAD_ACCUM_STEPS=1 WARMUP_STEPS=20
      MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 EVAL_STRIDE=64 GPTQ_CALIBRATION=train)
run_arm() {  # ARM SEED [PREFIX PROTOCOL...]: one run of the card (the defaults) or of PRESET=frontier, QS-2 by default
  case $1 in card) local preset=() ;; frontier) local preset=(PRESET=frontier) ;; *) echo "arm is card or frontier" >&2; exit 2 ;; esac
  local arm=$1 seed=$2 prefix=${3:-qs2} protocol=("${@:4}")
  [ ${#protocol[@]} -gt 0 ] || protocol=("${QS2[@]}")
  run "${prefix}_${arm}_s$seed" "${protocol[@]}" SEED="$seed" "${preset[@]}"
}

case "${1:-}" in
  ttt)
    install
    for lr in 0 0.003 0.01; do
      run "qs2_ttt_lr$lr" EVAL_ONLY=.carry/artifacts/qs2_default_s2.ptz EVAL_STRIDE=64 TTT_ENABLED=1 TTT_LR=$lr
    done
    ;;
  pair)
    install
    seed=${2:?pair needs a seed}
    run_arm card "$seed"
    run_arm frontier "$seed"
    ;;
  runs)  # ARM:SEED ..., e.g. frontier:1 card:1 frontier:2 (the later runs of an arm reuse its compiled graphs)
    install
    for spec in "${@:2}"; do
      run_arm "${spec%%:*}" "${spec#*:}"
    done
    ;;
  long)  # ARM:SEED ..., e.g. card:1 frontier:1
    install
    for spec in "${@:2}"; do
      run_arm "${spec%%:*}" "${spec#*:}" "qs2long${LONG_STEPS:-1000}${LONG_BATCH:+b$LONG_BATCH}" "${LONG[@]}" ${LONG_DATA:+DATA_PATH=$LONG_DATA}
    done
    ;;
  speed)  # full-batch ms/step (bench_train.py, 786,432 tokens in 8 accumulation steps): NAME[:PASSES]=KNOB+KNOB ...
    install  # e.g. card= frontier:1=PRESET=frontier frontier:3=PRESET=frontier mlp4=MLP_MULT=4 (two calls for ~10)
    for spec in "${@:2}"; do
      name=${spec%%=*} knobs=${spec#*=} passes=
      [[ $name == *:* ]] && passes=${name#*:} && name=${name%%:*}
      IFS=+ read -ra env_knobs <<< "$knobs"
      echo "== speed $name${passes:+ passes $passes}: ${env_knobs[*]}"
      log="$OUT/speed_${name}${passes}.txt"
      DATA_PATH=${SPEED_DATA:-$DATA_PATH} env "${env_knobs[@]}" python bench/bench_train.py --steps 20 \
        ${passes:+--passes "$passes"} > "$log" 2>&1 \
        || echo "rc=$?"
      grep -E "^(device|attention|\| [0-9])" "$log" || tail -3 "$log"
    done
    ;;
  ablate|add)  # e.g. MLP_MULT=3 "RECUR_LAYERS= RECUR_AT=" (a quoted pair is one run)
    install
    [ "$1" = ablate ] && base=(PRESET=frontier) arm=frontier || base=() arm=card
    for knob in "${@:2}"; do
      read -ra knobs <<< "$knob"
      run "qs2_${arm}_${knob%%=*}" "${QS2[@]}" SEED=1 "${base[@]}" "${knobs[@]}"
    done
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
tar czf "$OUT/logs_$1.tar.gz" logs/*.txt logs/*.out 2>/dev/null || true
