//! Compiles `csrc/jpeg_region.c` against the system libjpeg-turbo when
//! pkg-config finds it (Debian: `libjpeg-dev`), and sets `cfg(libjpeg_turbo)`;
//! without it the decode stage uses zune-jpeg for everything (slower: it
//! decodes whole images, see `decode.rs`).

fn main() {
    openblas();
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
