#!/usr/bin/env bash
# The GPU check of the CUDA build (issue 8), for a machine with an NVIDIA GPU and driver:
# run from the repository root with the binary that scripts/build-cuda.sh made.
#
#   scripts/gpu-check.sh     # JSON lines and logs into $OUT (default gpu-check-out/)
#
# 1. Run-time libraries: finds the CUDA 13 libraries (libcudart/libcublas/libcurand/libnvrtc.so.*)
#    of the machine's CUDA install or Python wheels and checks that ldd resolves them all.
# 1b. Op checks (`pipeline check-ops`): each fused op's CUDA kernels against its CPU kernels at
#    ViT-B/16's shapes, value and every input gradient, f32 and bf16; AdamW's update bitwise.
# 2. Smoke test: the tiny Fashion-MNIST preset trains 12 batches on cpu, cuda:0 (f32) and
#    cuda:0 (bf16); the per-batch losses must agree with the CPU's (f32 within 2e-3, bf16 within
#    1e-2 relative; the bf16 tolerance is the CPU test's, stages/tests/model_training.rs).
# 3. `bench train` of ViT-S/16 and ViT-B/16 at 224 px in bf16 at the largest batch of a
#    descending list that fits: ms/step, images/s and model FLOP utilization (peak 989 TFLOP/s);
#    then PyTorch eager on the same model and batch in the same script (the peer
#    crossmae_torch.py, bf16 autocast, SDPA, targets given), and the ratio of images/s.
#    The peer comes from PEER (default: target-cuda/carry/crossmae_torch.py, which
#    scripts/build-cuda.sh copies from ../shared/peers, or ../shared/peers itself).
# Budget: one deadline for the whole script (GPU_CHECK_BUDGET_S, default 540 s, under the
# device's 600 s per command); every step's time limit is cut to what is left of it. Our two
# benches run first, then PyTorch at the batches ours ran. Exits 1 when any record is ok:false.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-$repo/gpu-check-out}"
mkdir -p "$out"
bin="${PIPELINE_BIN:-$repo/target-cuda/release/pipeline}"
if [[ ! -x "$bin" && -f "$repo/target-cuda/carry/pipeline.gz" ]]; then
    # The carried form (scripts/build-cuda.sh): stripped and gzipped.
    bin=/tmp/pipeline-cuda
    gunzip -c "$repo/target-cuda/carry/pipeline.gz" >"$bin" && chmod +x "$bin"
fi
results="$out/gpu-check.jsonl"
: >"$results"
started=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-540}
limit() { # seconds a step may take: WANT, or what is left of the budget if less
    local left=$((budget - ($(date +%s) - started)))
    left=$((left < $1 ? left : $1))
    echo $((left < 1 ? 1 : left)) # never 0: `timeout 0` would mean no limit
}
log() { echo "[$(($(date +%s) - started))s] $*" | tee -a "$out/gpu-check.log"; }
note() { # key=value pairs as one JSON line; true/false become booleans
    python3 -c 'import json,sys; kv=(a.split("=",1) for a in sys.argv[1:]); print(json.dumps({k: {"true": True, "false": False}.get(v, v) for k, v in kv}))' "$@" >>"$results"
}

# --- 1. libraries --------------------------------------------------------------------------------
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed (see nvidia-smi.txt)"
libdirs=""
candidates="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib"
if command -v python3 >/dev/null; then
    # NVIDIA's wheels (as PyTorch installs them): .../site-packages/nvidia/cu13/lib and nvidia/*/lib.
    site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    for s in $site; do candidates="$candidates $(ls -d "$s"/nvidia/cu13/lib "$s"/nvidia/*/lib 2>/dev/null | tr '\n' ' ')"; done
fi
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    for d in $candidates; do
        if [[ -e "$d/$lib" ]]; then
            case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
            break
        fi
    done
done
# Libraries carried with the binary (scripts/build-cuda.sh: carry/lib), e.g. libjpeg.so.62.
[[ -d "$repo/target-cuda/carry/lib" ]] && libdirs="$libdirs:$repo/target-cuda/carry/lib"
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$bin" >"$out/ldd.txt" 2>&1
if grep -q 'not found' "$out/ldd.txt"; then
    log "missing run-time libraries:"; grep 'not found' "$out/ldd.txt" | tee -a "$out/gpu-check.log"
    note check=libraries ok=false
    exit 1
fi
note check=libraries ok=true
log "binary: $("$bin" --version 2>&1 | head -1)"

# --- 1b. op checks: CUDA kernels against the CPU's ------------------------------------------------
timeout "$(limit 180)" "$bin" check-ops --device cuda:0 --batch 4 >"$out/check-ops.jsonl" 2>"$out/check-ops.log"
rc=$?
cat "$out/check-ops.jsonl" >>"$results"
log "op checks: rc $rc, $(grep -c '"ok":true' "$out/check-ops.jsonl") ok, $(grep -c '"ok":false' "$out/check-ops.jsonl") off; $(tail -1 "$out/check-ops.log")"
note check="op checks" ok=$([[ $rc == 0 ]] && echo true || echo false) rc=$rc

# --- 2. smoke test: tiny preset, CPU vs CUDA -----------------------------------------------------
tiny=(--set "data.train=['../shards/data/fashion-mnist/train-000000.tar.zst']" --set data.lanes=1
    --set train.epochs=1 --set train.batch_size=100 --set "eval.after_run_samples=[200, 200]")
