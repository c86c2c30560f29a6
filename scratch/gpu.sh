#!/bin/bash
# Scratch: this stop's GPU call (not committed).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
ln -sfn ../kernels dist_moe/kernels; ln -sfn ../configs dist_moe/presets; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
echo "=== gpu tests"; timeout 150 python3 -m pytest -q -x tests/kernels/test_cross_entropy_kernel.py tests/kernels/test_rope_kernel.py 2>&1 | tail -5
echo "=== bench"; timeout 120 python3 bench/cross_entropy.py --out-dir $OUT 2>&1 | grep -v '^{' | tail -14
run() {  # tag, V, overrides...
  tag=$1; v=$2; shift 2
  echo "=== $tag (V=$v) $*"
  V=$v timeout 200 python3 scratch/variant.py medium train.max_steps=12 data.max_corpus_mb=20 log.every=1 \
    log.expert_every=1000 train.eval_every=1000 --skip 4 --active 2 --out-dir $OUT run_dir=/tmp/run_$tag --tag $tag \
    "$@" 2>&1 | grep -E "model:|step |Wall|Peak|Engine|Error|error|Traceback|Killed" | tail -16
}
run ce ""
run oldce oldce
echo "=== cli"; timeout 260 python3 -c "from dist_moe.cli import main; main()" train medium train.max_steps=40 \
  data.max_corpus_mb=20 log.every=5 log.expert_every=1000 train.eval_every=1000 ckpt.every=100000 run_dir=/tmp/run \
  > $OUT/train_medium.log 2>&1; echo rc=$?; grep -v "^\s*$" $OUT/train_medium.log | tail -16
