//! CrossMAE's stages and model.
//!
//! Each data stage is one file holding a serde `Config` (whose `Default` is the
//! paper's value) and a pure function of (sample, config, rng), with no
//! knowledge of timely or files (DESIGN.md). The caller derives the rng from
//! `(run seed, epoch, sample key, stage name)` with [`shards::rng::stage_rng`].
//! The training side lives in [`model`] (ViT backbone, drawing head, CrossMAE)
//! and [`train`] (optimizer, schedule, EMA, checkpoints).

pub mod augment;
pub mod chain;
pub mod decode;
pub mod eval;
pub mod mask;
pub mod model;
pub mod npy;
pub mod record;
pub mod resize;
pub mod sample;
mod simd;
pub mod smooth;
pub mod targets;
pub mod train;
pub mod views;

pub use chain::StagesConfig;
