//! Patch layouts and the fixed position embedding (MAE `models_mae.py`
//! patchify/unpatchify, `util/pos_embed.py`).
//!
//! Two patch orders meet here:
//! - MAE order (`patchify`): patches row-major; inside a patch row p, column q,
//!   channel c, channel fastest. Pixel targets and the drawing head's output use it.
//! - conv order (`patchify_conv`): inside a patch channel c, then row, column:
//!   the flattening of a conv weight (D, C, P, P), so the stride-P conv stem is one matmul.

use candle_core::{Result, Tensor};

/// Images (B, C, H, W) -> patches (B, N, P*P*C), MAE order (`nchpwq -> nhwpqc`).
pub fn patchify(images: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let (gh, gw) = (h / p, w / p);
    images
        .reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 3, 5, 1))?
        .reshape((b, gh * gw, p * p * c))
}

/// Patches (B, N, P*P*C) in MAE order -> images (B, C, H, W); square grid.
pub fn unpatchify(patches: &Tensor, p: usize, c: usize) -> Result<Tensor> {
    let (b, n, _) = patches.dims3()?;
    let g = (n as f64).sqrt().round() as usize;
    if g * g != n {
        candle_core::bail!("unpatchify: {n} patches do not form a square grid")
    }
    patches
        .reshape((b, g, g, p, p, c))?
        .permute((0, 5, 1, 3, 2, 4))?
        .reshape((b, c, g * p, g * p))
}

/// Images (B, C, H, W) -> patches (B, N, C*P*P), conv order.
pub fn patchify_conv(images: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let (gh, gw) = (h / p, w / p);
    images
        .reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, gh * gw, c * p * p))
}

/// MAE-order patches (B, N, P*P*C) -> conv order (B, N, C*P*P), without a round trip through images.
pub fn mae_to_conv_order(patches: &Tensor, p: usize, c: usize) -> Result<Tensor> {
    let (b, n, _) = patches.dims3()?;
    patches
        .reshape((b, n, p, p, c))?
        .permute((0, 1, 4, 2, 3))?
        .reshape((b, n, c * p * p))
}

/// MAE's `get_2d_sincos_pos_embed(dim, grid, cls_token)`, row-major (1 + N or N, dim).
///
/// Token i = row r, column s: the first dim/2 channels encode the column s, the
/// second half the row r (MAE's meshgrid puts w first); within each half all
/// sines, then all cosines, with frequencies 1 / 10000^(k / (dim/4)).
/// Computed in f64 like numpy, then rounded to f32. `cls` prepends a zero row.
pub fn pos_embed_2d(dim: usize, grid: usize, cls: bool) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity((grid * grid + cls as usize) * dim);
    if cls {
        out.extend(std::iter::repeat_n(0f32, dim));
    }
    for r in 0..grid {
        for s in 0..grid {
            for pos in [s as f64, r as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testvectors::read;
    use candle_core::{DType, Device};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).expect("a") - b.to_dtype(DType::F32).expect("b")).expect("shapes");
        d.abs()
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar())
            .expect("max")
    }

    #[test]
    fn pos_embed_matches_mae_reference() -> Result<()> {
        for (name, dim, grid) in [("pos_embed_d16_g4_cls", 16, 4), ("pos_embed_d192_g14_cls", 192, 14)] {
            let want = read(name)?;
            let got = Tensor::from_vec(pos_embed_2d(dim, grid, true), (grid * grid + 1, dim), &Device::Cpu)?;
            assert_eq!(want.dims(), got.dims(), "{name}");
            let err = max_abs_diff(&want, &got);
            assert!(err < 1e-6, "{name}: max abs error {err}");
        }
        Ok(())
    }

    #[test]
    fn patchify_matches_mae_reference_and_inverts() -> Result<()> {
        let x = read("patchify_in")?.to_dtype(DType::F32)?;
        for (name, p) in [("patchify_p16", 16), ("patchify_p4", 4)] {
            let want = read(name)?;
            let got = patchify(&x, p)?;
            assert_eq!(want.dims(), got.dims(), "{name}");
            assert_eq!(max_abs_diff(&want, &got), 0.0, "{name}");
            assert_eq!(max_abs_diff(&unpatchify(&got, p, 3)?, &x), 0.0, "unpatchify {name}");
        }
        Ok(())
    }

    #[test]
    fn conv_order_is_what_a_strided_conv_sees() -> Result<()> {
        let x = read("patchify_in")?.to_dtype(DType::F32)?;
        // A conv with kernel = stride = 4 is a matmul on conv-ordered patches.
        let w = Tensor::randn(0f32, 1.0, (5, 3, 4, 4), &Device::Cpu)?;
        let conv = x.conv2d(&w, 0, 4, 1, 1)?.flatten_from(2)?.transpose(1, 2)?; // (B, N, 5)
        let pc = patchify_conv(&x, 4)?;
        let mm = pc.broadcast_matmul(&w.reshape((5, 48))?.t()?)?;
        assert!(max_abs_diff(&conv, &mm) < 1e-4);
        let via_mae = mae_to_conv_order(&patchify(&x, 4)?, 4, 3)?;
        assert_eq!(max_abs_diff(&via_mae, &pc), 0.0);
        Ok(())
    }
}
