//! The model and trainer at library level, on tiny models and synthetic batches.
//!
//! What can fail here: a parameter that never moves (an op without backward),
//! parameter names or shapes that drift from timm, a resume that is not
//! bitwise exact, gradient accumulation that is not a mean, a NaN that is not
//! caught, a config with impossible shapes that is accepted.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use stages::model::{
    DrawConfig, DrawMode, ModelConfig, NoiseMode, PredOn, PredictorMode, TargetSource, Vit, VitConfig,
};
use stages::train::{clip, global_norm, Batch, TrainConfig, TrainError, Trainer};
use std::collections::HashMap;

/// 16 x 16 grey images, patch 4 (N = 16), D 16, 2 blocks; drawing head D_h 16.
fn tiny_model() -> ModelConfig {
    ModelConfig {
        backbone: VitConfig {
            img_size: 16,
            patch_size: 4,
            in_chans: 1,
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            mlp_ratio: 2.0,
        },
        draw: DrawConfig {
            embed_dim: 16,
            num_heads: 2,
            ..DrawConfig::default()
        },
        target_dim: 8,
        ..ModelConfig::default()
    }
}

fn train_cfg(batch_size: usize) -> TrainConfig {
    TrainConfig {
        batch_size,
        epochs: 10,
        warmup_epochs: 0.0,
        lr: Some(1e-3),
        weight_decay: 0.0,
        ..TrainConfig::default()
    }
}

/// A synthetic batch: smooth-ish random images, 75% masked, random targets.
fn batch(cfg: &ModelConfig, b: usize, seed: u64, epoch: u64) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = &cfg.backbone;
    let (px, n) = (v.in_chans * v.img_size * v.img_size, v.num_patches());
    let images: Vec<f32> = (0..b * px).map(|_| rng.random_range(-1.0..1.0)).collect();
    let smoothed = images.iter().map(|x| 0.5 * x).collect();
    let mut mask = Vec::with_capacity(b * n);
    for _ in 0..b {
        // Exactly n/4 visible per sample, so every sample weighs the same in L_draw.
        let mut m: Vec<u8> = (0..n).map(|i| (i >= n / 4) as u8).collect();
        for i in (1..n).rev() {
            m.swap(i, rng.random_range(0..=i));
        }
        mask.extend(m);
    }
    let targets = (0..b * n * cfg.target_dim)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Batch {
        keys: (0..b).map(|i| format!("s{seed}-{i}")).collect(),
        epoch,
        images,
        shape: [b, v.in_chans, v.img_size, v.img_size],
        mask,
        smoothed: Some(smoothed),
        targets: Some(targets),
        pixels: None,
    }
}

fn snapshot(t: &Trainer) -> HashMap<String, Vec<f32>> {
    t.parameters()
        .into_iter()
        .map(|(n, x)| (n, x.flatten_all().and_then(|x| x.to_vec1()).expect("to_vec")))
        .collect()
}

