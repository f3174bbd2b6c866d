//! Each fused op run on a device against the same op on the CPU (the CPU kernels
//! of part 1): the value and the gradient of every input, from seeded inputs of a
//! real model's shapes, with stated tolerances. AdamW's update is checked too,
//! parameters and moments.
//!
//! `pipeline check-ops --device cuda:0` runs it on a GPU (scripts/gpu-check.sh).
//! CI has no GPU: its test runs the same harness with the basic-op references on
//! the CPU as the other side (so the harness itself is tested), and prints that
//! the CUDA check was skipped and why.

use super::pixels::{compose_conv_order, patchify_conv_order};
use super::{attention, draw_loss, gelu, layer_norm, linear, pred_loss, scoped_reference};
use crate::model::autocast::{self, Precision};
use crate::train::optim::{AdamW, AdamWParams};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::HashMap;
use std::time::Instant;

/// The shapes the ops are checked at.
#[derive(Debug, Clone, Copy)]
pub struct Shapes {
    pub batch: usize,
    /// Tokens per sample (cls included).
    pub tokens: usize,
    pub width: usize,
    pub heads: usize,
    /// The MLP's hidden width.
    pub hidden: usize,
    /// L_pred's target width per patch.
    pub target_dim: usize,
    pub image: usize,
    pub patch: usize,
    pub channels: usize,
}

impl Shapes {
    /// ViT-B/16 at 224 px (197 tokens, 768 wide, 12 heads), HOG-sized targets.
    pub fn vit_b16(batch: usize) -> Self {
        Self {
            batch,
            tokens: 197,
            width: 768,
            heads: 12,
            hidden: 3072,
            target_dim: 108,
            image: 224,
            patch: 16,
            channels: 3,
        }
    }

    /// The embedded tiny model (28 px, patch 4, 192 wide, 3 heads).
    pub fn tiny(batch: usize) -> Self {
        Self {
            batch,
            tokens: 50,
            width: 192,
            heads: 3,
            hidden: 768,
            target_dim: 36,
            image: 28,
            patch: 4,
            channels: 1,
        }
    }
}

/// Which ops run on the checked device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The fused ops (their CUDA kernels on a GPU).
    Fused,
    /// The basic-op references (what CI checks the harness with).
    Reference,
}

/// One op's comparison: the largest `|a - b| / (1 + |b|)` of the value and of each
/// input's gradient, device against CPU.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpCheck {
    pub op: String,
    pub shape: String,
    pub precision: String,
    pub tolerance: f32,
    /// ("value" | "d <input>", difference).
    pub diffs: Vec<(String, f32)>,
    /// The device side's forward + backward, milliseconds (first call: includes loading kernels).
    pub device_ms: f64,
    pub ok: bool,
}

/// Tolerances: f32 on both sides differs only in summation order; bf16 products
/// keep 8 mantissa bits (relative 2^-9 per operand, sums of up to a few thousand terms).
fn tolerance(precision: Precision, uses_products: bool) -> f32 {
    match (precision, uses_products) {
        (Precision::Bf16, true) => 5e-2,
        _ => 2e-4,
    }
}

/// Seeded standard-normal values times `scale` (CPU, f32; no global RNG). Also the
/// ops' tests' inputs.
pub(crate) fn seeded(dims: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| scale * Distribution::<f32>::sample(&StandardNormal, &mut rng))
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (
        a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        b.to_dtype(DType::F32)?,
    );
    let d = (&a - &b)?.abs()?;
    let s = (b.abs()? + 1.0)?;
    (d / s)?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Runs `f` forward and backward (loss = sum(y * w), w seeded) on `device`; returns
/// y and the gradients of the inputs in `grad_of`, on the CPU.
fn run_on(
    device: &Device,
    inputs: &[Tensor],
    grad_of: &[usize],
    f: &dyn Fn(&Device, &[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>, f64)> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(device)?))
        .collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let start = Instant::now();
    let y = f(device, &ts)?;
    let w = seeded(y.dims(), 11, 1.0)?.to_device(device)?;
    let grads = (&y * &w)?.sum_all()?.backward()?;
    let mut out = Vec::new();
    for &i in grad_of {
        let g = grads
            .get(&vars[i])
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for input {i}")))?;
        out.push(g.to_device(&Device::Cpu)?);
    }
    let y = y.to_device(&Device::Cpu)?;
    Ok((y, out, start.elapsed().as_secs_f64() * 1e3))
}

