#!/bin/bash
# Scratch: this stop's second GPU call (not committed).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
ln -sfn ../kernels dist_moe/kernels; ln -sfn ../configs dist_moe/presets; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
echo "=== bench"; timeout 120 python3 bench/cross_entropy.py --out-dir $OUT 2>&1 | grep -v '^{' | tail -14
run() {  # tag, V, overrides...
  tag=$1; v=$2; shift 2
  echo "=== $tag (V=$v) $*"
  V=$v timeout 200 python3 scratch/variant.py medium train.max_steps=12 data.max_corpus_mb=20 log.every=1 \
    log.expert_every=1000 train.eval_every=1000 --skip 4 --active 2 --out-dir $OUT run_dir=/tmp/run_$tag --tag $tag \
    "$@" 2>&1 | grep -E "step |Wall|Peak|Engine|Error|error|Traceback|Killed" | tail -16
}
run torchce torchce
run medium ""
run mb32 "" train.micro_batch_size=32 train.grad_accum_steps=4
echo "=== cli"; timeout 150 python3 -c "from dist_moe.cli import main; main()" train medium train.max_steps=6 \
  data.max_corpus_mb=20 log.every=2 log.expert_every=1000 train.eval_every=1000 ckpt.every=100000 run_dir=/tmp/run \
  > $OUT/train_medium_short.log 2>&1; echo rc=$?; grep -v "^\s*$" $OUT/train_medium_short.log | tail -12