/// Every ablation mode: after one AdamW step (weight decay off, so only a
/// gradient can move a parameter), every trainable parameter has changed.
#[test]
fn every_parameter_changes_after_one_step_in_every_mode() -> Result<(), TrainError> {
    let mut modes = vec![];
    for draw in [DrawMode::Coarse, DrawMode::Original, DrawMode::None] {
        for noise in [NoiseMode::Mapping, NoiseMode::Concat, NoiseMode::None] {
            modes.push((draw, noise, PredictorMode::Linear, TargetSource::Batch, PredOn::All));
        }
    }
    modes.push((
        DrawMode::Coarse,
        NoiseMode::Mapping,
        PredictorMode::None,
        TargetSource::Ema,
        PredOn::All,
    ));
    modes.push((
        DrawMode::Coarse,
        NoiseMode::Mapping,
        PredictorMode::Linear,
        TargetSource::Ema,
        PredOn::Masked,
    ));
    modes.push((
        DrawMode::None,
        NoiseMode::None,
        PredictorMode::Linear,
        TargetSource::Batch,
        PredOn::Masked,
    ));
    for (draw, noise, predictor, target, pred_on) in modes {
        let mut cfg = tiny_model();
        cfg.draw.mode = draw;
        cfg.noise = noise;
        cfg.predictor = predictor;
        cfg.target = target;
        cfg.pred_on = pred_on;
        let label = format!("{draw:?}/{noise:?}/{predictor:?}/{target:?}/{pred_on:?}");
        let mut t = Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 3, 10)?;
        let before = snapshot(&t);
        let stats = t.step(&batch(&cfg, 4, 1, 0))?;
        assert!(stats.updated && stats.loss.is_finite(), "{label}");
        let after = snapshot(&t);
        assert_eq!(before.len(), after.len());
        let frozen: Vec<&String> = before.keys().filter(|k| before[*k] == after[*k]).collect();
        assert!(frozen.is_empty(), "{label}: parameters that did not move: {frozen:?}");
        let has = |p: &str| before.keys().any(|k| k.starts_with(p));
        assert_eq!(has("draw."), draw != DrawMode::None, "{label}");
        assert_eq!(
            has("draw.mapping."),
            draw != DrawMode::None && noise == NoiseMode::Mapping,
            "{label}"
        );
        assert_eq!(has("predictor."), predictor == PredictorMode::Linear, "{label}");
        assert_eq!(has("mask_token"), draw == DrawMode::None, "{label}");
    }
    Ok(())
}

/// The backbone's names and shapes equal timm's `vit_small_patch16_224` state
/// dict without the classifier head (`head.weight`, `head.bias`): 21,665,664
/// values = timm's 22,050,664 minus the head's 385,000.
#[test]
fn vit_small_names_and_shapes_match_timm() -> candle_core::Result<()> {
    let cfg = VitConfig::vit_small_patch16_224();
    let varmap = VarMap::new();
    let vit = Vit::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let mut got: Vec<(String, Vec<usize>)> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    got.push(("pos_embed".into(), vit.pos_embed().dims().to_vec()));
    got.sort();
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, 384]),
        ("pos_embed".into(), vec![1, 197, 384]),
        ("patch_embed.proj.weight".into(), vec![384, 3, 16, 16]),
        ("patch_embed.proj.bias".into(), vec![384]),
        ("norm.weight".into(), vec![384]),
        ("norm.bias".into(), vec![384]),
    ];
    for i in 0..12 {
        for (n, s) in [
            ("norm1.weight", vec![384]),
            ("norm1.bias", vec![384]),
            ("attn.qkv.weight", vec![1152, 384]),
            ("attn.qkv.bias", vec![1152]),
            ("attn.proj.weight", vec![384, 384]),
            ("attn.proj.bias", vec![384]),
            ("norm2.weight", vec![384]),
            ("norm2.bias", vec![384]),
            ("mlp.fc1.weight", vec![1536, 384]),
            ("mlp.fc1.bias", vec![1536]),
            ("mlp.fc2.weight", vec![384, 1536]),
            ("mlp.fc2.bias", vec![384]),
        ] {
            want.push((format!("blocks.{i}.{n}"), s));
        }
    }
    want.sort();
    assert_eq!(got, want);
    let total: usize = got.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(total, 21_665_664);
    Ok(())
}

/// The base preset has timm's vit_base_patch16_224 sizes: 85,798,656 values
/// without the head (timm: 86,567,656 with its 769,000-value head).
#[test]
fn vit_base_preset_size() {
    let c = VitConfig::vit_base_patch16_224();
    let (d, n, k) = (c.embed_dim, c.num_patches(), c.patch_dim());
    let block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d);
    let total = (d * k + d) + d + (n + 1) * d + c.depth * block + 2 * d;
    assert_eq!(total, 86_567_656 - 769_000);
}

