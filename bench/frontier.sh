#!/usr/bin/env bash
# The measurements of docs/FRONTIER.md and docs/TTT.md on your own CUDA machine, on the QS-2 protocol
# (bench/qs2_protocol.sh; QS2_DATA names its shards).
#
#   bash bench/frontier.sh pair SEED                  # the card and PRESET=frontier on one seed (~8 min on an H100)
#   bash bench/frontier.sh runs ARM:SEED ...          # QS-2 runs, ARM card or frontier, e.g. frontier:1 card:1 frontier:2
#   bash bench/frontier.sh speed NAME[:PASSES]=K=V+K=V ...  # full-batch ms/step (bench_train.py), e.g. card= \
#                                                     # frontier:1=PRESET=frontier frontier:3=PRESET=frontier mlp4=MLP_MULT=4
#                                                     # (SPEED_DATA=DIR: other training shards)
#   bash bench/frontier.sh long ARM:SEED ...          # ITERATIONS=1000 (LONG_STEPS), each arm's own EMA and warmdown
#                                                     # (LONG_DATA=DIR: shards with >= 65 M tokens, so no text repeats;
#                                                     # or LONG_BATCH=8192: QS-2's own shard, read 0.94 times)
#   bash bench/frontier.sh ablate KNOB=V ...          # seed 1: the preset with each knob set back, one run each
#   bash bench/frontier.sh add KNOB=V ...             # seed 1: the card with each knob added, one run each
#                                                     # (a quoted "K=V K=V" is one run)
#   bash bench/frontier.sh stack ARM:SEED ...         # the 1.0611 stack on QS-2 with GRAD_ACCUM_STEPS=1 (one 32-sequence
#                                                     # micro-batch a step: the same sum, 4x faster), ARM one of
#                                                     # frontier, earlier (the preset before DOC_ATTENTION, the record's
#                                                     # values and TTT), nodoc, novalues (frontier with that part set back);
#                                                     # sp8192: QS2_DATA=<build_qs2.py --tokenizer ...8192> VOCAB_SIZE=8192
#   bash bench/frontier.sh ttt ARTIFACT [TTT_LR ...]  # EVAL_ONLY on a QS-2 artifact with TTT at each rate
#                                                     # (default 0 0.003 0.01), e.g. logs/qs2_default_s2.ptz
#
# Logs: logs/<RUN>.txt (bench_train.py's tables: $RESULTS, default logs/bench/); the summary lines go to stdout.
set -euo pipefail
SUMMARY="^(train_data|recurrence|averaging|quant_budget: chosen|final_|ttt_rank0|step:(240|${LONG_STEPS:-1000})/|peak_memory|artifact_bytes)"
case "${1:-}" in pair|runs|speed|long|ablate|add|stack|ttt) source "$(dirname "$0")/qs2_protocol.sh" ;; esac
# The longer comparison: QS-2's data and batch, but ITERATIONS=1000 with each arm's own EMA decay and warmdown
# (card 0.997 and 50% of the run, preset 0.9965 and 85%), one 32-sequence micro-batch a step (the same math as
# QS-2's 8 of 4 up to summation order; 8 launch-bound micro-batches would take 4x the time) and calibration on
# training sequences (self-generation at the preset's depth takes 80 s).
LONG=(TRAIN_BATCH_TOKENS=${LONG_BATCH:-65536} ITERATIONS=${LONG_STEPS:-1000} GRAD_ACCUM_STEPS=1 WARMUP_STEPS=20
      MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 EVAL_STRIDE=64 GPTQ_CALIBRATION=train)
# What `stack`'s arms set back: the preset's values before it took the 1.0611 record's, and TTT's defaults
EARLIER_VALUES=(ROPE_TRAIN_LEN=1024 RECUR_AT=0.35,0.5 MATRIX_LR=0.025 TIED_EMBED_LR=0.035 SCALAR_LR=0.025
                MUON_WEIGHT_DECAY=0.04 EMBED_WEIGHT_DECAY=0.04 ADAM_WEIGHT_DECAY=0.04 SDCLIP_K_MLP=12.0
                SDCLIP_K_ATTN=12.85 SDCLIP_K_EMBED=20.0 EMBED_BITS=8)
