//! Lanes: deterministic per (seed, epoch), different across epochs, and each
//! sample exactly once per epoch, checked against a plain sequential read.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use shards::{plan_epoch, LaneReader, OnError, Sample, ShardWriter, Skips, WriterOptions};

/// 7 shards of 13 samples each.
fn make_shards(dir: &std::path::Path) -> Vec<PathBuf> {
    let pattern = dir.join("l-%06d.tar");
    let options = WriterOptions {
        max_samples: 13,
        ..Default::default()
    };
    let mut writer = ShardWriter::new(pattern.to_str().unwrap(), options).unwrap();
    for i in 0..91 {
        writer
            .write(&Sample::new(format!("s{i:03}")).with("cls", i.to_string()))
            .unwrap();
    }
    writer.close().unwrap()
}

/// Every lane's (lane, position, key) sequence for one epoch.
fn epoch_sequence(shards: &[PathBuf], seed: u64, epoch: u64, lanes: usize, buffer: usize) -> Vec<Vec<String>> {
    let plan = plan_epoch(shards, seed, epoch, lanes);
    let skips = Skips::default();
    (0..lanes)
        .map(|lane| {
            LaneReader::new(&plan, lane, seed, epoch, buffer, OnError::Fail, &skips)
                .enumerate()
                .map(|(i, r)| {
                    let r = r.unwrap();
                    assert_eq!((r.lane, r.position), (lane, i as u64));
                    r.sample.key
                })
                .collect()
        })
        .collect()
}

#[test]
fn plan_is_a_permutation_dealt_round_robin() {
    let shards: Vec<PathBuf> = (0..10).map(|i| PathBuf::from(format!("s{i}"))).collect();
    let plan = plan_epoch(&shards, 5, 0, 3);
    assert_eq!(plan.lanes.iter().map(Vec::len).collect::<Vec<_>>(), [4, 3, 3]);
    let dealt: BTreeSet<_> = plan.lanes.iter().flatten().cloned().collect();
    assert_eq!(dealt, shards.iter().cloned().collect());
    assert_eq!(plan, plan_epoch(&shards, 5, 0, 3));
    assert_ne!(plan, plan_epoch(&shards, 5, 1, 3));
    assert_ne!(plan, plan_epoch(&shards, 6, 0, 3));
}

#[test]
fn same_seed_and_epoch_same_sequence_other_epoch_other_order() {
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path());
    let a = epoch_sequence(&shards, 42, 0, 3, 20);
    assert_eq!(a, epoch_sequence(&shards, 42, 0, 3, 20));
    assert_ne!(a, epoch_sequence(&shards, 42, 1, 3, 20));
    assert_ne!(a, epoch_sequence(&shards, 43, 0, 3, 20));

    // Each sample exactly once per epoch, against a sequential read of all shards.
    let all: BTreeSet<String> = (0..91).map(|i| format!("s{i:03}")).collect();
    for epoch in 0..3 {
        let seq = epoch_sequence(&shards, 42, epoch, 3, 20);
        let flat: Vec<&String> = seq.iter().flatten().collect();
        assert_eq!(flat.len(), 91);
        assert_eq!(flat.into_iter().cloned().collect::<BTreeSet<_>>(), all);
    }
}

#[test]
fn shuffle_buffer_shuffles_within_a_lane_and_size_one_keeps_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path());
    let ordered = epoch_sequence(&shards, 1, 0, 1, 1);
    let plan = plan_epoch(&shards, 1, 0, 1);
    // File order: the plan's shards in order, samples in shard order.
    let skips = Skips::default();
    let direct: Vec<String> = plan.lanes[0]
        .iter()
        .flat_map(|p| shards::ShardReader::open(p, OnError::Fail, &skips).unwrap())
        .map(|s| s.unwrap().key)
        .collect();
    assert_eq!(ordered[0], direct);
    let shuffled = epoch_sequence(&shards, 1, 0, 1, 50);
    assert_ne!(shuffled[0], direct);
    let mut sorted = shuffled[0].clone();
    sorted.sort();
    let mut direct_sorted = direct;
    direct_sorted.sort();
    assert_eq!(sorted, direct_sorted);
}