/// A tiny model overfits one fixed batch: the loss falls by more than half.
#[test]
fn tiny_model_overfits_one_batch() -> Result<(), TrainError> {
    let cfg = tiny_model();
    let mut t = Trainer::new(
        &cfg,
        &TrainConfig {
            lr: Some(3e-3),
            ..train_cfg(8)
        },
        &Device::Cpu,
        5,
        1000,
    )?;
    let b = batch(&cfg, 8, 2, 0);
    let first = t.step(&b)?.loss;
    let mut last = first;
    for _ in 0..80 {
        last = t.step(&b)?.loss;
    }
    assert!(last < first / 2.0, "loss {first} -> {last}");
    Ok(())
}

/// Stop after 2 steps, save, resume in a new trainer: the next losses are
/// bitwise those of an uninterrupted run (batch targets and EMA targets).
#[test]
fn resume_is_bitwise_exact() -> Result<(), TrainError> {
    for target in [TargetSource::Batch, TargetSource::Ema] {
        let mut cfg = tiny_model();
        cfg.target = target;
        let tc = TrainConfig {
            warmup_epochs: 1.0,
            weight_decay: 0.05,
            ..train_cfg(4)
        };
        let batches: Vec<Batch> = (0..5).map(|i| batch(&cfg, 4, 10 + i, i / 3)).collect();
        let mut straight = Trainer::new(&cfg, &tc, &Device::Cpu, 11, 3)?;
        let want: Vec<u64> = batches
            .iter()
            .map(|b| straight.step(b).map(|s| s.loss.to_bits()))
            .collect::<Result<_, _>>()?;

        let dir = tempfile::tempdir().map_err(|e| TrainError::Io {
            path: "tempdir".into(),
            source: e,
        })?;
        let ckpt = dir.path().join("ckpt");
        let mut first = Trainer::new(&cfg, &tc, &Device::Cpu, 11, 3)?;
        for b in &batches[..2] {
            first.step(b)?;
        }
        first.save(&ckpt)?;
        first.step(&batches[2])?; // work after the save is lost, as in a crash
        drop(first);

        let mut resumed = Trainer::new(&cfg, &tc, &Device::Cpu, 11, 3)?;
        let state = resumed.resume(&ckpt)?;
        assert_eq!((state.step, state.data_position), (2, 2));
        let got: Vec<u64> = batches[state.data_position as usize..]
            .iter()
            .map(|b| resumed.step(b).map(|s| s.loss.to_bits()))
            .collect::<Result<_, _>>()?;
        assert_eq!(got, want[2..], "{target:?}");
        // Saving again replaces the checkpoint atomically, leaving no temporaries.
        resumed.save(&ckpt)?;
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["ckpt".to_string()]);
    }
    Ok(())
}

/// A checkpoint from another config or seed is refused with a clear message.
#[test]
fn resume_refuses_another_config() -> Result<(), TrainError> {
    let cfg = tiny_model();
    let dir = tempfile::tempdir().map_err(|e| TrainError::Io {
        path: "tempdir".into(),
        source: e,
    })?;
    let ckpt = dir.path().join("ckpt");
    Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 1, 3)?.save(&ckpt)?;
    let other = TrainConfig {
        blr: 1e-4,
        ..train_cfg(4)
    };
    let err = Trainer::new(&cfg, &other, &Device::Cpu, 1, 3)?
        .resume(&ckpt)
        .expect_err("must refuse");
    assert!(err.to_string().contains("another model/train config"), "{err}");
    let err = Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 2, 3)?
        .resume(&ckpt)
        .expect_err("must refuse");
    assert!(err.to_string().contains("run seed 1"), "{err}");
    Ok(())
}

