#!/usr/bin/env bash
# Benchmarks of the paper presets on one accelerator; results as JSON in ${OUT:-.}.
set -u
OUT=${OUT:-.}
run() {  # name, config, extra flags...
  name=$1; shift
  timeout 240 python3 launch/benchmark.py "$@" --out="$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "$name failed"
  tail -16 "$OUT/$name.log"
}
run mae_b16_xla --config=configs/mae.py:vit_b16_imagenet --config.batch_size=256 --steps=20
run mae_b16_cudnn --config=configs/mae.py:vit_b16_imagenet --config.batch_size=256 --config.model.attention_impl=cudnn --steps=20
run vit_b16_cudnn --config=configs/supervised.py:vit_b16_imagenet --config.batch_size=256 --config.model.attention_impl=cudnn --steps=20
