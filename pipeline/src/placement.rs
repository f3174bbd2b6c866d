//! Placement: which workers run each stage, from the roles of the processes.
//!
//! Workers are numbered globally: process p runs workers `p*W .. (p+1)*W`.
//! A process is `data` (runs the data stages), `train` (runs the sink and the
//! trainer) or `all`. Each stage names the role whose workers run it; the
//! sink runs on the first worker of the first process that trains.

use crate::metrics::Stage;
use anyhow::bail;
use serde::{Deserialize, Serialize};

/// A process's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the data stages.
    Data,
    /// Runs the sink and the trainer.
    Train,
    /// Both (the default for a single process).
    All,
}

/// The `cluster:` section: the role of each process, by process index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub roles: Vec<Role>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { roles: vec![Role::All] }
    }
}

/// The `placement:` section: the role whose workers run each stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// The lanes (reading shards).
    pub source: Role,
    pub decode: Role,
    pub augment: Role,
    pub mask: Role,
    pub smooth: Role,
    pub targets: Role,
}

impl Default for PlacementConfig {
    /// The whole CPU chain fused on every data worker, one exchange into the sink.
    fn default() -> Self {
        PlacementConfig {
            source: Role::Data,
            decode: Role::Data,
            augment: Role::Data,
            mask: Role::Data,
            smooth: Role::Data,
            targets: Role::Data,
        }
    }
}

/// Global worker indices of each stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSets {
    pub source: Vec<usize>,
    pub decode: Vec<usize>,
    pub augment: Vec<usize>,
    pub mask: Vec<usize>,
    pub smooth: Vec<usize>,
    pub targets: Vec<usize>,
}

impl StageSets {
    /// The workers of a data stage. The sink is not placed here (it runs where
    /// the trainer is), so it has none.
    pub fn of(&self, stage: Stage) -> &[usize] {
        match stage {
            Stage::Decode => &self.decode,
            Stage::Augment => &self.augment,
            Stage::Mask => &self.mask,
            Stage::Smooth => &self.smooth,
            Stage::Targets => &self.targets,
            Stage::Sink => &[],
        }
    }

    /// The workers of the step before `stage` (the lanes before decode).
    pub fn before(&self, stage: Stage) -> &[usize] {
        match stage.previous() {
            Some(previous) => self.of(previous),
            None => &self.source,
        }
    }
}

/// The resolved placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub sets: StageSets,
    pub sink_worker: usize,
}

fn workers_of(role: Role, roles: &[Role], per_process: usize) -> Vec<usize> {
    roles
        .iter()
        .enumerate()
        .filter(|(_, r)| **r == Role::All || **r == role || role == Role::All)
        .flat_map(|(p, _)| p * per_process..(p + 1) * per_process)
        .collect()
}

impl Placement {
    /// Resolve for `processes` processes of `per_process` workers each.
    pub fn resolve(
        cluster: &ClusterConfig,
        placement: &PlacementConfig,
        processes: usize,
        per_process: usize,
    ) -> anyhow::Result<Placement> {
        let roles: Vec<Role> = if processes == 1 && cluster.roles.len() <= 1 {
            vec![Role::All]
        } else if cluster.roles.len() == processes {
            cluster.roles.clone()
        } else {
            bail!(
                "cluster.roles: {} roles given for {processes} processes (one per process index: data, train or all)",
                cluster.roles.len()
            );
        };
        let set = |role: Role, key: &str| {
            let workers = workers_of(role, &roles, per_process);
            if workers.is_empty() {
                bail!("placement.{key}: no process has role {role:?} (cluster.roles: {roles:?})");
            }
            Ok(workers)
        };
        let sinks = set(Role::Train, "sink")?;
        Ok(Placement {
            sets: StageSets {
                source: set(placement.source, "source")?,
                decode: set(placement.decode, "decode")?,
                augment: set(placement.augment, "augment")?,
                mask: set(placement.mask, "mask")?,
                smooth: set(placement.smooth, "smooth")?,
                targets: set(placement.targets, "targets")?,
            },
            sink_worker: sinks[0],
        })
    }

    /// The lanes read by `worker`: lane l belongs to the (l mod n)-th source worker.
    pub fn lanes_of(&self, worker: usize, lanes: usize) -> Vec<usize> {
        let n = self.sets.source.len();
        match self.sets.source.iter().position(|&w| w == worker) {
            Some(rank) => (0..lanes).filter(|l| l % n == rank).collect(),
            None => vec![],
        }
    }

    /// Whether process `p` (of `per_process` workers) runs the trainer.
    pub fn trains(&self, process: usize, per_process: usize) -> bool {
        self.sink_worker / per_process == process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_train_and_two_data_processes() {
        let cluster = ClusterConfig {
            roles: vec![Role::Train, Role::Data, Role::Data],
        };
        let p = Placement::resolve(&cluster, &PlacementConfig::default(), 3, 2).unwrap();
        assert_eq!(p.sets.decode, vec![2, 3, 4, 5]);
        assert_eq!(p.sink_worker, 0);
        assert!(p.trains(0, 2) && !p.trains(1, 2));
        assert_eq!(p.lanes_of(3, 8), vec![1, 5]);
        assert!(p.lanes_of(0, 8).is_empty());
        // Every lane has exactly one owner.
        let mut owned: Vec<usize> = (0..6).flat_map(|w| p.lanes_of(w, 8)).collect();
        owned.sort();
        assert_eq!(owned, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn single_process_runs_everything() {
        let p = Placement::resolve(&ClusterConfig::default(), &PlacementConfig::default(), 1, 2).unwrap();
        assert_eq!(p.sets.source, vec![0, 1]);
        assert_eq!(p.sink_worker, 0);
    }

    #[test]
    fn roles_must_match_processes_and_cover_stages() {
        let cluster = ClusterConfig {
            roles: vec![Role::Train, Role::Data],
        };
        assert!(Placement::resolve(&cluster, &PlacementConfig::default(), 3, 1).is_err());
        let cluster = ClusterConfig {
            roles: vec![Role::Data, Role::Data],
        };
        assert!(Placement::resolve(&cluster, &PlacementConfig::default(), 2, 1).is_err());
    }
}