/// Two accumulated half-batches update the parameters as one full batch does.
/// eps = 1 makes the first AdamW step nearly linear in the gradient, so equal
/// updates mean equal gradients (with the default eps the first step is
/// lr * sign(g), blind to the gradient's size).
#[test]
fn gradient_accumulation_equals_full_batch() -> Result<(), TrainError> {
    let cfg = tiny_model();
    let full = batch(&cfg, 4, 7, 0);
    let half = |r: std::ops::Range<usize>| {
        let (px, n, dt) = (16 * 16, 16, cfg.target_dim);
        Batch {
            keys: full.keys[r.clone()].to_vec(),
            epoch: 0,
            images: full.images[r.start * px..r.end * px].to_vec(),
            shape: [r.len(), 1, 16, 16],
            mask: full.mask[r.start * n..r.end * n].to_vec(),
            smoothed: full.smoothed.as_ref().map(|s| s[r.start * px..r.end * px].to_vec()),
            targets: full
                .targets
                .as_ref()
                .map(|t| t[r.start * n * dt..r.end * n * dt].to_vec()),
            pixels: None,
        }
    };
    let base = TrainConfig {
        eps: 1.0,
        ..train_cfg(4)
    };
    let mut one = Trainer::new(&cfg, &base, &Device::Cpu, 9, 10)?;
    let s1 = one.step(&full)?;
    let mut acc = Trainer::new(&cfg, &TrainConfig { accum_iter: 2, ..base }, &Device::Cpu, 9, 10)?;
    let a = acc.step(&half(0..2))?;
    assert!(!a.updated);
    let b = acc.step(&half(2..4))?;
    assert!(b.updated && b.step == 1);
    assert!(
        (s1.grad_norm - b.grad_norm).abs() < 1e-5 * s1.grad_norm,
        "{} vs {}",
        s1.grad_norm,
        b.grad_norm
    );
    assert!(
        ((a.loss + b.loss) / 2.0 - s1.loss).abs() < 1e-5,
        "losses {} {} vs {}",
        a.loss,
        b.loss,
        s1.loss
    );
    let (p1, p2) = (snapshot(&one), snapshot(&acc));
    for (name, v) in &p1 {
        let worst = v.iter().zip(&p2[name]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-7, "{name}: differs by {worst}");
    }
    Ok(())
}

/// PyTorch's clip_grad_norm_: the global norm over all gradients, scaled by
/// max / (norm + 1e-6) when above max, untouched otherwise.
#[test]
fn clipping_scales_to_the_max_norm() -> Result<(), TrainError> {
    let dev = Device::Cpu;
    let mut g = HashMap::new();
    g.insert("a".to_string(), candle_core::Tensor::new(&[3f32, 0.0], &dev)?);
    g.insert("b".to_string(), candle_core::Tensor::new(&[[4f32]], &dev)?);
    let norm = global_norm(&g, ["a", "b"].into_iter())?;
    assert!((norm - 5.0).abs() < 1e-12);
    clip(&mut g, norm, 1.0)?;
    let after = global_norm(&g, ["a", "b"].into_iter())?;
    assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-6, "{after}");
    clip(&mut g, after, 10.0)?;
    assert_eq!(global_norm(&g, ["a", "b"].into_iter())?, after);

    // In the trainer, the reported norm is the one before clipping.
    let cfg = tiny_model();
    let b = batch(&cfg, 4, 3, 0);
    let plain = Trainer::new(&cfg, &train_cfg(4), &dev, 4, 10)?.step(&b)?;
    let clipped = Trainer::new(
        &cfg,
        &TrainConfig {
            clip_grad: Some(1e-3),
            ..train_cfg(4)
        },
        &dev,
        4,
        10,
    )?
    .step(&b)?;
    assert_eq!(plain.grad_norm.to_bits(), clipped.grad_norm.to_bits());
    assert!(plain.grad_norm > 1e-3);
    Ok(())
}

