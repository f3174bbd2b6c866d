//! `pipeline precompute CONFIG`: fill the target cache (DESIGN.md, "Target cache").
//!
//!     shards -> decode -> view (K per sample) -> extract -> store
//!
//! First the cache index: the wanted (store, key, view) entries of the
//! training shards minus those in the stores' index files, a
//! differential-dataflow antijoin ([`crate::cache::index`]). Then a timely
//! graph like the run's computes only the missing views: every worker builds
//! it, each stage runs on the workers of its role (`placement.decode` for
//! decode, `placement.augment` for the view stage, `placement.targets` for the
//! extractors and the store writers), so CLIP can run on the GPU (`train`)
//! processes while the other stages run on `data` processes. The extract stage
//! gathers a timestamp's views and runs CLIP on them in batches. Each extract
//! worker writes its own store shards (names carry a per-run, per-worker id),
//! each under a temporary name and then renamed, its index written after it:
//! a kill loses at most the views not yet in a finished shard, and the next
//! run computes exactly those.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shards::store::{codec, Store, StoreWriter};
use shards::{OnError, ShardReader, Skips};
use stages::sample::{CropBox, Rgb8, StageError};
use stages::targets::{clip, Kind};
use stages::{augment, decode, views, StagesConfig};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Input, Operator, Probe};
use timely::dataflow::{InputHandleVec as InputHandle, ProbeHandle, Stream};

use crate::cache;
use crate::cache::index;
use crate::cluster::ClusterArgs;
use crate::config::RunConfig;
use crate::graph::operators::{
    check, drain, fail, gather_by_frontier, posting_failure, route, stage, wait_for_window, BadInput, Failure, Routed,
};
use crate::placement::Placement;

/// How [`fill`] runs.
#[derive(Debug, Clone)]
pub struct FillOptions {
    pub cluster: ClusterArgs,
    pub shard_views: usize,
    pub batch: usize,
    pub progress: bool,
}

impl FillOptions {
    /// One process of `workers` workers, default sizes (a run's `on_miss: compute`).
    pub fn local(workers: usize) -> FillOptions {
        FillOptions {
            cluster: ClusterArgs::local(workers),
            shard_views: 1000,
            batch: 32,
            progress: false,
        }
    }
}

/// What a precompute did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrecomputeReport {
    /// Store directories, in config order.
    pub stores: Vec<PathBuf>,
    /// (store, key, view) entries the shards want.
    pub wanted: u64,
    /// Entries already stored at start.
    pub present: u64,
    /// Entries computed by this run (extractor calls, one per view and store).
    pub computed: u64,
    /// Store shards found corrupt at start (quarantined; their views recomputed).
    pub corrupt_shards: Vec<String>,
    /// Samples skipped as bad input.
    pub skipped: u64,
    pub seconds: f64,
    pub views_per_s: f64,
    /// Stored views and bytes after the run, over all stores.
    pub stored_views: u64,
    pub store_bytes: u64,
    pub bytes_per_view: f64,
}

/// One sample, then one view of it, on its way into the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Work {
    shard: String,
    key: String,
    /// Shard members, until decode.
    raw: BTreeMap<String, Vec<u8>>,
    /// The views to compute, each with the stores that lack it (until view).
    todo: Vec<(u32, Vec<u32>)>,
    /// The source image's size, and where the decoded region starts in it (after decode).
    source_width: usize,
    source_height: usize,
    left: usize,
    top: usize,
    /// Decoded pixels (the region), then the view's u8 pixels.
    width: usize,
    height: usize,
    pixels: Vec<u8>,
    /// The view index and its stores (after view).
    view: u32,
    stores: Vec<u32>,
    /// Encoded targets per store (after extract).
    encoded: Vec<(u32, Vec<u8>)>,
}

type Works<'s> = Stream<'s, u64, Vec<Work>>;
/// Counters shared by the workers of a process.
#[derive(Debug, Default)]
struct Progress {
    computed: AtomicU64,
    done: AtomicBool,
}

