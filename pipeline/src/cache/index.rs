//! The target cache's index as differential-dataflow collections: what a
//! precompute (or a cached run) still has to compute is the wanted views
//! minus the stored ones, an antijoin (DESIGN.md, "Target cache").
//!
//! The stored views are the store's index on disk (its shards' index files,
//! [`shards::store::Store::load_index`]), loaded as an input at start:
//! differential-dataflow does not persist arrangements, so the files are the
//! durable form and the collection is rebuilt from them each time.
//! [`missing_targets`] is a plain function over collections, apart from the
//! disk I/O (differential's `bfs.rs` style), so a test can feed it directly.

use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::VecCollection;

/// One target of one view: (store index among the config's extractors, sample key, view index).
pub type Entry = (u32, String, u32);

/// The wanted entries that are not present: `wanted ⋉̸ distinct(present)`.
/// Either input may hold an entry more than once; each missing entry comes out once.
pub fn missing_targets<'scope, T>(
    wanted: VecCollection<'scope, T, Entry>,
    present: VecCollection<'scope, T, Entry>,
) -> VecCollection<'scope, T, Entry>
where
    T: timely::progress::Timestamp + Lattice + Ord,
{
    wanted
        .distinct()
        .map(|entry| (entry, ()))
        .antijoin(present.distinct())
        .map(|(entry, ())| entry)
}

/// Run [`missing_targets`] once on a single worker: returns the missing
/// entries, sorted.
pub fn missing(wanted: Vec<Entry>, present: Vec<Entry>) -> Vec<Entry> {
    let out: Arc<Mutex<Vec<(Entry, isize)>>> = Arc::default();
    let sink = out.clone();
    timely::execute_directly(move |worker| {
        let (mut wanted_in, mut present_in, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (wanted_in, wanted) = scope.new_collection::<Entry, isize>();
            let (present_in, present) = scope.new_collection::<Entry, isize>();
            let (probe, _) = missing_targets(wanted, present)
                .inspect(move |(entry, _time, diff)| {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((entry.clone(), *diff));
                })
                .probe();
            (wanted_in, present_in, probe)
        });
        for entry in wanted {
            wanted_in.insert(entry);
        }
        for entry in present {
            present_in.insert(entry);
        }
        wanted_in.advance_to(1);
        present_in.advance_to(1);
        wanted_in.flush();
        present_in.flush();
        worker.step_while(|| probe.less_than(&1));
    });
    let updates = std::mem::take(&mut *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    // Consolidate: within one round the output may carry an entry's +1 and -1 separately.
    let mut counts: std::collections::BTreeMap<Entry, isize> = Default::default();
    for (entry, diff) in updates {
        *counts.entry(entry).or_default() += diff;
    }
    counts.into_iter().filter(|(_, n)| *n > 0).map(|(e, _)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn entries(n: u32, k: u32) -> Vec<Entry> {
        (0..n)
            .flat_map(|i| (0..k).flat_map(move |v| [(0, format!("s{i:03}"), v), (1, format!("s{i:03}"), v)]))
            .collect()
    }

    #[test]
    fn missing_is_wanted_minus_present_like_a_set_difference() {
        let wanted = entries(30, 3);
        // Present: every third entry, some twice, plus entries nobody wants.
        let mut present: Vec<Entry> = wanted.iter().step_by(3).cloned().collect();
        present.extend(wanted.iter().step_by(6).cloned());
        present.push((0, "gone".into(), 0));
        present.push((2, "s000".into(), 0));
        let oracle: BTreeSet<Entry> = {
            let have: BTreeSet<&Entry> = present.iter().collect();
            wanted.iter().filter(|e| !have.contains(e)).cloned().collect()
        };
        let got = missing(wanted, present);
        assert_eq!(got, oracle.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn nothing_present_means_everything_missing_once_and_all_present_means_none() {
        let mut wanted = entries(5, 2);
        let all: Vec<Entry> = wanted.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        wanted.extend(entries(5, 2));
        assert_eq!(missing(wanted.clone(), vec![]), all);
        assert!(missing(wanted.clone(), wanted).is_empty());
    }
}
