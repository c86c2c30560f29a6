#!/usr/bin/env bash
# MoBA on one GPU: the kernel tests in bf16 (GQA included) and bench/moba.py end to end (gate + index + forward
# + backward) beside FlexAttention and dense flash in one call of ~9 minutes; the 32K training runs (MoBA, then
# full attention) in another (~6). Each item writes to $OUT as it finishes: a call cut short keeps what it measured.
#
#   bash bench/gpu_moba.sh [ITEM ...]     # items: tests bench train (default: tests bench)
#
# MOBA_SHAPES (bench/moba.py --shapes), MOBA_TESTS (pytest -k), TRAIN_STEPS and the *_S time limits override the
# defaults. On a bare GPU machine it installs the wheels in .whl/ (or ../../.whl/) into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_moba}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import dist_moe, omegaconf" 2>/dev/null; then
  whl=.whl; [[ -d $whl ]] || whl=../../.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$whl"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  ln -sfn ../configs dist_moe/presets
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"

SHAPES=${MOBA_SHAPES:-131072:128,524288:128,131072:128:correlated,32768:128}
IMPLS=${MOBA_IMPLS:-end to end,given choice,Flex,dense}  # the PyTorch MoBA is far slower and left out

train() {  # $1: run name, the rest: overrides
  local name=$1; shift
  timeout "${TRAIN_S:-170}" python3 -c "from dist_moe.cli import main; main()" train small \
    data.seq_len=32768 model.max_seq_len=32768 train.micro_batch_size=1 train.max_steps="${TRAIN_STEPS:-30}" \
    train.warmup_steps=5 train.eval_every=100000 train.eval_batches=1 data.max_corpus_mb=20 log.every=5 \
    log.expert_every=100000 ckpt.every=100000 run_dir="/tmp/run_$name" "$@" > "$OUT/train_$name.log" 2>&1
  echo "rc=$?"; grep -E "model:|step |rror" "$OUT/train_$name.log" | tail -9
}

items=("$@"); [[ ${#items[@]} -eq 0 ]] && items=(tests bench)
for item in "${items[@]}"; do
  echo "=== $item $(date -u +%H:%M:%S)"
  case $item in
    tests)
      timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_kernel.py \
        tests/model/test_moba.py -k "${MOBA_TESTS:-not fp16 and not fp32}" > "$OUT/tests.txt" 2>&1
      echo "rc=$?"; grep -E "passed|failed|FAILED|rror" "$OUT/tests.txt" | tail -8 ;;
    bench)
      timeout "${BENCH_S:-360}" python3 bench/moba.py --out-dir "$OUT" --impls "$IMPLS" --shapes "$SHAPES" \
        > "$OUT/bench.txt" 2>&1
      echo "rc=$?"; grep -v "^{" "$OUT/bench.txt" | tail -30 ;;
    train)
      train moba model.attention=moba
      train full ;;
    *) echo "unknown item '$item' (tests bench train)"; exit 2 ;;
  esac
done