/// Everything the workers share.
struct Shared {
    stages: StagesConfig,
    stores: Vec<Store>,
    kinds: Vec<Kind>,
    /// Missing views per sample key: (view, stores).
    todo: HashMap<String, Vec<(u32, Vec<u32>)>>,
    shards: Vec<PathBuf>,
    placement: Placement,
    policy: OnError,
    skips: Skips,
    teacher: Option<Arc<clip::ClipTeacher>>,
    device: candle_core::Device,
    run_id: String,
    options: FillOptions,
    progress: Arc<Progress>,
    failure: Failure,
}

/// Views of a sample spread by its key (the extract stage batches them per timestamp).
impl Routed for Work {
    fn spread_hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.key.as_bytes())
    }
    fn origin(&self) -> (&str, &str) {
        (&self.shard, &self.key)
    }
}

/// A stage that turns each record into zero or more records (the run graph's
/// stage operator); bad input is a counted skip or, under `fail`, stops the run
/// naming shard and key.
fn step<'s, F>(
    input: Works<'s>,
    name: &'static str,
    sets: (&[usize], &[usize]),
    spread: bool,
    me: usize,
    ctx: &Arc<Shared>,
    f: F,
) -> Works<'s>
where
    F: Fn(&Shared, Work, &mut Vec<Work>) -> Result<(), StageError> + 'static,
{
    let bad = BadInput {
        policy: ctx.policy,
        skips: ctx.skips.clone(),
        failure: ctx.failure.clone(),
    };
    let ctx = ctx.clone();
    stage(input, name, route(sets.0, sets.1, me, spread), bad, move |w, out| {
        f(&ctx, w, out).map_err(|e| format!("{name}: {e}"))
    })
}

/// decode: the whole image (every view of the sample is cut from it).
/// It goes through the run's own decoder (`decode_region`, here with the
/// whole image as the region), so a view's pixels here equal those a run
/// feeds the backbone for it, whatever JPEG decoder the build has.
fn decode_sample(ctx: &Shared, mut w: Work, out: &mut Vec<Work>) -> Result<(), StageError> {
    let sample = shards::Sample {
        key: w.key.clone(),
        files: std::mem::take(&mut w.raw),
    };
    let bytes = decode::image_bytes(&sample)?;
    let (width, height) = decode::image_size(bytes)?;
    let whole = CropBox {
        top: 0,
        left: 0,
        height,
        width,
    };
    // A one-channel run's decode (one luma channel), as its decode stage has it.
    let region = if ctx.stages.channels == 1 {
        let g = decode::decode_region_grey(&ctx.stages.decode, bytes, whole)?;
        (g.left, g.top, g.pixels.width, g.pixels.height, g.pixels.data)
    } else {
        let rgb = decode::decode_region(&ctx.stages.decode, bytes, whole)?;
        (rgb.left, rgb.top, rgb.pixels.width, rgb.pixels.height, rgb.pixels.data)
    };
    (w.source_width, w.source_height) = (width, height);
    (w.left, w.top, w.width, w.height, w.pixels) = region;
    out.push(w);
    Ok(())
}

/// view: the missing views of the sample, each as its own record.
fn cut_views(ctx: &Shared, mut w: Work, out: &mut Vec<Work>) -> Result<(), StageError> {
    /// The decoded image: RGB, or one luma channel in a one-channel run ([`decode_sample`]).
    enum Decoded {
        Rgb(decode::Region),
        Grey(decode::Region<1>),
    }
    let (width, height, data) = (w.width, w.height, std::mem::take(&mut w.pixels));
    let (left, top, source_width, source_height) = (w.left, w.top, w.source_width, w.source_height);
    let decoded = if ctx.stages.channels == 1 {
        Decoded::Grey(decode::Region {
            pixels: stages::sample::Grey8 { width, height, data },
            left,
            top,
            source_width,
            source_height,
        })
    } else {
        Decoded::Rgb(decode::Region {
            pixels: Rgb8 { width, height, data },
            left,
            top,
            source_width,
            source_height,
        })
    };
    let t = &ctx.stages.targets;
    for (v, stores) in std::mem::take(&mut w.todo) {
        let view = views::sample_view(
            &ctx.stages.augment,
            w.source_width,
            w.source_height,
            t.view_seed,
            &w.key,
            v,
        )?;
        let (width, height, pixels) = match &decoded {
            Decoded::Rgb(region) => {
                let p = augment::apply_region(region, &view)?;
                (p.width, p.height, p.data)
            }
            Decoded::Grey(region) => {
                let p = augment::apply_region(region, &view)?;
                (p.width, p.height, p.data)
            }
        };
        out.push(Work {
            shard: w.shard.clone(),
            key: w.key.clone(),
            width,
            height,
            pixels,
            view: v,
            stores,
            ..Default::default()
        });
    }
    Ok(())
}

