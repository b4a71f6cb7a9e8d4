#!/usr/bin/env bash
# Issue 21's side-by-side on one GPU: the PyTorch peers (../shared/bench/torch_peers*.py) and
# launch/benchmark.py on the same five workloads, in one run on one machine:
#   ViT-B/16 supervised (batch 256, 224 px), MAE ViT-B/16 (256), CLIP ViT-B/16 + 12-layer text
#   (256), DINO ViT-S/16 2x224 + 10x96 (128), DDPM U-Net 35.7M at 32 px (128);
# then the levers (attention implementation, dtype) while time is left.
#
#   OUT=/tmp/bench PEERS=../shared/bench bash launch/gpu_bench.sh
#
# Every result is one JSON line in $OUT/results.jsonl (fmjax rows: launch/benchmark.py's JSON
# plus "name"; peers: torch_peers' lines); logs in $OUT/bench.log. A failing or timed-out run
# writes an {"name", "error"} line and the rest go on.
set -u -o pipefail
OUT=${OUT:-.}
PEERS=${PEERS:-../shared/bench}
RES=$OUT/results.jsonl
LOG=$OUT/bench.log
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 - >>"$RES" 2>>"$LOG" <<'EOF'
import json, subprocess
import jax, jaxlib, flax, optax
v = dict(name="versions", jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
         optax=optax.__version__, devices=[d.device_kind for d in jax.devices()])
try:
    import torch, transformers
    v.update(torch=torch.__version__, transformers=transformers.__version__)
except Exception as e:  # noqa: BLE001
    v["torch_error"] = repr(e)[:200]
v["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps(v))
EOF
tail -1 "$RES"

peers() {  # timeout_s, script, workloads...
  local t=$1 script=$2; shift 2
  echo "== peers $script $*" >>"$LOG"
  timeout "$t" python3 "$PEERS/$script" "$@" 2>>"$LOG" | tee -a "$RES" \
    || echo "{\"name\": \"peers $script $*\", \"error\": \"failed or timed out ($t s)\"}" | tee -a "$RES"
}

fm() {  # name, timeout_s, benchmark flags...
  local name=$1 t=$2; shift 2
  echo "== fmjax $name: $*" >>"$LOG"
  rm -f "$OUT/last.json"
  if timeout "$t" python3 launch/benchmark.py "$@" --out="$OUT/last.json" >>"$LOG" 2>&1; then
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); r.pop('batch_spec', None); \
print(json.dumps(dict(name=sys.argv[2], **r)))" "$OUT/last.json" "$name" | tee -a "$RES"
  else
    echo "{\"name\": \"$name\", \"error\": \"failed or timed out ($t s); see bench.log\"}" | tee -a "$RES"
  fi
}

SUP="--config=configs/supervised.py:vit_b16_imagenet --config.batch_size=256 --steps=20"
MAE="--config=configs/mae.py:vit_b16_imagenet --config.batch_size=256 --steps=20"
# No BPE vocabulary on a benchmarking machine: the bytes tokenizer gives the same (B, 77) tokens.
CLIP=(--config=configs/clip.py:vit_b16 --config.batch_size=256 --steps=20
      "--config.data.pp_train=random_resized_crop(224, scale=(0.9, 1.0))|normalize('clip')|tokenize(context_length=77, tokenizer='bytes')|keep('image', 'tokens')"
      --config.data.tokenize.tokenizer=bytes)
DINO="--config=configs/dino.py:vit_s16_imagenet --config.batch_size=128 --steps=20"
DDPM="--config=configs/diffusion.py:ddpm_cifar10 --config.batch_size=128 --steps=30"

peers 240 torch_peers.py vit mae clip
fm vit_b16_sup_cudnn 150 $SUP --config.model.attention_impl=cudnn
fm mae_b16_cudnn 150 $MAE --config.model.attention_impl=cudnn
peers 180 torch_peers2.py dino ddpm
fm clip_b16_xla 180 "${CLIP[@]}"
fm dino_s16_xla 180 $DINO
fm ddpm_unet_bf16 150 $DDPM --config.dtype=bfloat16
# Levers, while time is left.
fm ddpm_unet_f32 150 $DDPM
fm vit_b16_sup_xla 150 $SUP --config.model.attention_impl=xla
fm dino_s16_cudnn 180 $DINO --config.model.attention_impl=cudnn
fm clip_b16_cudnn 180 "${CLIP[@]}" --config.model.attention_impl=cudnn
fm mae_b16_xla 150 $MAE --config.model.attention_impl=xla
echo "{\"name\": \"done\"}" | tee -a "$RES"