/// The one-pass CPU gradient norm equals an f64 sum written out here and the
/// basic-op norm to rounding, with the same bits on 1, 2 and 3 threads.
#[test]
fn fused_gradient_norm_matches_a_plain_sum_and_the_basic_ops() -> Result<(), TrainError> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let sizes: [&[usize]; 4] = [&[1], &[7], &[197, 64], &[3, 40_001]];
    let mut g = HashMap::new();
    let mut plain = 0f64;
    for (i, dims) in sizes.iter().enumerate() {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        plain += v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>();
        g.insert(format!("p{i}"), candle_core::Tensor::from_vec(v, *dims, &Device::Cpu)?);
    }
    let names: Vec<String> = (0..sizes.len()).map(|i| format!("p{i}")).collect();
    let norm_on = |threads: usize| -> Result<f64, TrainError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| global_norm(&g, names.iter().map(|s| s.as_str())))
    };
    let fused = norm_on(1)?;
    assert!(
        (fused - plain.sqrt()).abs() < 1e-12 * plain.sqrt(),
        "{fused} vs {}",
        plain.sqrt()
    );
    assert_eq!(fused.to_bits(), norm_on(2)?.to_bits(), "1 vs 2 threads");
    assert_eq!(fused.to_bits(), norm_on(3)?.to_bits(), "1 vs 3 threads");
    let basic = {
        let _r = stages::model::ops::scoped_reference(true);
        global_norm(&g, names.iter().map(|s| s.as_str()))?
    };
    assert!((fused - basic).abs() < 1e-5 * fused, "{fused} vs basic ops {basic}");
    Ok(())
}

/// A NaN in the data stops the run with an error naming the step; the
/// parameters are untouched and the last checkpoint still loads.
#[test]
fn non_finite_loss_stops_and_keeps_the_checkpoint() -> Result<(), TrainError> {
    let cfg = tiny_model();
    let dir = tempfile::tempdir().map_err(|e| TrainError::Io {
        path: "tempdir".into(),
        source: e,
    })?;
    let ckpt = dir.path().join("ckpt");
    let mut t = Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 1, 10)?;
    t.step(&batch(&cfg, 4, 1, 0))?;
    t.save(&ckpt)?;
    let mut bad = batch(&cfg, 4, 2, 0);
    bad.images[17] = f32::NAN;
    let before = snapshot(&t);
    let err = t.step(&bad).expect_err("NaN must stop the run");
    assert!(matches!(err, TrainError::NonFinite { step: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("at step 1"), "{err}");
    assert_eq!(before, snapshot(&t), "no update after a NaN");
    let state = Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 1, 10)?.resume(&ckpt)?;
    assert_eq!(state.step, 1);
    Ok(())
}

/// Shapes that cannot work are rejected before training, naming the key.
#[test]
fn impossible_shapes_are_rejected_with_the_key() {
    let msg = |cfg: ModelConfig| match Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 1, 10) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted {cfg:?}"),
    };
    let mut c = tiny_model();
    c.backbone.img_size = 30;
    assert!(msg(c).contains("model.backbone.img_size 30 is not divisible by model.backbone.patch_size 4"));
    let mut c = tiny_model();
    c.backbone.num_heads = 3;
    assert!(msg(c).contains("model.backbone.num_heads 3 does not divide model.backbone.embed_dim 16"));
    let mut c = tiny_model();
    c.draw.num_heads = 5;
    assert!(msg(c).contains("model.draw.num_heads 5"));
    let mut c = tiny_model();
    c.predictor = PredictorMode::None;
    assert!(msg(c).contains("predictor: none"));
    let err = Trainer::new(
        &tiny_model(),
        &TrainConfig {
            accum_iter: 3,
            ..train_cfg(4)
        },
        &Device::Cpu,
        1,
        10,
    )
    .err();
    assert!(err.is_some_and(|e| e
        .to_string()
        .contains("train.batch_size 4 is not divisible by train.accum_iter 3")));

    // A batch of the wrong size is an error at the step, not a panic.
    let cfg = tiny_model();
    let mut t = Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 1, 10).expect("valid");
    let mut b = batch(&cfg, 4, 1, 0);
    b.mask.pop();
    let err = t.step(&b).expect_err("short mask");
    assert!(err.to_string().contains("mask has 63 values, expected 64"), "{err}");
}

