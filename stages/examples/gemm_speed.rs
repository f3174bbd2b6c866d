//! GFLOP/s of the training GEMM (`model::matmul::gemm`) on the Linear layers'
//! shapes of the tiny preset and ViT-S/16, one thread and the pool:
//!
//!     cargo run --release -p stages --example gemm_speed [SECONDS_PER_SHAPE]
//!
//! Prints one JSON line per shape and thread count; compare with a BLAS on the
//! same shapes (`scripts/blas_gemm_speed.py`).

use stages::model::matmul::{gemm, Init, Mat};
use std::time::Instant;

fn main() {
    let secs: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    // (name, m, k, n, B transposed): x W^T forward, g W (dx), g^T x (dW).
    let shapes = [
        ("tiny qkv fwd", 3200, 192, 576, true),
        ("tiny fc1 fwd", 3200, 192, 768, true),
        ("tiny fc2 fwd", 3200, 768, 192, true),
        ("tiny fc1 dx", 3200, 768, 192, false),
        ("tiny fc1 dW", 768, 3200, 192, false),
        ("vit-s fc1 fwd", 1576, 384, 1536, true),
        ("hot 72x256x64", 72, 256, 64, false),
    ];
    let threads = rayon::current_num_threads();
    for (name, m, k, n, bt) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let bm = if bt { Mat::cols(&b, 0, k) } else { Mat::rows(&b, 0, n) };
        for parallel in [false, true] {
            let (mut runs, t0) = (0u64, Instant::now());
            while t0.elapsed().as_secs_f64() < secs {
                gemm(m, n, k, Mat::rows(&a, 0, k), bm, &mut c, n, Init::Zero, parallel);
                runs += 1;
            }
            let gflops = 2.0 * (m * n * k) as f64 * runs as f64 / t0.elapsed().as_secs_f64() / 1e9;
            println!(
                "{{\"shape\":\"{name}\",\"m\":{m},\"k\":{k},\"n\":{n},\"threads\":{},\"gflops\":{gflops:.1}}}",
                if parallel { threads } else { 1 }
            );
        }
    }
}