smoke() { # name, extra --set args...
    local name=$1
    shift
    rm -rf "$out/smoke-$name"
    timeout "$(limit 150)" "$bin" run configs/pretrain.yaml -w 4 "${tiny[@]}" --set "run.dir=$out/smoke-$name" "$@" \
        >"$out/smoke-$name.log" 2>&1
    local rc=$?
    log "smoke $name: rc $rc, $(grep -o 'trained [0-9]* batches' "$out/smoke-$name.log" | head -1)"
    return $rc
}
smoke cpu --set train.device=cpu
smoke cuda-f32 --set train.device=cuda:0 --set train.precision=f32
smoke cuda-bf16 --set train.device=cuda:0 --set train.precision=bf16
python3 - "$out" >>"$results" <<'EOF'
import json, sys, os
out = sys.argv[1]
def losses(name):
    path = os.path.join(out, f"smoke-{name}", "metrics.jsonl")
    if not os.path.exists(path):
        return None
    steps = [json.loads(l) for l in open(path)]
    return [(s["batch"], s["loss"], s["batch_digest"], s["data_wait_s"], s["step_s"]) for s in steps if s.get("kind") == "step"]
cpu = losses("cpu")
for name, tol in [("cuda-f32", 2e-3), ("cuda-bf16", 1e-2)]:
    dev = losses(name)
    rec = {"check": f"smoke {name} vs cpu", "tolerance": tol}
    if not cpu or not dev:
        rec.update(ok=False, error="a run wrote no steps (see its log)")
    else:
        rel = [abs(a[1] - b[1]) / abs(a[1]) for a, b in zip(cpu, dev)]
        rec.update(
            steps=len(dev), same_batches=[a[2] for a in cpu] == [b[2] for b in dev],
            max_rel_loss_diff=max(rel), ok=len(cpu) == len(dev) and max(rel) <= tol,
            cpu_losses=[a[1] for a in cpu], losses=[b[1] for b in dev],
            data_wait_fraction=sum(b[3] for b in dev) / max(1e-9, sum(b[3] + b[4] for b in dev)),
        )
    print(json.dumps(rec))
EOF
tail -2 "$results" | cut -c1-300 | tee -a "$out/gpu-check.log"

# --- 3. bench train: ViT-S/16 and ViT-B/16 at 224, bf16, largest batch that fits; then PyTorch ----
peer="${PEER:-}"
for p in "$repo/target-cuda/carry/crossmae_torch.py" "$repo/../shared/peers/crossmae_torch.py"; do
    [[ -z "$peer" && -f "$p" ]] && peer="$p"
done
declare -A ran_batch ran_json
bench() { # config, preset of the peer, batches...
    local config=$1 preset=$2
    shift 2
    for b in "$@"; do
        local lim
        lim=$(limit 150)
        if ((lim < 40)); then
            log "bench $config: out of time before batch $b"
            note check="bench $config" ok=false error="out of time"
            return
        fi
        log "bench $config batch $b (limit ${lim}s)"
        if timeout "$lim" "$bin" bench train "$config" --batch "$b" --warmup 2 --steps 5 \
            --set train.device=cuda:0 --set train.precision=bf16 \
            >"$out/bench-$preset.json" 2>"$out/bench-$preset-$b.err"; then
            tee -a "$results" <"$out/bench-$preset.json"
            ran_batch[$preset]=$b
            ran_json[$preset]="$out/bench-$preset.json"
            return
        fi
        log "  batch $b failed: $(tail -c 300 "$out/bench-$preset-$b.err" | tr '\n' ' ')"
    done
}
torch_peer() { # preset: PyTorch eager on the same model at the batch ours ran, and the ratio of images/s
    local preset=$1
    local b=${ran_batch[$preset]:-}
    [[ -z "$b" ]] && return
    if [[ -z "$peer" ]] || ! python3 -c 'import torch, timm' 2>/dev/null; then
        note check="torch $preset" skipped=true reason="no peer script, or no torch / timm in python3"
        return
    fi
    local lim
    lim=$(limit 120)
    if ((lim < 20)); then
        note check="torch $preset" ok=false error="out of time"
        return
    fi
    log "torch $preset batch $b (limit ${lim}s)"
    if ! timeout "$lim" python3 "$peer" bench --preset "$preset" --batch "$b" --steps 10 --device cuda --bf16 \
        --targets-outside >"$out/torch-$preset.json" 2>"$out/torch-$preset-$b.err"; then
        log "  torch batch $b failed: $(tail -c 300 "$out/torch-$preset-$b.err" | tr '\n' ' ')"
        note check="torch $preset" ok=false batch="$b" error="the peer failed, see torch-$preset-$b.err"
        return
    fi
    python3 - "$preset" "${ran_json[$preset]}" "$out/torch-$preset.json" <<'PYEOF' | tee -a "$results"
import json, sys
preset, ours_path, torch_path = sys.argv[1:4]
rec = {"check": f"torch {preset}"}
try:
    last = lambda path: json.loads(open(path).read().strip().splitlines()[-1])
    ours, torch = last(ours_path), last(torch_path)
    ours = ours.get("result", ours)  # bench train: {"figure": ..., "result": {...}}
    rec.update(ok=True, batch=torch["batch"], ours_images_per_s=ours["images_per_s"],
               torch_images_per_s=torch["images_per_s"],
               ratio_ours_over_torch=ours["images_per_s"] / torch["images_per_s"], torch=torch)
except Exception as e:  # a record either way, never a traceback instead of one
    rec.update(ok=False, error=f"{type(e).__name__}: {e}")
print(json.dumps(rec))
PYEOF
}
bench configs/vit-s16-imagenet.yaml vit-s16 512 384 256 128 64
bench configs/vit-b16-imagenet.yaml vit-b16 256 192 128 64 32
torch_peer vit-b16
torch_peer vit-s16
log "done in $(($(date +%s) - started)) s; results in $results"
if grep -q '"ok": *false' "$results"; then
    log "some checks are not ok (see the ok:false records in $results)"
    exit 1
fi
