//! Function multiversioning for the data stages' hot loops.
//!
//! The crates build for the baseline x86-64 target (SSE2); the loops of the
//! stages are written so the compiler vectorizes them, and [`multiversion!`]
//! compiles the same body a second time with AVX2 enabled, picked at run time
//! when the CPU has it (one cached feature check per call). The body is one
//! source, so both versions compute the same thing: integer loops give equal
//! results, and float loops do too because Rust never reassociates or fuses
//! float operations on its own. Tests compare the two versions anyway.

/// `multiversion!(pub fn name / name_scalar(args) -> R { body })` defines
/// `name` (AVX2 when available) and `name_scalar` (baseline only).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $scalar:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline(always)]
        #[allow(dead_code)]
        $vis fn $scalar($($arg: $ty),*) $(-> $ret)? $body

        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $scalar($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $scalar($($arg),*)
        }
    };
}

pub(crate) use multiversion;
