//! AdamW with two parameter groups and exportable moments.
//!
//! candle-nn's `AdamW` has no parameter groups and keeps its moments private,
//! so a run could not resume exactly. This one follows PyTorch's update
//! (`torch/optim/adamw.py`, `_single_tensor_adamw`), per parameter p with
//! gradient g at step t (1-based):
//!
//! ```text
//! p  *= 1 - lr * wd                      (decoupled weight decay; wd = 0 for 1-D params and biases)
//! m  += (1 - b1) * (g - m)
//! v   = b2 * v + (1 - b2) * g^2
//! p  -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! The groups follow MAE (`optim_factory.add_weight_decay`): no decay for
//! parameters with one dimension or a name ending in `.bias`; everything else
//! (cls and mask tokens included, as in MAE) decays.
//!
//! On the CPU each parameter takes one fused pass ([`FusedUpdate`]: decay,
//! moments, bias correction and update per element, parallel over fixed chunks,
//! the parameter updated in place). It runs the f32 operations of the basic-op
//! version ([`AdamW::step_reference`], which other devices run) in the same
//! order, so both give the same bits (tested).

use crate::model::ops::{output_vec, with_slices};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// Whether a parameter is in the weight-decay group.
pub fn decays(name: &str, dims: &[usize]) -> bool {
    dims.len() > 1 && !name.ends_with(".bias")
}

/// Hyper-parameters other than the lr (which the schedule gives per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// MAE pre-training: betas (0.9, 0.95), eps 1e-8, weight decay 0.05.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// Multiplies the step's lr (1 but under fine-tuning's layer-wise decay).
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

/// The optimizer over named parameters, in a fixed (sorted) order.
pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    /// Updates made so far (PyTorch's `state['step']`).
    t: u64,
}

