#!/usr/bin/env bash
# The GPU measurements of docs/QUANT.md (the byte budget, card fidelity), in stages that each fit one 10-minute
# call on a lent machine that cannot download. Run `prepare` here first; .carry/ (git-ignored) then travels with
# the working tree (the device tool's `carry: [".carry"]`).
#
#   bash bench/quant_session.sh prepare   # here: the QS-2 shards (SPEC §7), the sp1024 tokenizer, the zstandard wheel
#   bash bench/quant_session.sh qs2       # GPU: QS-2, the record's exact run (QUANT_MODE=card GPTQ_ENABLED=0) and
#                                         # the default, 2 seeds each, and a 40-step default run
#   bash bench/quant_session.sh qs2b      # GPU: a second seed of the record's exact run, and quant_sweep.py on its weights
#   bash bench/quant_session.sh fidelity  # GPU: the record's compile-folded QAT flag, and QS-2 with QAT off, 2 seeds
#   bash bench/quant_session.sh long      # GPU: 5000 steps of the 8-GPU run's per-GPU batch (98,304 tokens, grad-accum 1)
#   bash bench/quant_session.sh longsweep # GPU, right after long: quant_sweep.py on its weights
#   bash bench/quant_session.sh final     # GPU: a card-mode artifact, the QS-2 default and a 40-step default run
#   bash bench/quant_session.sh lqer      # GPU: the default on seed 2, LQER and act-order priced on its weights
#
# Logs and tables go to $OUT (the device tool's result folder) as one tarball plus a few files.
set -euo pipefail
OUT=${OUT:-/tmp/quant_session}
SUMMARY='^(late_qat|averaging|gptq_calibration|quant_budget|quantize_compress_time|Total submission|final_int6|artifact_|step:240/|peak_memory|stopping)'
source "$(dirname "$0")/qs2_common.sh"
pack() { tar czf "$OUT/logs_$1.tar.gz" logs/*.txt logs/*.out 2>/dev/null || true; }

case "${1:-}" in
  prepare)
    mkdir -p .carry/wheels
    python ../shared/tools/build_qs2.py .carry/qs2
    cp ../shared/data/tokenizers/fineweb_1024_bpe.model .carry/
    cp ../shared/wheels/zstandard-*cp312*.whl .carry/wheels/
    du -sh .carry
    ;;
  qs2)
    install
    python -m pytest -q -p no:cacheprovider tests/test_quant.py -k cuda 2>&1 | tail -2
    run qs2_card_s1 "${QS2[@]}" SEED=1 QUANT_MODE=card GPTQ_ENABLED=0 SAVE_WEIGHTS=1
    run qs2_default_s1 "${QS2[@]}" SEED=1 SAVE_WEIGHTS=1
    cp logs/qs2_default_s1.ptz "$OUT/"
    run qs2_card_s2 "${QS2[@]}" SEED=2 QUANT_MODE=card GPTQ_ENABLED=0
    run qs2_default_s2 "${QS2[@]}" SEED=2
    run qs2_default_40steps "${QS2[@]}" SEED=1 ITERATIONS=40 WARMDOWN_ITERS=17
    pack qs2
    ;;
  qs2b)  # a second card seed, its weights swept
    install
    run qs2_card_s2 "${QS2[@]}" SEED=2 QUANT_MODE=card GPTQ_ENABLED=0 SAVE_WEIGHTS=1
    echo "== quant_sweep qs2_card_s2"
    timeout 330 python bench/quant_sweep.py logs/qs2_card_s2.weights.pt --out "$OUT/sweep_qs2_card_s2.md" \
      --only card,lite,sdclip_rtn_m0.5,sdclip_gptq_m0.5,sdclip_gptq_m1.0,gptq_at_card_bytes,default_budget,budget_embed_int8 \
      2>&1 | grep -v Warning || true
    pack qs2b
    ;;
  fidelity)  # issue 22: does the record's late QAT fire under torch.compile, and our runs with it off
    install
    python .carry/fold.py 2>&1 | tail -2
    run qs2_card_noqat_s1 "${QS2[@]}" SEED=1 QUANT_MODE=card GPTQ_ENABLED=0 LATE_QAT_THRESHOLD=0
    run qs2_card_noqat_s2 "${QS2[@]}" SEED=2 QUANT_MODE=card GPTQ_ENABLED=0 LATE_QAT_THRESHOLD=0
    pack fidelity
    ;;
  long)  # the long checkpoint of docs/QUANT.md: ~the record's step count at its per-GPU batch
    install
    # english_mix holds 8.67 M training tokens: 5000 steps of 98,304 tokens read it ~57 times
    timeout 585 env TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 ITERATIONS=5000 MAX_WALLCLOCK_SECONDS=0 \
      VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1000 RUN_ID=long5000 SAVE_WEIGHTS=1 python train_gpt.py \
      > logs/long5000.out 2>&1 && echo "rc=0" || echo "rc=$?"
    grep -E "$SUMMARY|^step:[0-9]+000/" logs/long5000.txt || tail -20 logs/long5000.out
    cp logs/long5000.ptz "$OUT/" 2>/dev/null || true
    pack long
    ;;
  longsweep)  # right after `long`, on the same machine: the rate-distortion table of its weights
    echo "== quant_sweep long5000"
    timeout 580 python bench/quant_sweep.py logs/long5000.weights.pt --out "$OUT/sweep_long5000.md" \
      --only card,lite,sdclip_rtn_m0.5,sdclip_gptq_m0.5,sdclip_gptq_m1.0,gptq_at_card_bytes,default_budget \
      2>&1 | grep -v Warning || true
    ;;
  final)  # the defaults after issue 22 (QAT off): a card-mode artifact to measure containers on, QS-2 default, 40 steps
    install
    run qs2_card_noqat_s1b "${QS2[@]}" SEED=1 QUANT_MODE=card GPTQ_ENABLED=0
    cp logs/qs2_card_noqat_s1b.ptz "$OUT/"
    run qs2_default_noqat_s1 "${QS2[@]}" SEED=1
    run qs2_default_noqat_40steps "${QS2[@]}" SEED=1 ITERATIONS=40 WARMDOWN_ITERS=17
    pack final
    ;;
  lqer)  # the default (rows sorted) on a second seed, and LQER / act-order priced on its weights
    install
    run qs2_default_s2 "${QS2[@]}" SEED=2 SAVE_WEIGHTS=1
    cp logs/qs2_default_s2.ptz "$OUT/"
    echo "== quant_sweep qs2_default_s2"
    timeout 240 python bench/quant_sweep.py logs/qs2_default_s2.weights.pt --out "$OUT/sweep_qs2_default_s2.md" \
      --only card,default_budget,budget_lqer_r4_top3,budget_act_order 2>&1 | grep -v Warning || true
    pack lqer
    ;;
  *)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
