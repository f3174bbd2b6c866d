#!/usr/bin/env bash
# Build `pipeline` with candle's CUDA backend on a machine WITHOUT a CUDA install or a GPU.
#
#   scripts/build-cuda.sh            # -> target-cuda/release/pipeline
#
# What it does, and why:
# - Installs a pinned CUDA toolkit subset from NVIDIA's wheels on PyPI (nvcc, its nvvm and crt
#   headers, cudart, cuBLAS, cuRAND, NVRTC) into target-cuda/toolkit. candle-kernels compiles its
#   kernels with nvcc; cudarc links libcuda, cublas, cublasLt, curand and nvrtc at build time.
# - CUDA 13.0: cudarc 0.19 (candle 0.11) supports it, the GPU machines we target run driver 580
#   (CUDA 13.0), and their Python image already carries the CUDA 13 runtime libraries
#   (libcudart.so.13, libcublas.so.13, ...), so the binary travels alone. A CUDA 12 build would need
#   the 12.x cuBLAS (~0.6 GB) on the GPU machine. Set CUDA_WHEELS_SET=12.4 for that (a driver
#   for CUDA 12.4+; the pins exist on PyPI, but that path has not been built here yet).
# - Links against a generated stub libcuda.so.1 (the driver library exists only where a GPU is);
#   at run time the real driver's libcuda.so.1 is used.
# - Builds into target-cuda/ so the CPU build in target/ is not disturbed.
#
# A user with a normal CUDA install (nvcc on PATH, driver present) runs instead:
#   CUDA_COMPUTE_CAP=90 cargo build --release -p pipeline --features cuda
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), CUDA_WHEELS_SET (13.0 | 12.4),
# CARGO_TARGET_DIR (default target-cuda), BUILD_NICE (default 15).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="${CARGO_TARGET_DIR:-$repo/target-cuda}"
toolkit="$target_dir/toolkit"
compute_cap="${CUDA_COMPUTE_CAP:-90}"
wheel_set="${CUDA_WHEELS_SET:-13.0}"
nice_level="${BUILD_NICE:-15}"

case "$wheel_set" in
13.0)
    cudarc_version=13000
    wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14
        nvidia-curand==10.4.0.35 nvidia-cuda-cccl==13.0.85)
    ;;
12.4)
    cudarc_version=12040
    wheels=(nvidia-cuda-nvcc-cu12==12.4.131 nvidia-cuda-runtime-cu12==12.4.127
        nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cublas-cu12==12.4.5.8 nvidia-curand-cu12==10.3.5.147
        nvidia-cuda-cccl-cu12==12.4.127)
    ;;
*)
    echo "build-cuda.sh: CUDA_WHEELS_SET must be 13.0 or 12.4, got '$wheel_set'" >&2
    exit 2
    ;;
esac

stamp="$toolkit/installed-$wheel_set"
if [[ ! -f "$stamp" ]]; then
    echo "== installing CUDA $wheel_set wheels into $toolkit"
    rm -rf "$toolkit"
    python3 -m pip install --quiet --no-deps --no-compile --target "$toolkit/site" "${wheels[@]}"
    touch "$stamp"
fi

# One CUDA root with bin/ include/ lib64/, the layout nvcc, cudaforge and cudarc expect.
if [[ "$wheel_set" == 13.0 ]]; then
    # The CUDA 13 wheels already share one prefix: nvidia/cu13/{bin,include,lib,nvvm}.
    cuda_root="$toolkit/site/nvidia/cu13"
    ln -sfn lib "$cuda_root/lib64"
