//! Compiles `csrc/jpeg_region.c` against the system libjpeg-turbo when
//! pkg-config finds it (Debian: `libjpeg-dev`), and sets `cfg(libjpeg_turbo)`;
//! without it the decode stage uses zune-jpeg for everything (slower: it
//! decodes whole images, see `decode.rs`).

fn main() {
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
