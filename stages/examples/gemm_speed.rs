//! GFLOP/s of the training GEMM (`model::matmul::gemm`) on the Linear layers'
//! shapes of the tiny preset and ViT-S/16, one thread and the pool:
//!
//!     cargo run --release -p stages --example gemm_speed [SECONDS_PER_SHAPE [NAME_PART]]
//!
//! `GEMM_COLD=16` runs each product on one of 16 copies of A and C in turn, so
//! that its operands come from memory, as in a training step (both backends
//! lose about 15% on the tiny shapes; the order stays).
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
        // One head of the tiny preset's attention (50 tokens, head width 64): q k^T, P v.
        ("head q k^T", 50, 64, 50, Forward),
        ("head P v", 50, 50, 64, Dx),
    ];
    let threads = rayon::current_num_threads();
    for (name, m, k, n, layout) in shapes.into_iter().filter(|s| s.0.contains(only.as_str())) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
        // `GEMM_COLD=N`: cycle through N copies of A and C, so that each product
        // finds its operands out of cache, as the training step does (N copies
        // of several MB outgrow the L2 and, at N = 16, most of an L3 slice).
        let copies: usize = std::env::var("GEMM_COLD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1);
        let a_copies = vec![a; copies];
        let mut c_copies = vec![vec![0f32; m * n]; copies];
        fn view(a: &[f32], dw: bool, m: usize, k: usize) -> Mat<'_> {
            if dw {
                Mat::cols(a, 0, m)
            } else {
                Mat::rows(a, 0, k)
            }
        }
        let am = |a| view(a, layout == Dw, m, k);
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
                        let i = runs as usize % copies;
                        gemm_on(
                            backend,
                            m,
                            n,
                            k,
                            am(&a_copies[i]),
                            bm,
                            &mut c_copies[i],
                            n,
                            Init::Zero,
                            parallel,
                        );
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