/// z depends on (run seed, epoch, key) only, not on the batch around it.
#[test]
fn noise_is_per_sample_and_reproducible() -> Result<(), TrainError> {
    let cfg = tiny_model();
    let t = Trainer::new(&cfg, &train_cfg(4), &Device::Cpu, 1, 10)?;
    let keys = |ks: &[&str]| ks.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let z2 = t.noise(&keys(&["x", "y"]), 3)?.expect("noise").to_vec2::<f32>()?;
    let z1 = t.noise(&keys(&["y"]), 3)?.expect("noise").to_vec2::<f32>()?;
    assert_eq!(z2[1], z1[0]);
    assert_eq!(z2[0].len(), 16);
    assert_ne!(t.noise(&keys(&["y"]), 4)?.expect("noise").to_vec2::<f32>()?[0], z1[0]);
    Ok(())
}

/// `train.precision: bf16` (bf16 products, f32 master weights and AdamW moments) tracks
/// the f32 run: over 100 steps on 4 cycling batches every loss stays within 1% (relative)
/// of the f32 loss. bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per
/// operand); AdamW then moves both runs along nearly the same path. Every parameter
/// still updates, and parameters and moments stay f32.
#[test]
fn bf16_products_track_the_f32_losses() -> Result<(), TrainError> {
    use stages::model::autocast::Precision;
    let cfg = tiny_model();
    let batches: Vec<Batch> = (0..4).map(|i| batch(&cfg, 8, 20 + i, 0)).collect();
    let run = |precision: Precision| -> Result<(Vec<f64>, Trainer), TrainError> {
        let tc = TrainConfig {
            precision,
            ..train_cfg(8)
        };
        let mut t = Trainer::new(&cfg, &tc, &Device::Cpu, 5, 100)?;
        let losses = (0..100)
            .map(|i| t.step(&batches[i % 4]).map(|s| s.loss))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((losses, t))
    };
    let (full, _) = run(Precision::F32)?;
    let (half, t) = run(Precision::Bf16)?;
    let worst = full
        .iter()
        .zip(&half)
        .map(|(f, h)| (f - h).abs() / f.abs())
        .fold(0f64, f64::max);
    eprintln!("bf16 vs f32 over 100 steps: largest relative loss difference {worst:.2e}");
    assert!(worst < 0.01, "largest relative loss difference {worst}");
    assert!(worst > 0.0, "bf16 products must differ from f32 (were they used?)");
    assert!(half[99] < 0.8 * half[0], "bf16 run learns: {} -> {}", half[0], half[99]);
    for (name, p) in t.parameters() {
        assert_eq!(p.dtype(), DType::F32, "{name} is the f32 master copy");
    }

    // One bf16 step moves every parameter (weight decay off).
    let tc = TrainConfig {
        precision: Precision::Bf16,
        ..train_cfg(8)
    };
    let mut t = Trainer::new(&cfg, &tc, &Device::Cpu, 3, 10)?;
    let before = snapshot(&t);
    assert!(t.step(&batches[0])?.updated);
    for (name, after) in snapshot(&t) {
        assert_ne!(before[&name], after, "{name} did not move in bf16");
    }
    Ok(())
}

