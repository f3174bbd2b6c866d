//! GFLOP/s of the training GEMM (`model::matmul::gemm`) on the Linear layers'
//! shapes of the tiny preset and ViT-S/16, one thread and the pool:
//!
//!     cargo run --release -p stages --example gemm_speed [SECONDS_PER_SHAPE [NAME_PART]]
//!
//! Prints one JSON line per shape, thread count, backend and round: every
//! backend this build and CPU can run (`matmul::backends`, the reference left
//! out), interleaved, two rounds, so that drift hits them alike.

use stages::model::matmul::{backends, gemm_on, Backend, Init, Mat};
use std::time::Instant;

fn main() {
    let secs: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    // Only the shapes whose name holds this (e.g. `dW`), to profile one kind.
    let only = std::env::args().nth(2).unwrap_or_default();
    // (name, m, k, n, layout): x W^T forward (B transposed), g W (dx), g^T x (dW, A transposed).
    #[derive(PartialEq)]
    enum Layout {
        Forward,
        Dx,
        Dw,
    }
    use Layout::*;
    let shapes = [
        ("tiny qkv fwd", 3200, 192, 576, Forward),
        ("tiny fc1 fwd", 3200, 192, 768, Forward),
        ("tiny fc2 fwd", 3200, 768, 192, Forward),
        ("tiny fc1 dx", 3200, 768, 192, Dx),
        ("tiny qkv dW", 576, 3200, 192, Dw),
        ("tiny fc1 dW", 768, 3200, 192, Dw),
        ("tiny fc2 dW", 192, 3200, 768, Dw),
        ("vit-s fc1 fwd", 1576, 384, 1536, Forward),
        ("hot 72x256x64", 72, 256, 64, Dx),
    ];
    let threads = rayon::current_num_threads();
    for (name, m, k, n, layout) in shapes.into_iter().filter(|s| s.0.contains(only.as_str())) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let am = if layout == Dw {
            Mat::cols(&a, 0, m)
        } else {
            Mat::rows(&a, 0, k)
        };
        let bm = if layout == Forward {
            Mat::cols(&b, 0, k)
        } else {
            Mat::rows(&b, 0, n)
        };
        for parallel in [false, true] {
            for round in 0..2 {
                for backend in backends().into_iter().filter(|b| *b != Backend::Reference) {
                    let (mut runs, t0) = (0u64, Instant::now());
                    while t0.elapsed().as_secs_f64() < secs {
                        gemm_on(backend, m, n, k, am, bm, &mut c, n, Init::Zero, parallel);
                        runs += 1;
                    }
                    let gflops = 2.0 * (m * n * k) as f64 * runs as f64 / t0.elapsed().as_secs_f64() / 1e9;
                    println!(
                        "{{\"shape\":\"{name}\",\"m\":{m},\"k\":{k},\"n\":{n},\"threads\":{},\"backend\":\"{backend:?}\",\"round\":{round},\"gflops\":{gflops:.1}}}",
                        if parallel { threads } else { 1 }
                    );
                }
            }
        }
    }
}
