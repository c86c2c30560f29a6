#!/bin/bash
# Scratch: end-to-end variants of the medium preset on one GPU (not committed).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
ln -sfn ../kernels dist_moe/kernels; ln -sfn ../configs dist_moe/presets; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
run() {  # tag, V, overrides...
  tag=$1; v=$2; shift 2
  echo "=== $tag (V=$v) $*"
  V=$v timeout 200 python3 scratch/variant.py medium train.max_steps=12 data.max_corpus_mb=20 log.every=1 \
    log.expert_every=1000 train.eval_every=1000 --skip 4 --active 2 --out-dir $OUT run_dir=/tmp/run_$tag --tag $tag \
    model.num_heads=12 "$@" 2>&1 | grep -E "step |Wall|Peak|Engine|Error|error|Traceback|Killed" | tail -16
}
for spec in "$@"; do eval "run $spec"; done