struct Case<'a> {
    op: &'a str,
    shape: String,
    inputs: Vec<Tensor>,
    /// (input index, its name in the report).
    grads: Vec<(usize, &'a str)>,
    uses_products: bool,
    f: Box<dyn Fn(&Device, &[Tensor]) -> Result<Tensor> + 'a>,
}

/// Checks every fused op on `device` (running `side`) against the fused CPU op, at
/// `precision` on the device (the CPU side runs f32), each within its tolerance
/// times `tolerance_scale` (1 but in the test that shows a check can fail).
pub fn check_ops(
    device: &Device,
    side: Side,
    precision: Precision,
    s: &Shapes,
    tolerance_scale: f32,
) -> Result<Vec<OpCheck>> {
    let (b, t, d, h) = (s.batch, s.tokens, s.width, s.heads);
    let n = (s.image / s.patch).pow(2);
    let k = s.patch * s.patch * s.channels;
    let eps = 1e-6;
    let scale = 1.0 / ((d / h) as f64).sqrt();
    let (p, heads) = (s.patch, h);
    // Masks and weights with zeros (unmasked patches, flat targets).
    let mask_v: Vec<f32> = (0..b * n).map(|i| ((i * 7) % 4 != 0) as u8 as f32).collect();
    let mask = Tensor::from_vec(mask_v, (b, n), &Device::Cpu)?;
    let target = {
        let keep: Vec<f32> = (0..b * n).map(|i| (i % 9 != 4) as u8 as f32).collect();
        seeded(&[b, n, s.target_dim], 7, 1.0)?.broadcast_mul(&Tensor::from_vec(keep, (b, n, 1), &Device::Cpu)?)?
    };
    let image = seeded(&[b, s.channels, s.image, s.image], 8, 1.0)?;
    let cases = vec![
        Case {
            op: "layer_norm",
            shape: format!("x ({b}, {t}, {d})"),
            inputs: vec![
                (seeded(&[b, t, d], 1, 2.0)? + 0.5)?,
                (seeded(&[d], 2, 0.5)? + 1.0)?,
                seeded(&[d], 3, 0.5)?,
            ],
            grads: vec![(0, "x"), (1, "gamma"), (2, "beta")],
            uses_products: false,
            f: Box::new(move |_, v| layer_norm(&v[0], &v[1], &v[2], eps)),
        },
        Case {
            op: "linear",
            shape: format!("x ({}, {d}) -> {}", b * t, s.hidden),
            inputs: vec![
                seeded(&[b * t, d], 4, 1.0)?,
                seeded(&[s.hidden, d], 5, 0.05)?,
                seeded(&[s.hidden], 6, 0.5)?,
            ],
            grads: vec![(0, "x"), (1, "weight"), (2, "bias")],
            uses_products: true,
            f: Box::new(|_, v| linear(&v[0], &v[1], &v[2])),
        },
        Case {
            op: "attention",
            shape: format!("qkv ({b}, {t}, {}), {h} heads", 3 * d),
            inputs: vec![seeded(&[b, t, 3 * d], 9, 1.0)?],
            grads: vec![(0, "qkv")],
            uses_products: true,
            f: Box::new(move |_, v| attention(&v[0], heads, scale)),
        },
        Case {
            op: "gelu",
            shape: format!("({b}, {t}, {})", s.hidden),
            inputs: vec![seeded(&[b, t, s.hidden], 10, 3.0)?],
            grads: vec![(0, "x")],
            uses_products: false,
            f: Box::new(|_, v| gelu(&v[0])),
        },
        Case {
            op: "pred_loss",
            shape: format!("pred ({b}, {n}, {})", s.target_dim),
            inputs: vec![seeded(&[b, n, s.target_dim], 12, 1.0)?],
            grads: vec![(0, "pred")],
            uses_products: false,
            f: {
                let (target, mask) = (target.clone(), mask.clone());
                Box::new(move |dev, v| pred_loss(&v[0], &target.to_device(dev)?, &mask.to_device(dev)?))
            },
        },
        Case {
            op: "draw_loss",
            shape: format!(
                "drawn ({b}, {n}, {k}), image ({b}, {}, {px}, {px})",
                s.channels,
                px = s.image
            ),
            inputs: vec![seeded(&[b, n, k], 13, 1.0)?],
            grads: vec![(0, "drawn")],
            uses_products: false,
            f: {
                let (image, mask) = (image.clone(), mask.clone());
                Box::new(move |dev, v| draw_loss(&v[0], &image.to_device(dev)?, &mask.to_device(dev)?, p))
            },
        },
        Case {
            op: "patchify",
            shape: format!(
                "image ({b}, {}, {px}, {px}) -> ({b}, {n}, {k})",
                s.channels,
                px = s.image
            ),
            inputs: vec![],
            grads: vec![],
            uses_products: false,
            f: {
                let image = image.clone();
                Box::new(move |dev, _| patchify_conv_order(&image.to_device(dev)?, p))
            },
        },
        Case {
            op: "compose",
            shape: format!("drawn ({b}, {n}, {k}) -> ({b}, {n}, {k})"),
            inputs: vec![seeded(&[b, n, k], 14, 1.0)?],
            grads: vec![(0, "drawn")],
            uses_products: false,
            f: {
                let (image, mask) = (image.clone(), mask.clone());
                Box::new(move |dev, v| compose_conv_order(&v[0], &image.to_device(dev)?, &mask.to_device(dev)?, p))
            },
        },
    ];
    let mut out = Vec::new();
    for case in cases {
        let grad_of: Vec<usize> = case.grads.iter().map(|g| g.0).collect();
        let (y_cpu, g_cpu, _) = {
            let _f32 = autocast::scoped(Precision::F32);
            let _fused = scoped_reference(false);
            run_on(&Device::Cpu, &case.inputs, &grad_of, &*case.f)?
        };
        let (y_dev, g_dev, ms) = {
            let _p = autocast::scoped(precision);
            let _side = scoped_reference(side == Side::Reference);
            run_on(device, &case.inputs, &grad_of, &*case.f)?
        };
        let mut diffs = vec![("value".to_string(), max_rel_diff(&y_dev, &y_cpu)?)];
        for ((_, name), (a, b)) in case.grads.iter().zip(g_dev.iter().zip(&g_cpu)) {
            if a.dims() != b.dims() {
                candle_core::bail!(
                    "{}: gradient of {name} is {:?} on the device, {:?} on the CPU",
                    case.op,
                    a.dims(),
                    b.dims()
                )
            }
            diffs.push((format!("d {name}"), max_rel_diff(a, b)?));
        }
        let tol = tolerance(precision, case.uses_products) * tolerance_scale;
        out.push(OpCheck {
            ok: diffs.iter().all(|(_, e)| e.is_finite() && *e <= tol),
            op: case.op.to_string(),
            shape: case.shape,
            precision: format!("{precision:?}").to_lowercase(),
            tolerance: tol,
            diffs,
            device_ms: ms,
        });
    }
    out.push(check_adamw(device, side, d, tolerance_scale)?);
    Ok(out)
}