else
    # The CUDA 12 wheels each have their own prefix: merge them with hard links.
    cuda_root="$toolkit/cuda"
    if [[ ! -d "$cuda_root" ]]; then
        mkdir -p "$cuda_root"
        for pkg in "$toolkit"/site/nvidia/*/; do
            cp -al "$pkg"/. "$cuda_root"/
        done
        [[ -d "$cuda_root/lib64" ]] || ln -sfn lib "$cuda_root/lib64"
    fi
fi

# The wheels ship only versioned sonames (libcublas.so.13); the linker's -lcublas wants libcublas.so.
for lib in cudart cublas cublasLt curand nvrtc; do
    so="$(ls "$cuda_root"/lib/lib$lib.so.* 2>/dev/null | grep -E "lib$lib\.so\.[0-9]+$" | head -1 || true)"
    if [[ -z "$so" ]]; then
        echo "build-cuda.sh: lib$lib.so.* missing under $cuda_root/lib" >&2
        exit 1
    fi
    ln -sfn "$(basename "$so")" "$cuda_root/lib/lib$lib.so"
done

# Stub libcuda.so (soname libcuda.so.1, like the driver's): one empty function per driver entry
# point that cudarc declares, enough for the linker; the binary loads the real driver at run time.
stubs="$toolkit/stubs"
if [[ ! -f "$stubs/libcuda.so" ]]; then
    mkdir -p "$stubs"
    cargo fetch --quiet
    cudarc_src="$(cargo metadata --format-version 1 --features pipeline/cuda |
        python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')"
    if [[ ! -f "$cudarc_src/src/driver/sys/mod.rs" ]]; then
        echo "build-cuda.sh: cannot find cudarc's driver bindings (cargo metadata gave '$cudarc_src')" >&2
        exit 1
    fi
    grep -ohE '\bfn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" | sed 's/^fn //; s/($//' | sort -u |
        sed 's/.*/void &(void) {}/' >"$stubs/libcuda_stub.c"
    echo "== stub libcuda: $(wc -l <"$stubs/libcuda_stub.c") entry points from $cudarc_src"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
fi

export CUDA_HOME="$cuda_root"
export PATH="$cuda_root/bin:$PATH"
export CUDA_COMPUTE_CAP="$compute_cap"
export CUDARC_CUDA_VERSION="$cudarc_version"
export LIBRARY_PATH="$cuda_root/lib:$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="$target_dir"

echo "== nvcc: $(nvcc --version | tail -2 | head -1)"
# The carried binary must not need libopenblas on the GPU machine (which has none):
# its CPU GEMM uses our own kernel.
export CROSSMAE_NO_OPENBLAS=1
echo "== cargo build --release -p pipeline --features cuda (CUDA_COMPUTE_CAP=$compute_cap, target $target_dir)"
start=$(date +%s)
nice -n "$nice_level" cargo build --release -p pipeline --features cuda
echo "== built in $(($(date +%s) - start)) s: $target_dir/release/pipeline ($(du -h "$target_dir/release/pipeline" | cut -f1))"
# Every kernel launch against the PTX's entry points (names and argument counts).
python3 "$repo/scripts/check-cuda-launches.py" "$target_dir"
echo "== run-time libraries (ldd; libcuda.so.1 comes from the GPU machine's driver):"
LD_LIBRARY_PATH="$cuda_root/lib" ldd "$target_dir/release/pipeline" | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
# For carrying to a GPU machine: stripped (no debug info) and gzipped, ~17 MB instead of ~200 MB,
# with the non-CUDA, non-libc libraries it links (libjpeg.so.62 when the build found libjpeg-turbo)
# in carry/lib, since the GPU machine's distribution may have other sonames.
rm -rf "$target_dir/carry"
mkdir -p "$target_dir/carry/lib"
LD_LIBRARY_PATH="$cuda_root/lib" ldd "$target_dir/release/pipeline" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' |
    while read -r name path; do
        case "$name" in
        libcuda.* | libcudart.* | libcublas* | libcurand.* | libnvrtc.* | libc.so.* | libm.so.* | libstdc++.* | \
            libgcc_s.* | ld-linux* | librt.* | libpthread.* | libdl.*) ;;
        *) cp -L "$path" "$target_dir/carry/lib/$name" && echo "== carried library: $name" ;;
        esac
    done
# The PyTorch peer that gpu-check.sh times against ours in the same script.
peer="$repo/../shared/peers/crossmae_torch.py"
[[ -f "$peer" ]] && cp "$peer" "$target_dir/carry/" && echo "== carried the PyTorch peer: $(basename "$peer")"
strip -o "$target_dir/carry/pipeline" "$target_dir/release/pipeline"
gzip -6 -f "$target_dir/carry/pipeline"
echo "== to carry: $target_dir/carry/pipeline.gz ($(du -h "$target_dir/carry/pipeline.gz" | cut -f1)); scripts/gpu-check.sh unpacks it"