/// The u8 feed (DESIGN.md "keep image data as u8 until the sink"): the same views
/// sent as u8 pixels, with x̂ blurred from the u8 pixels and rounded, train like
/// the f32 batch whose x̂ is the blur of the normalized view. The images reach
/// the model bitwise equal (the first L_pred is identical); x̂ differs by at most
/// 0.5/255/std per pixel, and the losses of 30 steps stay within 0.1% (relative).
#[test]
fn u8_batches_train_like_f32_batches() -> Result<(), TrainError> {
    use stages::sample::Rgb8;
    use stages::train::U8Pixels;
    use stages::{augment, smooth};
    let mut cfg = tiny_model();
    cfg.backbone.in_chans = 3;
    let (mean, std) = ([0.286f32; 3], [0.353f32; 3]);
    let blur = smooth::Config {
        sigma: 1.25,
        method: smooth::Method::Fast,
    };
    let (b, side) = (8, 16);
    let make = |seed: u64| -> (Batch, Batch) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let views: Vec<Rgb8> = (0..b)
            .map(|_| Rgb8 {
                width: side,
                height: side,
                data: (0..side * side * 3)
                    .map(|i| ((i / 3 % side) * 12 + rng.random_range(0..60)).min(255) as u8)
                    .collect(),
            })
            .collect();
        let base = batch(&cfg, b, seed, 0);
        let f32_batch = Batch {
            images: views.iter().flat_map(|v| augment::normalize(v, mean, std)).collect(),
            smoothed: Some(
                views
                    .iter()
                    .flat_map(|v| smooth::apply(&blur, &augment::normalize(v, mean, std), 3, side, side).unwrap())
                    .collect(),
            ),
            ..base.clone()
        };
        let u8_batch = Batch {
            images: vec![],
            smoothed: None,
            pixels: Some(U8Pixels {
                images: views.iter().flat_map(|v| v.data.clone()).collect(),
                smoothed: Some(views.iter().flat_map(|v| smooth::apply_u8(&blur, v).unwrap()).collect()),
                mean: mean.to_vec(),
                std: std.to_vec(),
            }),
            ..base
        };
        (f32_batch, u8_batch)
    };
    let pairs: Vec<(Batch, Batch)> = (0..2).map(|i| make(40 + i)).collect();
    let mut a = Trainer::new(&cfg, &train_cfg(b), &Device::Cpu, 8, 100)?;
    let mut u = Trainer::new(&cfg, &train_cfg(b), &Device::Cpu, 8, 100)?;
    let mut worst = 0f64;
    for step in 0..30 {
        let (f, q) = &pairs[step % 2];
        let (sf, sq) = (a.step(f)?, u.step(q)?);
        if step == 0 {
            assert_eq!(
                sf.loss_pred, sq.loss_pred,
                "the u8 images must reach the model bitwise equal"
            );
            assert_ne!(
                sf.loss_draw, sq.loss_draw,
                "x̂ is rounded to u8, so L_draw moves a little"
            );
        }
        worst = worst.max((sf.loss - sq.loss).abs() / sf.loss.abs());
    }
    eprintln!("u8 vs f32 feed over 30 steps: largest relative loss difference {worst:.2e}");
    assert!(worst < 1e-3, "largest relative loss difference {worst}");
    Ok(())
}

/// The modes of [`every_parameter_changes_after_one_step_in_every_mode`] that the
/// fused ops meet differently: coarse / original drawing, the baseline, EMA targets, masked L_pred.
fn op_modes() -> Vec<ModelConfig> {
    let mut out = vec![];
    for (draw, noise, predictor, target, pred_on) in [
        (
            DrawMode::Coarse,
            NoiseMode::Mapping,
            PredictorMode::Linear,
            TargetSource::Batch,
            PredOn::All,
        ),
        (
            DrawMode::Original,
            NoiseMode::Concat,
            PredictorMode::Linear,
            TargetSource::Batch,
            PredOn::Masked,
        ),
        (
            DrawMode::None,
            NoiseMode::None,
            PredictorMode::Linear,
            TargetSource::Batch,
            PredOn::Masked,
        ),
        (
            DrawMode::Coarse,
            NoiseMode::Mapping,
            PredictorMode::None,
            TargetSource::Ema,
            PredOn::All,
        ),
    ] {
        let mut cfg = tiny_model();
        // Odd sizes: 3 heads of 8, 13 patches per row... N = 49, T = 50 with cls.
        cfg.backbone.img_size = 28;
        cfg.backbone.embed_dim = 24;
        cfg.backbone.num_heads = 3;
        cfg.draw.mode = draw;
        cfg.noise = noise;
        cfg.predictor = predictor;
        cfg.target = target;
        cfg.pred_on = pred_on;
        out.push(cfg);
    }
    out
}