/// extract: the targets of a group of views, CPU kinds one by one, CLIP in batches.
fn extract(ctx: &Shared, works: &mut [Work]) -> Result<(), String> {
    let s = &ctx.stages;
    let mut clip_jobs: Vec<(usize, u32)> = Vec::new();
    for (i, w) in works.iter_mut().enumerate() {
        let pixels = Rgb8 {
            width: w.width,
            height: w.height,
            data: std::mem::take(&mut w.pixels),
        };
        for &store in &w.stores {
            let kind = ctx.kinds[store as usize];
            if kind == Kind::Clip {
                // The config check refuses CLIP with one channel; a one-plane view
                // here would be read as RGB, silently wrong.
                if pixels.data.len() != 3 * pixels.width * pixels.height {
                    return Err(format!(
                        "{}:{}: view {}: clip targets need an RGB view (stages.channels: 3)",
                        w.shard, w.key, w.view
                    ));
                }
                clip_jobs.push((i, store));
                continue;
            }
            // The run's own targets functions, so a cached target is the one the run
            // would compute: a one-channel view (one byte per pixel) as its targets
            // stage lends it, three equal channels.
            let target = if pixels.data.len() == pixels.width * pixels.height {
                let grey = stages::sample::Grey8 {
                    width: pixels.width,
                    height: pixels.height,
                    data: pixels.data.clone(),
                };
                stages::record::grey_targets(s, &[kind], &grey.to_rgb())
            } else {
                stages::record::view_targets(s, &[kind], &pixels)
            }
            .map_err(|e| format!("{}:{}: view {}: {kind:?}: {e}", w.shard, w.key, w.view))?
            .remove(0);
            let dims = ctx.stores[store as usize].spec.dims;
            w.encoded
                .push((store, codec::encode(&target.values, dims, s.targets.dtype)));
            ctx.progress.computed.fetch_add(1, Ordering::Relaxed);
        }
        w.pixels = pixels.data;
    }
    if clip_jobs.is_empty() {
        return Ok(());
    }
    let teacher = ctx
        .teacher
        .as_ref()
        .ok_or("clip targets on a worker without the CLIP teacher")?;
    let size = teacher.image_size();
    for batch in clip_jobs.chunks(ctx.options.batch.max(1)) {
        let mut input = Vec::with_capacity(batch.len() * 3 * size * size);
        for &(i, _) in batch {
            let w = &works[i];
            let pixels = Rgb8 {
                width: w.width,
                height: w.height,
                data: w.pixels.clone(),
            };
            input.extend(clip::clip_normalized_chw(&pixels));
        }
        let images = candle_core::Tensor::from_vec(input, (batch.len(), 3, size, size), &ctx.device)
            .map_err(|e| format!("clip input: {e}"))?;
        let out = teacher.targets(&images).map_err(|e| format!("clip: {e}"))?;
        let values: Vec<f32> = out
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| format!("clip output: {e}"))?;
        let per_view = values.len() / batch.len();
        for (j, &(i, store)) in batch.iter().enumerate() {
            let dims = ctx.stores[store as usize].spec.dims;
            let encoded = codec::encode(&values[j * per_view..(j + 1) * per_view], dims, s.targets.dtype);
            works[i].encoded.push((store, encoded));
            ctx.progress.computed.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The extract stage: gathers each timestamp's views, and once the frontier
/// has passed it, computes their targets (so CLIP sees full batches).
fn extract_stage<'s>(input: Works<'s>, me: usize, ctx: &Arc<Shared>) -> Works<'s> {
    let sets = &ctx.placement.sets;
    let pact = route(&sets.augment, &sets.targets, me, false);
    let ctx = ctx.clone();
    gather_by_frontier(input, "extract", pact, move |_, mut works| {
        if let Err(e) = extract(&ctx, &mut works) {
            fail(&ctx.failure, e);
            works.clear();
        }
        works
    })
}

