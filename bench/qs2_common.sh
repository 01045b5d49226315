# Sourced by the staged GPU sessions (quant_session.sh, frontier_session.sh): the QS-2 protocol of SPEC §7 on the
# carried shards, and `run NAME KNOB=VALUE...`, which runs train_gpt.py and prints the lines matching $SUMMARY.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT" logs
export DATA_PATH=.carry/qs2 TOKENIZER_PATH=.carry/fineweb_1024_bpe.model PYTHONUNBUFFERED=1
QS2=(TRAIN_BATCH_TOKENS=65536 ITERATIONS=240 WARMDOWN_ITERS=100 WARMUP_STEPS=20 EMA_DECAY=0.98
     MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 EVAL_STRIDE=64)

install() { python -m pip install --no-deps -q .carry/wheels/*.whl 2>&1 | grep -v WARNING || true; }
run() {
  local name=$1; shift
  echo "== $name: $*"
  env "$@" RUN_ID="$name" python train_gpt.py > "logs/$name.out" 2>&1 && echo "rc=0" || echo "rc=$?"
  grep -E "$SUMMARY" "logs/$name.txt" || tail -5 "logs/$name.out"
  cp "logs/$name.txt" "$OUT/" 2>/dev/null || true  # each finished run's log comes back even if a later one times out
}