/// The gradient of every parameter from the fused ops equals the basic-op
/// reference's (`model.reference_ops: true`), within 1e-4 of the tensor's largest
/// gradient, in every mode of [`op_modes`].
#[test]
fn fused_ops_gradients_match_the_reference_ops_gradients() -> Result<(), TrainError> {
    for cfg in op_modes() {
        let label = format!("{:?}/{:?}/{:?}", cfg.draw.mode, cfg.noise, cfg.target);
        let t = Trainer::new(&cfg, &train_cfg(3), &Device::Cpu, 5, 10)?;
        let inputs = t.inputs(&batch(&cfg, 3, 7, 0))?;
        let grads = |reference: bool| -> Result<(f64, HashMap<String, Vec<f32>>), TrainError> {
            let _ops = stages::model::ops::scoped_reference(reference);
            let losses = t.model().forward(&inputs)?;
            let g = losses.loss.backward()?;
            let mut out = HashMap::new();
            for (name, var) in t.varmap().data().lock().expect("varmap").iter() {
                let gv = g.get(var).unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
                out.insert(name.clone(), gv.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok((losses.loss.to_scalar::<f32>()? as f64, out))
        };
        let ((lf, gf), (lr, gr)) = (grads(false)?, grads(true)?);
        assert!(
            (lf - lr).abs() < 1e-5 * lr.abs(),
            "{label}: loss {lf} vs reference {lr}"
        );
        for (name, want) in &gr {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = gf[name].iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-4 * scale + 1e-9,
                "{label}: d {name} differs by {err} (largest gradient {scale})"
            );
        }
    }
    Ok(())
}

/// A training run with the fused ops tracks the reference-ops run: the same
/// first loss, and losses over 20 steps within 1e-3 relative.
#[test]
fn fused_ops_training_tracks_the_reference_ops() -> Result<(), TrainError> {
    for cfg in op_modes() {
        let label = format!("{:?}/{:?}/{:?}", cfg.draw.mode, cfg.noise, cfg.target);
        let reference = ModelConfig {
            reference_ops: true,
            ..cfg.clone()
        };
        let mut fast = Trainer::new(&cfg, &train_cfg(3), &Device::Cpu, 5, 10)?;
        let mut slow = Trainer::new(&reference, &train_cfg(3), &Device::Cpu, 5, 10)?;
        assert_eq!(snapshot(&fast), snapshot(&slow), "{label}: same init");
        let mut worst = 0f64;
        for step in 0..20 {
            let b = batch(&cfg, 3, 100 + step, 0);
            let (a, r) = (fast.step(&b)?, slow.step(&b)?);
            let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-3);
            if step == 0 {
                assert!(
                    rel(a.loss, r.loss) < 1e-5,
                    "{label}: step 0 loss {} vs reference {}",
                    a.loss,
                    r.loss
                );
            }
            worst = worst.max(rel(a.loss, r.loss));
        }
        // Over 20 steps the rounding differences grow through AdamW; stated bound 1e-3.
        assert!(
            worst < 1e-3,
            "{label}: losses over 20 steps differ by up to {worst} relative"
        );
    }
    Ok(())
}

/// The same loss bits with 1 and with 2 (and 3) threads: every fused op and the
/// GEMM split work into fixed chunks, never by the thread count.
#[test]
fn losses_do_not_depend_on_the_thread_count() -> Result<(), TrainError> {
    let cfg = &op_modes()[0];
    let run = |threads: usize| -> Result<Vec<u64>, TrainError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            let mut t = Trainer::new(cfg, &train_cfg(8), &Device::Cpu, 9, 10)?;
            (0..4)
                .flat_map(|s| match t.step(&batch(cfg, 8, 40 + s, 0)) {
                    Ok(st) => vec![Ok(st.loss.to_bits()), Ok(st.grad_norm.to_bits())],
                    Err(e) => vec![Err(e)],
                })
                .collect()
        })
    };
    let one = run(1)?;
    assert_eq!(one, run(2)?, "1 vs 2 threads");
    assert_eq!(one, run(3)?, "1 vs 3 threads");
    Ok(())
}