/// Three AdamW updates of a decayed (d, d) weight and an undecayed (d) bias on the
/// device against the CPU: parameters and both moments. The fused update runs the
/// CPU's f32 operations in the CPU's order, so the tolerance is 0 for it (the basic
/// ops on a GPU may contract into FMAs, so the reference side gets the f32 one).
fn check_adamw(device: &Device, side: Side, d: usize, tolerance_scale: f32) -> Result<OpCheck> {
    let run = |dev: &Device, reference: bool| -> Result<(HashMap<String, Tensor>, f64)> {
        let _side = scoped_reference(reference);
        let w = Var::from_tensor(&seeded(&[d, d], 20, 0.05)?.to_device(dev)?)?;
        let bias = Var::from_tensor(&seeded(&[d], 21, 0.1)?.to_device(dev)?)?;
        let mut opt = AdamW::new(
            vec![("w".to_string(), w.clone()), ("b.bias".to_string(), bias.clone())],
            AdamWParams::default(),
        )?;
        let start = Instant::now();
        for step in 0..3u64 {
            let grads = HashMap::from([
                ("w".to_string(), seeded(&[d, d], 30 + step, 0.01)?.to_device(dev)?),
                ("b.bias".to_string(), seeded(&[d], 40 + step, 0.01)?.to_device(dev)?),
            ]);
            opt.step(&grads, 1.5e-4)?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let mut state = opt.state_tensors();
        state.insert("w".into(), w.as_tensor().clone());
        state.insert("b.bias".into(), bias.as_tensor().clone());
        Ok((state, ms))
    };
    let (cpu, _) = run(&Device::Cpu, false)?;
    let (dev, ms) = run(device, side == Side::Reference)?;
    let mut names: Vec<&String> = cpu.keys().collect();
    names.sort();
    let mut diffs = Vec::new();
    for name in names {
        diffs.push((name.clone(), max_rel_diff(&dev[name], &cpu[name])?));
    }
    let tol = match side {
        Side::Fused => 0.0,
        Side::Reference => 1e-6 * tolerance_scale,
    };
    Ok(OpCheck {
        ok: diffs.iter().all(|(_, e)| e.is_finite() && *e <= tol),
        op: "adamw".into(),
        shape: format!("w ({d}, {d}), bias ({d}), 3 steps"),
        precision: "f32".into(),
        tolerance: tol,
        diffs,
        device_ms: ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness on the CPU: the basic-op references against the fused CPU ops,
    /// at the tiny model's shapes and at ViT-B/16's token count and head width.
    /// With tolerance 0 it must report differences (so a check can fail).
    #[test]
    fn the_reference_ops_pass_the_device_check_and_a_zero_tolerance_fails() -> Result<()> {
        let wide = Shapes {
            batch: 1,
            width: 128,
            heads: 2,
            hidden: 256,
            ..Shapes::vit_b16(1)
        };
        for shapes in [Shapes::tiny(3), wide] {
            let checks = check_ops(&Device::Cpu, Side::Reference, Precision::F32, &shapes, 1.0)?;
            assert_eq!(checks.len(), 9, "eight ops and AdamW");
            for c in &checks {
                assert!(
                    c.ok,
                    "{} at {}: {:?} (tolerance {})",
                    c.op, c.shape, c.diffs, c.tolerance
                );
            }
            let strict = check_ops(&Device::Cpu, Side::Reference, Precision::F32, &shapes, 0.0)?;
            let failed: Vec<&str> = strict.iter().filter(|c| !c.ok).map(|c| c.op.as_str()).collect();
            assert!(
                failed.contains(&"layer_norm") && failed.contains(&"attention"),
                "with tolerance 0 the summation-order differences must show: failed {failed:?}"
            );
        }
        Ok(())
    }

    /// The CUDA check proper, where there is a GPU (scripts/gpu-check.sh runs it with
    /// `pipeline check-ops`); CI prints why it skipped.
    #[test]
    fn fused_ops_on_cuda_match_the_cpu() -> Result<()> {
        if !candle_core::utils::cuda_is_available() {
            eprintln!("skipped the CUDA op check: this build has no CUDA (feature `cuda`); scripts/gpu-check.sh runs it on a GPU");
            return Ok(());
        }
        let device = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped the CUDA op check: no usable GPU ({e})");
                return Ok(());
            }
        };
        for precision in [Precision::F32, Precision::Bf16] {
            for c in check_ops(&device, Side::Fused, precision, &Shapes::vit_b16(2), 1.0)? {
                assert!(
                    c.ok,
                    "{} ({}) at {}: {:?} (tolerance {})",
                    c.op, c.precision, c.shape, c.diffs, c.tolerance
                );
            }
        }
        Ok(())
    }
}
