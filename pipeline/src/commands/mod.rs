//! One module per subcommand: its arguments and its `run`. None is used by
//! another; what they share lives in the library modules beside `commands/`
//! (`job`, `graph`, `cache`, `evaluate`, `cluster`, ...). `pipeline run` is
//! [`crate::job::run`] itself: the ablation runs jobs too.

pub mod ablation;
pub mod bench_cache;
pub mod bench_data;
pub mod bench_train;
pub mod check_ops;
pub mod eval;
pub mod export;
pub mod precompute;
pub mod shards;
pub mod stages_dump;
pub mod viz;