/// The store stage, on the extract worker: each view's encoded targets into
/// this worker's writers.
fn store_stage<'s>(
    input: Works<'s>,
    me: usize,
    ctx: &Arc<Shared>,
    writers: Rc<RefCell<Vec<Option<StoreWriter>>>>,
) -> Works<'s> {
    let ctx = ctx.clone();
    input.unary(Pipeline, "store", move |_capability, _info| {
        move |input, output| {
            input.for_each(|time, data| {
                let mut writers = writers.borrow_mut();
                for w in data.drain(..) {
                    for (store, bytes) in w.encoded {
                        let slot = &mut writers[store as usize];
                        if slot.is_none() {
                            let id = format!("{}-w{me}", ctx.run_id);
                            match ctx.stores[store as usize].writer(&id, ctx.options.shard_views) {
                                Ok(writer) => *slot = Some(writer),
                                Err(e) => {
                                    fail(&ctx.failure, format!("{e}"));
                                    return;
                                }
                            }
                        }
                        let writer = slot.as_mut().expect("writer just made");
                        if let Err(e) = writer.push(w.key.clone(), w.view, bytes) {
                            fail(&ctx.failure, format!("writing the store: {e}"));
                        }
                    }
                }
                output.session(&time).give_iterator(std::iter::empty::<Work>());
            });
        }
    })
}

/// Samples per timestamp at the source; the extract stage batches per timestamp.
const CHUNK: usize = 16;
/// Timestamps in flight (flow control, as in the run's graph).
const WINDOW: u64 = 4;

/// Build the graph and drive it on this worker. An error here is posted to
/// the process's shared failure too, so the other workers stop instead of
/// waiting for this one.
fn run_worker(worker: &mut timely::worker::Worker, ctx: Arc<Shared>) -> anyhow::Result<()> {
    posting_failure(&ctx.failure, || drive(worker, &ctx))
}

fn drive(worker: &mut timely::worker::Worker, ctx: &Arc<Shared>) -> anyhow::Result<()> {
    let me = worker.index();
    let writers: Rc<RefCell<Vec<Option<StoreWriter>>>> =
        Rc::new(RefCell::new(ctx.stores.iter().map(|_| None).collect()));
    let mut input: InputHandle<u64, Work> = InputHandle::new();
    let probe = ProbeHandle::new();
    worker.dataflow::<u64, _, _>(|scope| {
        let sets = &ctx.placement.sets;
        let samples = scope.input_from(&mut input);
        // Shard i is read by one source worker: with fewer shards than decode
        // workers, decode spreads their samples over all of them (as the run
        // graph does with its lanes).
        let spread = ctx.shards.len() < sets.decode.len();
        let decoded = step(
            samples,
            "decode",
            (&sets.source, &sets.decode),
            spread,
            me,
            ctx,
            decode_sample,
        );
        let cut = step(
            decoded,
            "view",
            (&sets.decode, &sets.augment),
            false,
            me,
            ctx,
            cut_views,
        );
        let extracted = extract_stage(cut, me, ctx);
        store_stage(extracted, me, ctx, writers.clone()).probe_with(&probe);
    });
    // Data shard i is read by the (i mod n)-th source worker.
    let sources = &ctx.placement.sets.source;
    let mine: Vec<&PathBuf> = match sources.iter().position(|&w| w == me) {
        Some(rank) => ctx.shards.iter().skip(rank).step_by(sources.len()).collect(),
        None => vec![],
    };
    let mut t = 0u64;
    let mut in_chunk = 0;
    for path in mine {
        let shard = path.display().to_string();
        for sample in ShardReader::open(path, ctx.policy, &ctx.skips)? {
            let sample = sample?;
            let Some(todo) = ctx.todo.get(&sample.key) else {
                continue;
            };
            input.send(Work {
                shard: shard.clone(),
                key: sample.key,
                raw: sample.files,
                todo: todo.clone(),
                ..Default::default()
            });
            in_chunk += 1;
            if in_chunk == CHUNK {
                in_chunk = 0;
                t += 1;
                input.advance_to(t);
                wait_for_window(worker, &probe, (t, 0, WINDOW), &ctx.failure)?;
                worker.step();
                check(&ctx.failure)?;
            }
        }
    }
    drain(worker, input, &probe, &ctx.failure)?;
    for writer in writers.borrow_mut().iter_mut() {
        if let Some(writer) = writer.take() {
            writer.finish().context("writing the last store shard")?;
        }
    }
    Ok(())
}

