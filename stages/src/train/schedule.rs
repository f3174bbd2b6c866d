//! Per-iteration learning rate and EMA momentum (MAE `util/lr_sched.py`, BYOL).
//!
//! MAE sets the lr every iteration from a fractional epoch
//! `e = it / iters_per_epoch + epoch`: linear warmup `lr * e / warmup` for
//! `e < warmup`, then half-cosine to `min_lr`. In optimizer steps t (with W
//! warmup steps and T total steps) that is exactly [`Schedule::lr`].

use std::f64::consts::PI;

/// Learning rate schedule in optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak lr (= blr * batch / 256 unless given).
    pub base_lr: f64,
    pub min_lr: f64,
    /// W: steps of linear warmup.
    pub warmup_steps: u64,
    /// T: steps in the whole run.
    pub total_steps: u64,
}

impl Schedule {
    /// lr for the update made at step t (0-based).
    pub fn lr(&self, t: u64) -> f64 {
        let (w, total) = (self.warmup_steps as f64, self.total_steps as f64);
        let t = t as f64;
        if t < w {
            self.base_lr * t / w
        } else if total <= w {
            self.base_lr
        } else {
            let progress = ((t - w) / (total - w)).min(1.0);
            self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (PI * progress).cos())
        }
    }
}

/// EMA momentum at step t of T: `1 - (1 - base) * (cos(pi t / T) + 1) / 2`,
/// base at the start, 1 at the end (BYOL's schedule, 0.996 -> 1).
pub fn ema_momentum(base: f64, t: u64, total_steps: u64) -> f64 {
    let progress = if total_steps == 0 {
        1.0
    } else {
        (t as f64 / total_steps as f64).min(1.0)
    };
    1.0 - (1.0 - base) * ((PI * progress).cos() + 1.0) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_at_known_points() {
        let s = Schedule {
            base_lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5e-3).abs() < 1e-15);
        assert!((s.lr(10) - 1e-3).abs() < 1e-15); // end of warmup = peak
                                                  // Halfway through the cosine: cos(pi/2) = 0, so the midpoint of base and min.
        assert!((s.lr(60) - (1e-3 + 1e-5) / 2.0).abs() < 1e-12);
        // A quarter: min + (base - min) * (1 + cos(pi/4)) / 2.
        let q = 1e-5 + (1e-3 - 1e-5) * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        assert!((s.lr(35) - q).abs() < 1e-12);
        assert!((s.lr(110) - 1e-5).abs() < 1e-15);
        assert!((s.lr(500) - 1e-5).abs() < 1e-15, "clamped after the end");
    }

    #[test]
    fn lr_matches_mae_fractional_epochs() {
        // MAE lr_sched.adjust_learning_rate with 7 iterations per epoch, 3 warmup epochs of 10.
        let (ipe, warm, epochs, lr, min_lr) = (7u64, 3.0, 10.0, 2e-4, 0.0);
        let s = Schedule {
            base_lr: lr,
            min_lr,
            warmup_steps: 21,
            total_steps: 70,
        };
        for t in 0..70u64 {
            let e = t as f64 / ipe as f64;
            let mae = if e < warm {
                lr * e / warm
            } else {
                min_lr + (lr - min_lr) * 0.5 * (1.0 + (PI * (e - warm) / (epochs - warm)).cos())
            };
            assert!((s.lr(t) - mae).abs() < 1e-15, "step {t}: {} vs {mae}", s.lr(t));
        }
    }

    #[test]
    fn ema_momentum_goes_from_base_to_one() {
        assert!((ema_momentum(0.996, 0, 100) - 0.996).abs() < 1e-15);
        assert!((ema_momentum(0.996, 50, 100) - 0.998).abs() < 1e-15);
        assert!((ema_momentum(0.996, 100, 100) - 1.0).abs() < 1e-15);
        let m = ema_momentum(0.996, 25, 100);
        assert!((m - (1.0 - 0.004 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0)).abs() < 1e-15);
    }
}