impl AdamW {
    /// `vars`: (name, parameter); they are sorted by name.
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = m.clone();
                Ok(Slot {
                    decay: decays(&name, var.dims()),
                    lr_scale: 1.0,
                    name,
                    var,
                    m,
                    v,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, params, t: 0 })
    }

    /// Updates made so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// Parameter names in update order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// The parameters, in update order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Regroups the parameters: `group(name, dims)` gives each its lr
    /// multiplier and whether it decays (fine-tuning's layer-wise lr decay and
    /// its own no-decay list; pre-training keeps 1 and [`decays`]).
    pub fn set_groups(&mut self, group: impl Fn(&str, &[usize]) -> (f64, bool)) {
        for s in &mut self.slots {
            (s.lr_scale, s.decay) = group(&s.name, s.var.dims());
        }
    }

    /// The lr multiplier of each parameter, in update order.
    pub fn lr_scales(&self) -> impl Iterator<Item = (&str, f64)> {
        self.slots.iter().map(|s| (s.name.as_str(), s.lr_scale))
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.slots.iter().filter(|s| s.decay).map(|s| s.name.as_str()).collect()
    }

    /// One update with learning rate `lr`; `grads[name]` for every parameter
    /// (a missing gradient counts as zero).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        for s in &mut self.slots {
            let c = Coefficients::new(&self.params, self.t, lr * s.lr_scale);
            let g = match grads.get(&s.name) {
                Some(g) => g.clone(),
                None => s.m.zeros_like()?,
            };
            let dev = s.var.device();
            let fused = !crate::model::ops::reference()
                && (dev.is_cpu() || (cfg!(feature = "cuda") && dev.is_cuda()))
                && [s.var.dtype(), g.dtype(), s.m.dtype()].iter().all(|d| *d == DType::F32);
            if fused {
                let op = FusedUpdate {
                    g: g.contiguous()?,
                    m: s.m.contiguous()?,
                    v: s.v.contiguous()?,
                    decay: s.decay,
                    c,
                    moments: Mutex::new(None),
                };
                s.var.as_tensor().inplace_op1(&op)?;
                let (m, v) = op
                    .moments
                    .into_inner()
                    .map_err(|_| candle_core::Error::Msg("adamw: poisoned".into()))?
                    .ok_or_else(|| candle_core::Error::Msg(format!("adamw: no update for {}", s.name)))?;
                s.m = m;
                s.v = v;
            } else {
                Self::slot_reference(s, &g, &c)?;
            }
        }
        Ok(())
    }

    /// [`AdamW::step`] from candle's basic ops, on any device.
    pub fn step_reference(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        let _r = crate::model::ops::scoped_reference(true);
        self.step(grads, lr)
    }

    fn slot_reference(s: &mut Slot, g: &Tensor, c: &Coefficients) -> Result<()> {
        let mut p = s.var.as_tensor().detach();
        if s.decay && c.weight_decay_on {
            p = (p * c.decay_factor)?;
        }
        s.m = (&s.m + ((g - &s.m)? * c.one_minus_b1)?)?;
        s.v = ((&s.v * c.b2)? + (g.sqr()? * c.one_minus_b2)?)?;
        let denom = ((s.v.sqrt()? / c.bc2_sqrt)? + c.eps)?;
        let p = (p - ((&s.m / denom)? * c.step_size)?)?;
        s.var.set(&p)
    }

    /// The moments as `m.NAME` / `v.NAME`, for the checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    /// Restores moments and the step count; every parameter must be present with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for s in &mut self.slots {
            for (kind, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{kind}.{}", s.name);
                let Some(x) = tensors.get(&key) else {
                    candle_core::bail!("optimizer state lacks {key}")
                };
                if x.dims() != s.var.dims() {
                    candle_core::bail!(
                        "optimizer state {key}: shape {:?}, parameter has {:?}",
                        x.dims(),
                        s.var.dims()
                    )
                }
                *slot = x.to_device(s.var.device())?.to_dtype(s.var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The scalars of one update (f64, as the basic ops take them).
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    /// 1 - lr * wd.
    decay_factor: f64,
    /// wd != 0.
    weight_decay_on: bool,
    one_minus_b1: f64,
    b2: f64,
    one_minus_b2: f64,
    bc2_sqrt: f64,
    eps: f64,
    /// lr / (1 - b1^t).
    step_size: f64,
}

impl Coefficients {
    fn new(p: &AdamWParams, t: u64, lr: f64) -> Self {
        Self {
            decay_factor: 1.0 - lr * p.weight_decay,
            weight_decay_on: p.weight_decay != 0.0,
            one_minus_b1: 1.0 - p.beta1,
            b2: p.beta2,
            one_minus_b2: 1.0 - p.beta2,
            bc2_sqrt: (1.0 - p.beta2.powi(t as i32)).sqrt(),
            eps: p.eps,
            step_size: lr / (1.0 - p.beta1.powi(t as i32)),
        }
    }
}

/// One parameter's update in one pass: the parameter in place, new moments out.
///
/// Each line is one basic op of [`AdamW::slot_reference`] as candle's CPU backend
/// computes it (`x * mul + add` in f32 for a scalar op), so the bits agree.
struct FusedUpdate {
    g: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
    c: Coefficients,
    /// The new (m, v), set by the update.
    moments: Mutex<Option<(Tensor, Tensor)>>,
}

impl FusedUpdate {
    /// The coefficients as the kernels take them (f32).
    fn f32_coefficients(&self) -> [f32; 7] {
        let c = self.c;
        [
            c.decay_factor,
            c.one_minus_b1,
            c.b2,
            c.one_minus_b2,
            1.0 / c.bc2_sqrt,
            c.eps,
            c.step_size,
        ]
        .map(|x| x as f32)
    }

    fn set_moments(&self, m: Tensor, v: Tensor) -> Result<()> {
        *self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("adamw: poisoned".into()))? = Some((m, v));
        Ok(())
    }
}

