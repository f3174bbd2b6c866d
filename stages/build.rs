//! Compiles `csrc/jpeg_region.c` against the system libjpeg-turbo when
//! pkg-config finds it (Debian: `libjpeg-dev`), and sets `cfg(libjpeg_turbo)`;
//! without it the decode stage uses zune-jpeg for everything (slower: it
//! decodes whole images, see `decode.rs`).

fn main() {
    openblas();
    #[cfg(feature = "cuda")]
    cuda_kernels();
    println!("cargo::rerun-if-changed=csrc/jpeg_region.c");
    println!("cargo::rerun-if-env-changed=CROSSMAE_NO_LIBJPEG");
    println!("cargo::rustc-check-cfg=cfg(libjpeg_turbo)");
    if std::env::var_os("CROSSMAE_NO_LIBJPEG").is_some() {
        println!("cargo::warning=CROSSMAE_NO_LIBJPEG set: JPEGs decode with zune-jpeg only");
        return;
    }
    match pkg_config::Config::new().print_system_libs(false).probe("libjpeg") {
        Ok(lib) => {
            let mut build = cc::Build::new();
            build.file("csrc/jpeg_region.c").opt_level(2).warnings(true);
            for dir in &lib.include_paths {
                build.include(dir);
            }
            build.compile("jpeg_region");
            println!("cargo::rustc-cfg=libjpeg_turbo");
        }
        Err(e) => {
            println!("cargo::warning=libjpeg not found by pkg-config ({e}); JPEGs decode with zune-jpeg only");
        }
    }
}

/// Links OpenBLAS's cblas when pkg-config finds it (Debian: `libopenblas-dev`) and
/// sets `cfg(openblas)`: the training GEMM then runs on it (faster than our AVX2
/// kernel on these CPUs, see `model/matmul.rs`); without it our kernel runs.
fn openblas() {
    println!("cargo::rerun-if-env-changed=CROSSMAE_NO_OPENBLAS");
    println!("cargo::rustc-check-cfg=cfg(openblas)");
    if std::env::var_os("CROSSMAE_NO_OPENBLAS").is_some() {
        println!("cargo::warning=CROSSMAE_NO_OPENBLAS set: the training GEMM uses its own kernel");
        return;
    }
    match pkg_config::Config::new().print_system_libs(false).probe("openblas") {
        Ok(_) => println!("cargo::rustc-cfg=openblas"),
        Err(e) => {
            println!("cargo::warning=OpenBLAS not found by pkg-config ({e}); the training GEMM uses its own kernel")
        }
    }
}

/// With the `cuda` feature: the fused ops' kernels (the `.cu` files beside
/// `src/model/ops/*.rs` and `src/train/optim.rs`) to PTX, one module per file,
/// listed in `$OUT_DIR/ops_ptx.rs` (`model::ops::cuda` loads them through candle's
/// CUDA device). nvcc and the target come from `CUDA_HOME` / `PATH` and
/// `CUDA_COMPUTE_CAP`, as for candle's own kernels (scripts/build-cuda.sh sets them).
#[cfg(feature = "cuda")]
fn cuda_kernels() {
    const KERNELS: [&str; 8] = [
        "src/model/ops/attention.cu",
        "src/model/ops/column_sums.cu",
        "src/model/ops/draw_loss.cu",
        "src/model/ops/gelu.cu",
        "src/model/ops/layer_norm.cu",
        "src/model/ops/pixels.cu",
        "src/model/ops/pred_loss.cu",
        "src/train/adamw.cu",
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("ops_ptx.rs");
    let ptx = cudaforge::KernelBuilder::new()
        .source_files(KERNELS)
        .watch(["src/model/ops/common.cuh"])
        .args(["-std=c++17", "-O3", "--expt-relaxed-constexpr"])
        .build_ptx()
        .unwrap_or_else(|e| panic!("compiling the fused ops' CUDA kernels with nvcc: {e}"));
    ptx.write(&out)
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
