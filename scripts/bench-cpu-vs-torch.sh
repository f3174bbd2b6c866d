#!/usr/bin/env bash
# `pipeline bench train` against PyTorch eager (../shared/peers/crossmae_torch.py) on the
# same shapes and threads, interleaved, plus the near-zero-FLOP 224 px shape fused vs
# reference ops. Needs a release build and a Python with torch + timm ($PY).
#   PY=/path/to/venv/bin/python scripts/bench-cpu-vs-torch.sh [ROUNDS]
# GEMMS="openblas avx512" runs ours once per GEMM backend (CROSSMAE_GEMM) in each round.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/pipeline}
PY=${PY:-python3}
PEER=${PEER:-../shared/peers/crossmae_torch.py}
export RAYON_NUM_THREADS=${T:-2} CANDLE_NUM_THREADS=1
TINY=(--set stages.channels=1 --set model.backbone.in_chans=1 --set model.backbone.embed_dim=192 --set model.backbone.depth=6
      --set model.backbone.num_heads=3 --set model.draw.embed_dim=128 --set model.draw.num_heads=4
      --set model.target_dim=36)
VITS=(--set model.draw.embed_dim=256 --set model.draw.num_heads=8)
PIX=(--set model.backbone.embed_dim=16 --set model.backbone.depth=1 --set model.backbone.num_heads=1
     --set model.draw.embed_dim=16 --set model.draw.num_heads=1 --set model.draw.depth=1)
ms() { python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r=r.get('result', r); print(round(r.get('median_ms', r.get('step_ms_median', 0)), 1))"; }
GEMMS=${GEMMS:-default}
gemm_env() { if [ "$1" = default ]; then echo; else echo "CROSSMAE_GEMM=$1"; fi; }
for round in $(seq "${1:-2}"); do
  for g in $GEMMS; do
    a=$(env $(gemm_env "$g") $BIN bench train configs/pretrain.yaml --batch 64 --steps 10 "${TINY[@]}" | ms)
    echo "{\"round\":$round,\"shape\":\"fmnist-tiny b64\",\"gemm\":\"$g\",\"ours_ms\":$a}"
  done
  b=$($PY "$PEER" bench --preset fmnist-tiny --batch 64 --steps 10 --threads "$RAYON_NUM_THREADS" --targets-outside | ms)
  echo "{\"round\":$round,\"shape\":\"fmnist-tiny b64\",\"torch_ms\":$b,\"ratio_of\":\"$g\",\"ratio\":$(python3 -c "print(round($a/$b,3))")}"
  for g in $GEMMS; do
    a=$(env $(gemm_env "$g") $BIN bench train configs/vit-s16-imagenet.yaml --batch 8 --steps 4 --warmup 1 "${VITS[@]}" | ms)
    echo "{\"round\":$round,\"shape\":\"vit-s16 b8\",\"gemm\":\"$g\",\"ours_ms\":$a}"
  done
  b=$($PY "$PEER" bench --preset vit-s16 --batch 8 --steps 4 --threads "$RAYON_NUM_THREADS" --targets-outside | ms)
  echo "{\"round\":$round,\"shape\":\"vit-s16 b8\",\"torch_ms\":$b,\"ratio_of\":\"$g\",\"ratio\":$(python3 -c "print(round($a/$b,3))")}"
  a=$(RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 $BIN bench train configs/vit-b16-imagenet.yaml --batch 64 --steps 4 --warmup 1 "${PIX[@]}" | ms)
  b=$(RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 $BIN bench train configs/vit-b16-imagenet.yaml --batch 64 --steps 4 --warmup 1 "${PIX[@]}" --set model.reference_ops=true | ms)
  echo "{\"round\":$round,\"shape\":\"224px near-zero FLOP b64, 1 thread\",\"fused_ms\":$a,\"reference_ops_ms\":$b,\"ratio\":$(python3 -c "print(round($a/$b,3))")}"
done