/// Compute every missing view of the config's stores (the work of
/// `pipeline precompute`, and of a run's `on_miss: compute`).
pub fn fill(cfg: &RunConfig, options: &FillOptions) -> anyhow::Result<PrecomputeReport> {
    let started = Instant::now();
    let root = cache::cache_root(cfg)?.to_path_buf();
    let specs = cache::store_specs(&cfg.stages)?;
    let kinds = cfg.stages.targets.kinds.clone();
    let k = cfg.stages.targets.views;
    let stores: Vec<Store> = specs
        .iter()
        .map(|spec| Store::create(&root, spec))
        .collect::<Result<_, _>>()
        .with_context(|| format!("stages.targets.cache {}", root.display()))?;
    let mut report = PrecomputeReport {
        stores: stores.iter().map(|s| s.dir.clone()).collect(),
        ..Default::default()
    };
    // The index on disk, each shard's checksum verified before its views count as present.
    let mut indexes = Vec::new();
    for store in &stores {
        let index = store.load_index(true)?;
        for bad in &index.corrupt {
            if cfg.data.on_error == OnError::Fail {
                bail!(
                    "{}: store shard {} is corrupt: {} (data.on_error: fail; under skip it is set aside and recomputed)",
                    store.dir.display(),
                    bad.shard,
                    bad.reason
                );
            }
            tracing::warn!(
                "store shard {} is corrupt ({}): set aside, its views are recomputed",
                bad.shard,
                bad.reason
            );
            store.quarantine(&bad.shard)?;
            report.corrupt_shards.push(bad.shard.clone());
        }
        if !index.orphans.is_empty() {
            tracing::info!(
                "{}: {} shard(s) without an index (an interrupted or concurrent run) are not counted",
                store.dir.display(),
                index.orphans.len()
            );
        }
        indexes.push(index);
    }
    let shards = cfg.train_shards()?;
    let keys = crate::plan::shard_keys(
        &shards,
        cfg.data.on_error,
        &Skips::quiet(),
        cfg.data.key_cache().as_ref(),
    )?;
    let wanted = cache::wanted(&keys, stores.len(), k);
    let present = cache::present(&indexes);
    report.wanted = wanted.len() as u64;
    let missing = index::missing(wanted, present);
    report.present = report.wanted - missing.len() as u64;
    let mut todo: HashMap<String, BTreeMap<u32, Vec<u32>>> = HashMap::new();
    for (store, key, v) in &missing {
        todo.entry(key.clone()).or_default().entry(*v).or_default().push(*store);
    }
    let todo: HashMap<String, Vec<(u32, Vec<u32>)>> = todo
        .into_iter()
        .map(|(key, views)| (key, views.into_iter().collect()))
        .collect();
    tracing::info!(
        "target cache {}: {} views wanted ({} samples x K={k} x {} store(s)), {} stored, {} to compute",
        root.display(),
        report.wanted,
        keys.iter().map(|(_, k)| k.len()).sum::<usize>(),
        stores.len(),
        report.present,
        missing.len()
    );

    if !missing.is_empty() {
        let placement = Placement::resolve(
            &cfg.cluster,
            &cfg.placement,
            options.cluster.processes,
            options.cluster.workers,
        )?;
        // The CLIP teacher is loaded only by processes that run the extract stage.
        let extracts_here = placement
            .sets
            .targets
            .iter()
            .any(|&w| w / options.cluster.workers == options.cluster.process);
        let device = stages::train::device::open(&cfg.train.device).context("train.device")?;
        let teacher = match (&cfg.stages.targets.clip, kinds.contains(&Kind::Clip) && extracts_here) {
            (Some(clip_cfg), true) => Some(Arc::new(
                clip::ClipTeacher::load(clip_cfg, &device).context("stages.targets.clip")?,
            )),
            _ => None,
        };
        let progress = Arc::new(Progress::default());
        let total = missing.len() as u64;
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let ctx = Arc::new(Shared {
            stages: cfg.stages.clone(),
            stores: stores.clone(),
            kinds: kinds.clone(),
            todo,
            shards,
            placement,
            policy: cfg.data.on_error,
            skips: Skips::default(),
            teacher,
            device,
            run_id: format!("{unix_ms:x}-{}-p{}", std::process::id(), options.cluster.process),
            options: options.clone(),
            progress: progress.clone(),
            failure: Default::default(),
        });
        let skips = ctx.skips.clone();
        let timely_config = crate::cluster::timely_config(&options.cluster)?;
        let bar = options.progress.then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} views {per_sec} eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let results = std::thread::scope(|scope| {
            if let Some(bar) = &bar {
                let progress = progress.clone();
                scope.spawn(move || {
                    while !progress.done.load(Ordering::Relaxed) {
                        bar.set_position(progress.computed.load(Ordering::Relaxed));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
            }
            let results = timely::execute(timely_config, move |worker| run_worker(worker, ctx.clone()))
                .map_err(|e| anyhow::anyhow!("starting timely: {e}"))
                .map(|guards| guards.join());
            progress.done.store(true, Ordering::Relaxed);
            results
        })?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(r) => r.with_context(|| format!("precompute worker {i}"))?,
                Err(e) => bail!("precompute worker {i} stopped: {e}"),
            }
        }
        report.computed = progress.computed.load(Ordering::Relaxed);
        report.skipped = skips.total();
    }
    for store in &stores {
        let index = store.load_index(false)?;
        let manifest = store.write_manifest(&index)?;
        report.stored_views += manifest.views;
        report.store_bytes += manifest.bytes;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.views_per_s = report.computed as f64 / report.seconds.max(1e-9);
    report.bytes_per_view = report.store_bytes as f64 / report.stored_views.max(1) as f64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Uniform};
    use shards::store::Store;

    /// A tiny random CLIP vision tower in the Hugging Face layout, for 28 px views in 4 px patches.
    fn save_tiny_clip(path: &std::path::Path) -> clip::ClipConfig {
        let (d, m, layers, tokens, proj) = (16usize, 32usize, 1usize, 50usize, 8usize);
        let mut rng = shards::rng::stage_rng(0, 0, "tiny-clip", "weights");
        let uniform = Uniform::new(-1.0f32, 1.0).unwrap();
        let mut tensors = HashMap::new();
        let mut put = |name: String, shape: Vec<usize>, center: f32, scale: f32| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| center + scale * uniform.sample(&mut rng)).collect();
            let t = candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap();
            tensors.insert(name, t);
        };
        let v = "vision_model";
        put(format!("{v}.embeddings.class_embedding"), vec![d], 0.0, 1.0);
        put(
            format!("{v}.embeddings.patch_embedding.weight"),
            vec![d, 3, 4, 4],
            0.0,
            0.25,
        );
        put(
            format!("{v}.embeddings.position_embedding.weight"),
            vec![tokens, d],
            0.0,
            0.5,
        );
        let mut norms = vec![format!("{v}.pre_layrnorm"), format!("{v}.post_layernorm")];
        for i in 0..layers {
            let l = format!("{v}.encoder.layers.{i}");
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                put(format!("{l}.self_attn.{p}.weight"), vec![d, d], 0.0, 0.4);
                put(format!("{l}.self_attn.{p}.bias"), vec![d], 0.0, 0.2);
            }
            put(format!("{l}.mlp.fc1.weight"), vec![m, d], 0.0, 0.4);
            put(format!("{l}.mlp.fc1.bias"), vec![m], 0.0, 0.2);
            put(format!("{l}.mlp.fc2.weight"), vec![d, m], 0.0, 0.3);
            put(format!("{l}.mlp.fc2.bias"), vec![d], 0.0, 0.2);
            norms.push(format!("{l}.layer_norm1"));
            norms.push(format!("{l}.layer_norm2"));
        }
        for n in norms {
            put(format!("{n}.weight"), vec![d], 1.0, 0.3);
            put(format!("{n}.bias"), vec![d], 0.0, 0.3);
        }
        put("visual_projection.weight".into(), vec![proj, d], 0.0, 0.4);
        candle_core::safetensors::save(&tensors, path).unwrap();
        clip::ClipConfig {
            weights: path.to_path_buf(),
            image_size: 28,
            patch_size: 4,
            hidden_size: d,
            intermediate_size: m,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            projection_dim: proj,
        }
    }

    #[test]
    fn clip_and_hog_views_go_to_their_stores_in_batches_equal_to_single_forwards() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("clip.safetensors");
        let clip_cfg = save_tiny_clip(&weights);
        let mut cfg = crate::cache::tests::embedded_config(&tmp.path().join("cache"), &["stages.targets.views=1"]);
        cfg.stages.targets.kinds = vec![Kind::Clip, Kind::Hog];
        cfg.stages.targets.clip = Some(clip_cfg.clone());
        cfg.stages.targets.dtype = codec::Dtype::Int8;
        let mut options = FillOptions::local(2);
        options.batch = 7;
        let report = fill(&cfg, &options).unwrap();
        assert_eq!((report.wanted, report.computed), (2 * 1250, 2 * 1250));
        assert_eq!(report.stores.len(), 2);
        assert!(report.stores[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("clip-"));
        let spec = crate::cache::store_specs(&cfg.stages).unwrap().remove(0);
        assert_eq!((spec.tokens, spec.dims), (49, 8));
        let store = Store::find(&tmp.path().join("cache"), &spec).unwrap().unwrap();
        let reader = store.reader(&store.load_index(true).unwrap(), 4);
        // Views recomputed one by one, a batch of one each: the batched, stored targets match.
        let teacher = clip::ClipTeacher::load(&clip_cfg, &candle_core::Device::Cpu).unwrap();
        let shard = &cfg.train_shards().unwrap()[0];
        for sample in ShardReader::open(shard, OnError::Fail, &Skips::default())
            .unwrap()
            .take(10)
        {
            let sample = sample.unwrap();
            let img = decode::apply(&cfg.stages.decode, &sample).unwrap();
            let (view, _) = views::apply(&cfg.stages.augment, &img, 0, &sample.key, 0).unwrap();
            let input = candle_core::Tensor::from_vec(
                clip::clip_normalized_chw(&view),
                (1, 3, 28, 28),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let fresh: Vec<f32> = teacher
                .targets(&input)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let cached = reader.get(&sample.key, 0).unwrap();
            assert_eq!(cached.len(), fresh.len());
            for (token, (a, b)) in fresh.chunks(8).zip(cached.chunks(8)).enumerate() {
                // int8: at most half a step (max |x| / 127 / 2) of the token, plus f32 noise between batch sizes.
                let step = a.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= step / 2.0 + 1e-4,
                        "{} token {token}: {x} vs {y}",
                        sample.key
                    );
                }
            }
        }
        // Nothing left to do.
        assert_eq!(fill(&cfg, &options).unwrap().computed, 0);
        // Missing weights: an error naming the file, before any work.
        cfg.stages.targets.clip = Some(clip::ClipConfig {
            weights: tmp.path().join("absent.safetensors"),
            ..clip_cfg
        });
        let err = format!("{:#}", fill(&cfg, &options).unwrap_err());
        assert!(err.contains("absent.safetensors"), "{err}");
    }
}
