//! The pieces both timely graphs are built from: `pipeline run`'s (this
//! module's parent) and the target cache's fill graph (`cache/fill.rs`).
//! Routing a record into a stage's worker set, a stage operator that skips or
//! fails on bad input, an operator that gathers each timestamp's records, the
//! failure every worker of a process checks, and the two halves of a
//! probe-paced driver loop (the window before a time opens, the drain at the end).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::bail;
use shards::{OnError, Skips};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;
use timely::ExchangeData;

/// A failure (bad input under `on_error: fail`, a stopped trainer, a worker's
/// error), shared by the workers of a process: each one's driver loop checks it
/// and stops, so one failing worker never leaves the others waiting for its progress.
pub type Failure = Arc<Mutex<Option<String>>>;

/// Record the first failure.
pub fn fail(failure: &Failure, message: String) {
    let mut slot = failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    slot.get_or_insert(message);
}

/// The first failure as an error, if there was one.
pub fn check(failure: &Failure) -> anyhow::Result<()> {
    match failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
    {
        Some(msg) => bail!("{msg}"),
        None => Ok(()),
    }
}

/// Runs a worker's driver, posting its error to the process's failure too, so
/// the other workers stop instead of waiting for this one's progress.
pub fn posting_failure<T>(failure: &Failure, drive: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let result = drive();
    if let Err(e) = &result {
        fail(failure, format!("{e:#}"));
    }
    result
}

/// Flow control of a source driven by a probe (timely's queues are unbounded):
/// before time `t` opens, step the worker until the graph's output has passed
/// `t - window`, so at most `window` times are in flight. Times before
/// `start + window` open at once.
pub fn wait_for_window(
    worker: &mut timely::worker::Worker,
    probe: &timely::dataflow::ProbeHandle<u64>,
    (t, start, window): (u64, u64, u64),
    failure: &Failure,
) -> anyhow::Result<()> {
    while t >= start + window && probe.less_equal(&(t - window)) {
        worker.step();
        check(failure)?;
    }
    Ok(())
}

/// Closes the source and steps the worker until the graph has passed every time.
pub fn drain<D: Clone + 'static>(
    worker: &mut timely::worker::Worker,
    input: timely::dataflow::InputHandleVec<u64, D>,
    probe: &timely::dataflow::ProbeHandle<u64>,
    failure: &Failure,
) -> anyhow::Result<()> {
    input.close();
    while !probe.done() {
        worker.step();
        check(failure)?;
    }
    check(failure)
}

/// What a stage operator needs of the records it routes and reports.
pub trait Routed {
    /// Spreads records evenly and deterministically over a worker set.
    fn spread_hash(&self) -> u64;
    /// The shard and sample key, for a skip's log line or a failure.
    fn origin(&self) -> (&str, &str);
}

/// Which worker a record goes to for the next stage: the same one when both
/// stages run on the same workers (fused: moved, not copied), unless `spread`.
pub fn route<R: Routed>(from: &[usize], to: &[usize], me: usize, spread: bool) -> impl FnMut(&R) -> u64 + 'static {
    let fused = from == to && !spread;
    let to = to.to_vec();
    move |r: &R| {
        if fused {
            me as u64
        } else {
            to[(r.spread_hash() % to.len() as u64) as usize] as u64
        }
    }
}

/// How a stage operator treats bad input: `on_error`, where skips are counted
/// and logged, and the process's failure.
#[derive(Clone)]
pub struct BadInput {
    pub policy: OnError,
    pub skips: Skips,
    pub failure: Failure,
}

impl BadInput {
    /// A record that failed: a counted, logged skip, or under `fail` the run's failure.
    fn report(&self, shard: &str, key: &str, reason: &str) {
        match self.policy {
            OnError::Skip => self.skips.record(shard, key, reason),
            OnError::Fail => fail(&self.failure, format!("{shard}:{key}: {reason}")),
        }
    }
}

/// A stage operator: records arrive by an exchange routed by `pact`, and `f`
/// turns each into zero or more records (pushed onto its output vector), or
/// gives the reason it is bad input.
pub fn stage<'s, R, P, F>(
    input: Stream<'s, u64, Vec<R>>,
    name: &str,
    pact: P,
    bad: BadInput,
    mut f: F,
) -> Stream<'s, u64, Vec<R>>
where
    R: Routed + ExchangeData,
    P: FnMut(&R) -> u64 + 'static,
    F: FnMut(R, &mut Vec<R>) -> Result<(), String> + 'static,
{
    input.unary(Exchange::new(pact), name, move |_capability, _info| {
        move |input, output| {
            input.for_each(|time, data| {
                let mut out = Vec::new();
                for r in data.drain(..) {
                    let (shard, key) = {
                        let (s, k) = r.origin();
                        (s.to_string(), k.to_string())
                    };
                    if let Err(reason) = f(r, &mut out) {
                        bad.report(&shard, &key, &reason);
                    }
                }
                output.session(&time).give_iterator(out.into_iter());
            });
        }
    })
}

/// Gathers each timestamp's records and, once the input frontier has passed it
/// (none of its records can still arrive), hands them to `f` and gives what `f`
/// returns at that timestamp. It holds the timestamp's capability until then,
/// so a probe downstream shows exactly which timestamps are complete: the
/// run's sink (a batch) and the cache fill's extract stage (a CLIP batch).
pub fn gather_by_frontier<'s, R, O, P, F>(
    input: Stream<'s, u64, Vec<R>>,
    name: &str,
    pact: P,
    mut f: F,
) -> Stream<'s, u64, Vec<O>>
where
    R: ExchangeData,
    O: Clone + 'static,
    P: FnMut(&R) -> u64 + 'static,
    F: FnMut(u64, Vec<R>) -> Vec<O> + 'static,
{
    input.unary_frontier(Exchange::new(pact), name, move |_capability, _info| {
        let mut pending: BTreeMap<u64, (timely::dataflow::operators::Capability<u64>, Vec<R>)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|time, data| {
                // Timestamps are totally ordered: a stamp is one batch index.
                if let (Some(&t), Some(capability)) = (time.least(), time.retain_least(0)) {
                    pending
                        .entry(t)
                        .or_insert_with(|| (capability, Vec::new()))
                        .1
                        .append(data);
                }
            });
            while let Some((&t, _)) = pending.first_key_value() {
                if frontier.less_equal(&t) {
                    break;
                }
                let (capability, records) = pending.pop_first().expect("first key exists").1;
                output.session(&capability).give_iterator(f(t, records).into_iter());
            }
        }
    })
}
