#!/usr/bin/env bash
# The one-GPU regression check (issue 41, item 1) in one device call of under 10 minutes: the CUDA tests of the
# kernels and the model, `dist-moe train medium` for 40 steps, the attention and MoE-layer benchmarks. Each item
# writes its log to $OUT as it finishes, so a call cut short keeps what it measured.
#
#   bash bench/gpu_check.sh [ITEM ...]     # items: tests train attention moe (default: all, in that order)
#
# On a bare GPU machine (torch + triton, no internet) it first installs the wheels in .whl/ (deepspeed,
# omegaconf, tensorboard, ...) into /tmp/site and runs the checkout from PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import dist_moe, omegaconf, deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  ln -sfn ../configs dist_moe/presets
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'deepspeed', deepspeed.__version__)" 2>&1 | grep -v Warning | tail -1 | tee -a "$OUT/gpu.txt"

items=("$@"); [[ ${#items[@]} -eq 0 ]] && items=(tests train attention moe)
for item in "${items[@]}"; do
  echo "=== $item $(date -u +%H:%M:%S)"
  case $item in
    tests)  # bf16 on the GPU; MoBA's own tests run in bench/gpu_moba.sh
      workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")  # Triton compiles on CPUs
      timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider "${workers[@]}" --timeout 180 tests/kernels tests/model \
        --ignore tests/kernels/test_moba_kernel.py --ignore tests/model/test_moba.py > "$OUT/tests.txt" 2>&1
      echo "rc=$?"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3 ;;
    train)
      timeout 280 python3 -c "from dist_moe.cli import main; main()" train medium train.max_steps=40 \
        data.max_corpus_mb=20 log.every=5 log.expert_every=1000 train.eval_every=1000 ckpt.every=100000 \
        run_dir=/tmp/run_medium > "$OUT/train_medium.log" 2>&1
      echo "rc=$?"; grep -E "model:|step |error" "$OUT/train_medium.log" | tail -12 ;;
    attention)
      timeout 150 python3 bench/attention.py --out-dir "$OUT" > "$OUT/attention.txt" 2>&1
      echo "rc=$?"; grep -v "^{" "$OUT/attention.txt" | tail -14 ;;
    moe)
      timeout 150 python3 bench/moe_layer.py --shapes all --out-dir "$OUT" > "$OUT/moe_layer.txt" 2>&1
      echo "rc=$?"; grep -v "^{" "$OUT/moe_layer.txt" | tail -16 ;;
    *) echo "unknown item '$item' (tests train attention moe)"; exit 2 ;;
  esac
done