EARLIER_TTT=(TTT_LORA_RANK=8 TTT_LORA_ALPHA=0 TTT_LORA_TARGETS=q,v,head TTT_LR=0.003 TTT_BETA1=0.9 TTT_BETA2=0.999
             TTT_WEIGHT_DECAY=0 TTT_CHUNK=256 TTT_WARM_A=0 TTT_PHASES=1 TTT_PREFIX_DOCS=0 TTT_GLOBAL_LR=0
             TTT_GLOBAL_MOMENTUM=0 TTT_GLOBAL_CLIP=0)
run_arm() {  # ARM SEED [PREFIX PROTOCOL...]: one run of the card (the defaults) or of PRESET=frontier, QS-2 by default
  case $1 in
    card) local preset=() ;;
    frontier) local preset=(PRESET=frontier) ;;
    earlier) local preset=(PRESET=frontier DOC_ATTENTION=0 "${EARLIER_VALUES[@]}" "${EARLIER_TTT[@]}") ;;
    nodoc) local preset=(PRESET=frontier DOC_ATTENTION=0) ;;
    novalues) local preset=(PRESET=frontier "${EARLIER_VALUES[@]}") ;;
    *) echo "arm is card, frontier, earlier, nodoc or novalues" >&2; exit 2 ;;
  esac
  local arm=$1 seed=$2 prefix=${3:-qs2} protocol=("${@:4}")
  [ ${#protocol[@]} -gt 0 ] || protocol=("${QS2[@]}")
  run "${prefix}_${arm}_s$seed" "${protocol[@]}" SEED="$seed" "${preset[@]+"${preset[@]}"}"
}

case "${1:-}" in
  pair)
    seed=${2:?pair needs a seed}
    run_arm card "$seed"
    run_arm frontier "$seed"
    ;;
  runs)  # the later runs of an arm reuse its compiled graphs
    for spec in "${@:2}"; do
      run_arm "${spec%%:*}" "${spec#*:}"
    done
    ;;
  long)
    for spec in "${@:2}"; do
      run_arm "${spec%%:*}" "${spec#*:}" "qs2long${LONG_STEPS:-1000}${LONG_BATCH:+b$LONG_BATCH}" "${LONG[@]}" \
        ${LONG_DATA:+DATA_PATH=$LONG_DATA}
    done
    ;;
  speed)  # 786,432 tokens in 8 accumulation steps, 20 timed steps
    for spec in "${@:2}"; do
      name=${spec%%=*} knobs=${spec#*=} passes=
      [[ $name == *:* ]] && passes=${name#*:} && name=${name%%:*}
      IFS=+ read -ra env_knobs <<< "$knobs"
      echo "== speed $name${passes:+ passes $passes}: ${env_knobs[*]}"
      log="$RESULTS/speed_${name}${passes}.txt"
      DATA_PATH=${SPEED_DATA:-$DATA_PATH} env "${env_knobs[@]+"${env_knobs[@]}"}" python bench/bench_train.py \
        --steps 20 ${passes:+--passes "$passes"} > "$log" 2>&1 || echo "rc=$?"
      grep -E "^(device|attention|\| [0-9])" "$log" || tail -3 "$log"
    done
    ;;
  stack)
    for spec in "${@:2}"; do
      run_arm "${spec%%:*}" "${spec#*:}" "qs2v${VOCAB_SIZE:-1024}" "${QS2[@]}" GRAD_ACCUM_STEPS=1
    done
    ;;
  ablate|add)
    [ "$1" = ablate ] && base=(PRESET=frontier) arm=frontier || base=() arm=card
    for knob in "${@:2}"; do
      read -ra knobs <<< "$knob"
      run "qs2_${arm}_${knob%%=*}" "${QS2[@]}" SEED=1 "${base[@]+"${base[@]}"}" "${knobs[@]}"
    done
    ;;
  ttt)
    artifact=${2:?ttt needs the path of an artifact trained on QS-2}
    rates=("${@:3}")
    [ ${#rates[@]} -gt 0 ] || rates=(0 0.003 0.01)
    for lr in "${rates[@]}"; do
      run "qs2_ttt_$(basename "$artifact" .ptz)_lr$lr" EVAL_ONLY="$artifact" EVAL_STRIDE=64 TTT_ENABLED=1 TTT_LR="$lr"
    done
    ;;
  *)
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"
    exit 2
    ;;
esac
