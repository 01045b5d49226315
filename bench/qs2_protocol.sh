# Sourced by bench/quant.sh and bench/frontier.sh: the QS-2 protocol (two configurations compared at equal steps on
# one GPU: english_mix in sp1024, its last 400 documents held out as validation; docs/QUANT.md), and
# `run NAME KNOB=VALUE...`, which runs train_gpt.py as logs/NAME.txt and prints the log lines matching $SUMMARY.
# QS2_DATA: the shards of `python data/build_qs2.py DIR` (data/README.md; default data/datasets/qs2), tokenizer
# included. A stage run again needs its earlier logs/NAME.* moved away: train_gpt.py never overwrites a run.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export DATA_PATH=${QS2_DATA:-data/datasets/qs2} PYTHONUNBUFFERED=1
export TOKENIZER_PATH=${TOKENIZER_PATH:-$DATA_PATH/tokenizer.model}
if [ ! -f "$DATA_PATH/fineweb_train_000000.bin" ]; then
  echo "no QS-2 shards in $DATA_PATH: build them with python data/build_qs2.py $DATA_PATH, or set QS2_DATA" >&2
  exit 1
fi
mkdir -p logs
QS2=(TRAIN_BATCH_TOKENS=65536 ITERATIONS=240 WARMDOWN_ITERS=100 WARMUP_STEPS=20 EMA_DECAY=0.98
     MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 EVAL_STRIDE=64)
run() {
  local name=$1; shift
  echo "== $name: $*"
  env "$@" RUN_ID="$name" python train_gpt.py > "logs/$name.out" 2>&1 && echo "rc=0" || echo "rc=$?"
  grep -E "$SUMMARY" "logs/$name.txt" || tail -5 "logs/$name.out"
}