impl InplaceOp1 for FusedUpdate {
    fn name(&self) -> &'static str {
        "crossmae-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("adamw: f32 parameters only")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw: the parameter must be contiguous")
        };
        let p = &mut data[a..b];
        let decay = self.decay && self.c.weight_decay_on;
        let [decay_factor, om1, b2, om2, inv_bc2, eps, ss] = self.f32_coefficients();
        const CHUNK: usize = 1 << 14;
        let (m, v) = with_slices([&self.g, &self.m, &self.v], "adamw", |[g, m, v]| {
            if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
                candle_core::bail!("adamw: gradient of {} values for a parameter of {}", g.len(), p.len())
            }
            // Every element of the new moments is written below.
            let (mut m2, mut v2) = (output_vec(p.len()), output_vec(p.len()));
            p.par_chunks_mut(CHUNK)
                .zip(m2.par_chunks_mut(CHUNK).zip(v2.par_chunks_mut(CHUNK)))
                .zip(g.par_chunks(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))))
                .for_each(|((p, (m2, v2)), (g, (m, v)))| {
                    // Equal lengths stated once, so the loop has no bounds checks and vectorizes.
                    let n = p.len();
                    let (m2, v2, g, m, v) = (&mut m2[..n], &mut v2[..n], &g[..n], &m[..n], &v[..n]);
                    for i in 0..n {
                        let mut pi = p[i];
                        if decay {
                            pi = pi * decay_factor + 0.0;
                        }
                        let gi = g[i];
                        let mi = m[i] + ((gi - m[i]) * om1 + 0.0);
                        let vi = (v[i] * b2 + 0.0) + ((gi * gi) * om2 + 0.0);
                        let denom = (vi.sqrt() * inv_bc2 + 0.0) * 1.0 + eps;
                        p[i] = pi - ((mi / denom) * ss + 0.0);
                        m2[i] = mi;
                        v2[i] = vi;
                    }
                });
            Ok((m2, v2))
        })?;
        let shape = self.m.shape();
        self.set_moments(
            Tensor::from_vec(m, shape, &candle_core::Device::Cpu)?,
            Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?,
        )
    }

    /// The same update as one kernel (adamw.cu), in the same f32 operations.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        use crate::model::ops::cuda::{self, launch};
        use candle_core::backend::BackendStorage;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw: the parameter must be contiguous")
        };
        let dev = storage.device().clone();
        let mut p = storage.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let n = b - a;
        let (m, v) = cuda::with_views::<3, f32, _>([&self.g, &self.m, &self.v], "adamw", |_, [g, m, v]| {
            if g.len() != n || m.len() != n || v.len() != n {
                candle_core::bail!("adamw: gradient of {} values for a parameter of {n}", g.len())
            }
            let (m2, v2) = (cuda::alloc::<f32>(&dev, n)?, cuda::alloc::<f32>(&dev, n)?);
            let decay = (self.decay && self.c.weight_decay_on) as i32;
            let [decay_factor, om1, b2, om2, inv_bc2, eps, ss] = self.f32_coefficients();
            launch!(
                &dev,
                cuda::ADAMW,
                "adamw_f32",
                cuda::elementwise(n),
                &mut p,
                &g,
                &m,
                &v,
                &m2,
                &v2,
                &n,
                &decay,
                &decay_factor,
                &om1,
                &b2,
                &om2,
                &inv_bc2,
                &eps,
                &ss
            );
            Ok((m2, v2))
        })?;
        let shape = self.m.shape();
        self.set_moments(cuda::tensor(m, &dev, shape), cuda::tensor(v, &dev, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference values from this float64 script (PyTorch's `_single_tensor_adamw` rule):
    ///
    /// ```python
    /// import math
    /// def adamw(p, grads, lrs, wd, b1=0.9, b2=0.95, eps=1e-8):
    ///     m = [0.0]*len(p); v = [0.0]*len(p)
    ///     for t, (g, lr) in enumerate(zip(grads, lrs), 1):
    ///         for i in range(len(p)):
    ///             p[i] *= 1 - lr*wd
    ///             m[i] += (g[i] - m[i])*(1 - b1)
    ///             v[i] = v[i]*b2 + (1 - b2)*g[i]*g[i]
    ///             denom = math.sqrt(v[i])/math.sqrt(1 - b2**t) + eps
    ///             p[i] -= lr/(1 - b1**t) * m[i]/denom
    ///         print(t, p)
    /// adamw([1.0, -2.0], [[0.1, -0.3], [-0.2, 0.4], [0.05, 0.0]], [0.01, 0.02, 0.005], 0.05)
    /// adamw([0.5], [[0.1], [-0.2], [0.05]], [0.01, 0.02, 0.005], 0.0)
    /// ```
    #[test]
    fn matches_pytorch_rule_on_scalars() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &dev)?)?;
        let mut opt = AdamW::new(
            vec![("lin.weight".into(), w.clone()), ("lin.bias".into(), b.clone())],
            AdamWParams::default(),
        )?;
        assert_eq!(opt.decayed(), vec!["lin.weight"]);
        let grads = [
            ([0.1f32, -0.3], 0.1f32, 0.01),
            ([-0.2, 0.4], -0.2, 0.02),
            ([0.05, 0.0], 0.05, 0.005),
        ];
        let want_w = [
            [0.9895000009999999, -1.9890000003333335],
            [0.9957779795524063, -1.9908676597888482],
            [0.9962151507382654, -1.9911248818290044],
        ];
        let want_b = [0.4900000009999999, 0.4972674795534062, 0.49795359523415345];
        for (i, (gw, gb, lr)) in grads.into_iter().enumerate() {
            let mut g = HashMap::new();
            g.insert("lin.weight".to_string(), Tensor::new(&[gw], &dev)?);
            g.insert("lin.bias".to_string(), Tensor::new(&[gb], &dev)?);
            opt.step(&g, lr)?;
            let got_w = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let got_b = b.as_tensor().to_vec1::<f32>()?;
            for (g, w) in got_w.iter().zip(want_w[i]) {
                assert!((*g as f64 - w).abs() < 2e-7, "step {}: weight {g} vs {w}", i + 1);
            }
            assert!(
                (got_b[0] as f64 - want_b[i]).abs() < 2e-7,
                "step {}: bias {} vs {}",
                i + 1,
                got_b[0],
                want_b[i]
            );
        }
        // Moments export and restore.
        let state = opt.state_tensors();
        assert_eq!(state.len(), 4);
        let mut again = AdamW::new(
            vec![("lin.weight".into(), w.clone()), ("lin.bias".into(), b.clone())],
            AdamWParams::default(),
        )?;
        again.load_state(&state, opt.steps())?;
        assert_eq!(again.steps(), 3);
        assert_eq!(
            again.state_tensors()["v.lin.bias"].to_vec1::<f32>()?,
            state["v.lin.bias"].to_vec1::<f32>()?
        );
        Ok(())
    }

    /// The fused update gives the bits of the basic-op update, parameters and moments,
    /// over several steps, with and without weight decay, on an odd-sized tensor.
    #[test]
    fn fused_update_equals_the_basic_op_update_bitwise() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (w0, b0) = (rand(37 * 41), rand(41));
        let make = || -> Result<(Var, Var, AdamW)> {
            let w = Var::from_tensor(&Tensor::from_vec(w0.clone(), (37, 41), &dev)?)?;
            let b = Var::from_tensor(&Tensor::from_vec(b0.clone(), 41, &dev)?)?;
            let opt = AdamW::new(
                vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
                AdamWParams::default(),
            )?;
            Ok((w, b, opt))
        };
        let (wf, bf, mut fused) = make()?;
        let (wr, br, mut basic) = make()?;
        for (step, lr) in [1e-3, 2e-3, 5e-4, 1e-3].into_iter().enumerate() {
            let mut g = HashMap::new();
            g.insert("l.weight".to_string(), Tensor::from_vec(rand(37 * 41), (37, 41), &dev)?);
            g.insert("l.bias".to_string(), Tensor::from_vec(rand(41), 41, &dev)?);
            fused.step(&g, lr)?;
            basic.step_reference(&g, lr)?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            assert_eq!(bits(wf.as_tensor())?, bits(wr.as_tensor())?, "step {step}: weight");
            assert_eq!(bits(bf.as_tensor())?, bits(br.as_tensor())?, "step {step}: bias");
            let (sf, sr) = (fused.state_tensors(), basic.state_tensors());
            for k in sr.keys() {
                assert_eq!(bits(&sf[k])?, bits(&sr[k])?, "step {step}: {k}");
            }
        }
        Ok(())
    }

    #[test]
    fn decay_groups_follow_mae() {
        assert!(decays("backbone.blocks.0.attn.qkv.weight", &[576, 192]));
        assert!(decays("backbone.cls_token", &[1, 1, 192]));
        assert!(!decays("backbone.blocks.0.attn.qkv.bias", &[576]));
        assert!(!decays("backbone.norm.weight", &[192]));
    }
}
