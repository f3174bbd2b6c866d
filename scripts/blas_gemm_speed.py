#!/usr/bin/env python3
"""GFLOP/s of BLAS sgemm (numpy's OpenBLAS; torch's, when installed) on the shapes
of `cargo run --release -p stages --example gemm_speed`, one JSON line each.

    OMP_NUM_THREADS=T OPENBLAS_NUM_THREADS=T python3 scripts/blas_gemm_speed.py [SECONDS]
"""
import json, sys, time
import numpy as np

SHAPES = [("tiny qkv fwd", 3200, 192, 576, True), ("tiny fc1 fwd", 3200, 192, 768, True),
          ("tiny fc2 fwd", 3200, 768, 192, True), ("tiny fc1 dx", 3200, 768, 192, False),
          ("tiny fc1 dW", 768, 3200, 192, False), ("vit-s fc1 fwd", 1576, 384, 1536, True),
          ("hot 72x256x64", 72, 256, 64, False)]

def rate(f, flops, secs):
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < secs:
        f(); runs += 1
    return flops * runs / (time.perf_counter() - t0) / 1e9

secs = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
try:
    import torch
except ImportError:
    torch = None
for name, m, k, n, bt in SHAPES:
    a = np.random.rand(m, k).astype(np.float32)
    b = (np.random.rand(n, k).astype(np.float32).T if bt else np.random.rand(k, n).astype(np.float32))
    out = {"shape": name, "m": m, "k": k, "n": n,
           "numpy_gflops": round(rate(lambda: a @ b, 2 * m * n * k, secs), 1)}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(np.ascontiguousarray(b.T)).t() if bt else torch.from_numpy(b)
        out["torch_gflops"] = round(rate(lambda: ta @ tb, 2 * m * n * k, secs), 1)
        out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out))
