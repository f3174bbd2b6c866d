//! `pipeline bench data`: images/s through each CPU stage alone and through
//! the whole chain, one JSON line per figure.
//!
//! The samples are read into memory first, so tar parsing and disk speed are
//! not measured. Each figure runs `--threads` std threads for `--seconds`;
//! thread t processes samples t, t + T, t + 2T, ... (its own share), cycling
//! over the set until the time is up. `per_thread` = images/s / threads (on
//! this 2-core machine, threads <= 2, that is per core). Stages alone run on
//! the previous stage's outputs for the first `--stage-inputs` samples. The
//! `decode_image_crate` figure decodes the same JPEGs through `image`'s
//! decoder, for the decoder choice written in `stages/src/decode.rs`. The
//! `chain_to_decode` figure times the chain and decode alone image by image,
//! interleaved, for a ratio that the machine's drifting speed does not move.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use stages::record::{Record, Stage};
use stages::sample::Rgb8;
use stages::{augment, decode, targets};

/// Arguments of `pipeline bench data`.
#[derive(Debug, clap::Args)]
pub struct BenchDataArgs {
    /// The run config (YAML).
    pub config: PathBuf,
    /// Override config values: `--set stages.mask.ratio=0.5`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Shards to read (brace patterns); default: the config's `data.train`.
    #[arg(long, value_name = "PATTERN")]
    pub shards: Vec<String>,
    /// Worker threads per figure.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seconds per figure.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Samples prepared as inputs for the stage-alone figures.
    #[arg(long, default_value_t = 128)]
    pub stage_inputs: usize,
    /// Only these figures (comma separated: decode, decode_image_crate,
    /// augment, normalize, mask, smooth, target_pixel, target_hog,
    /// target_canny, chain, chain_to_decode, graph); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Epochs of the data through the graph figure: the first one runs on
    /// memory fresh from the kernel (page faults), later ones recycle it, as
    /// a long run does.
    #[arg(long, default_value_t = 3)]
    pub graph_epochs: usize,
    /// The graph figure on a cluster (`--processes N --process I --hostfile
    /// FILE`, `--workers` per process, roles from `cluster.roles`), the other
    /// figures skipped: data processes feed the train process over timely's
    /// TCP, which prints the figure. One process: the figure runs on `--threads` workers.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
}

/// Run `pipeline bench data`.
pub fn run(args: &BenchDataArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load(&args.config, &args.set)?;
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    let patterns = if args.shards.is_empty() {
        cfg.data.train.clone()
    } else {
        args.shards.clone()
    };
    if args.cluster.processes > 1 {
        return graph_figure(&cfg, patterns, &args.cluster, args.graph_epochs);
    }
    if args.only.iter().all(|o| o == "graph") && !args.only.is_empty() {
        // The graph reads its shards itself: no copy in memory first (for
        // shards on object storage that would be a second download).
        let local = crate::cluster::ClusterArgs::local(args.threads);
        return graph_figure(&cfg, patterns, &local, args.graph_epochs);
    }
    let paths = shards::expand(&patterns).context("expanding --shards")?;
    let skips = shards::Skips::default();
    let mut raws = Vec::new();
    for path in &paths {
        for raw in shards::ShardReader::open(path, cfg.data.on_error, &skips)? {
            raws.push(raw?);
        }
    }
    anyhow::ensure!(!raws.is_empty(), "no samples in {patterns:?}");
    let st = &cfg.stages;
    st.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let size = st.augment.size;
    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let figure = |name: &str, n: usize, f: &(dyn Fn(usize) + Sync)| {
        if want(name) {
            let (images, secs, cpu) = measure(n, args.threads, args.seconds, f);
            let rate = images as f64 / secs;
            let per_cpu = if cpu > 0.0 {
                (images as f64 / cpu).round()
            } else {
                f64::NAN
            };
            println!(
                "{}",
                serde_json::json!({
                    "figure": name, "threads": args.threads, "images": images,
                    "seconds": (secs * 1000.0).round() / 1000.0,
                    "images_per_s": rate.round(), "per_thread": (rate / args.threads as f64).round(),
                    "cpu_seconds": (cpu * 100.0).round() / 100.0, "images_per_cpu_s": per_cpu,
                    "size": size, "samples": n,
                })
            );
        }
    };
    eprintln!(
        "{} samples from {} shards; decoder {}",
        raws.len(),
        paths.len(),
        decode::DECODER_CHOICE
    );

    figure("decode", raws.len(), &|i| {
        std::hint::black_box(decode::apply(&st.decode, &raws[i]).ok());
    });
    figure("decode_image_crate", raws.len(), &|i| {
        if let Some((_, bytes)) = raws[i].first(&["jpg", "jpeg", "png"]) {
            std::hint::black_box(decode::decode_with_image_crate(bytes).ok());
        }
    });

    // Each record stage alone, through the functions the graph runs
    // (`Stages::apply`), on records the stages before it filled in (prepared
    // once, from the first `--stage-inputs` samples). Each call takes a copy of
    // its input record, which the graph moves instead: that copy is part of the
    // figure (most of it for mask).
    let list = crate::job::standalone_stages(&cfg)?;
    let k = args.stage_inputs.clamp(1, raws.len());
    let mut records: Vec<Record> = raws[..k].iter().map(|r| Record::of_sample(r, 0)).collect();
    let mut views: Vec<Rgb8> = Vec::new();
    for stage in Stage::RECORD {
        anyhow::ensure!(
            !records.is_empty(),
            "none of the first {k} samples passes the stages before {}",
            stage.name()
        );
        // decode alone is the `decode` figure above (the whole image); the stage reads the view's rows.
        let name = if stage == Stage::Decode {
            "decode_view"
        } else {
            stage.name()
        };
        figure(name, records.len(), &|i| {
            std::hint::black_box(list.apply(stage, records[i].clone()).ok());
        });
        records = records.into_iter().filter_map(|r| list.apply(stage, r).ok()).collect();
        if stage == Stage::Augment {
            views = records.iter().map(|r| r.pixels.clone().into()).collect();
        }
    }
    // The extractors one by one on the u8 views (the pixel target on the normalized view).
    let normalized: Vec<Vec<f32>> = views
        .iter()
        .map(|v| augment::normalize(v, st.augment.mean, st.augment.std))
        .collect();
    for kind in [targets::Kind::Pixel, targets::Kind::Hog, targets::Kind::Canny] {
        figure(&format!("target_{}", kind.name()), views.len(), &|i| {
            std::hint::black_box(targets::compute(kind, &st.targets, &views[i], &normalized[i], st.patch).ok());
        });
    }
    let kinds: Vec<&str> = st.targets.kinds.iter().map(|k| k.name()).collect();
    eprintln!(
        "chain: the record stages on one sample: decode -> augment -> mask -> smooth (sigma {}) -> {kinds:?}{}",
        st.smooth.sigma,
        if list.reads_cache() {
            " (from the target cache)"
        } else {
            ""
        }
    );
    let chain = |i: usize| {
        std::hint::black_box(list.run(Record::of_sample(&raws[i], 0)).ok());
    };
    figure("chain", raws.len(), &chain);
    if want("chain_to_decode") {
        let (images, decode_s, chain_s) = interleaved(
            raws.len(),
            args.threads,
            args.seconds,
            &|i| {
                std::hint::black_box(decode::apply(&st.decode, &raws[i]).ok());
            },
            &chain,
        );
        // Both sums are thread-seconds: images over them is a per-thread rate.
        let per_thread = |s: f64| (images as f64 / s).round();
        println!(
            "{}",
            serde_json::json!({
                "figure": "chain_to_decode", "threads": args.threads, "images": images,
                "ratio": (decode_s / chain_s * 1000.0).round() / 1000.0,
                "decode_per_thread": per_thread(decode_s), "chain_per_thread": per_thread(chain_s),
                "size": size, "samples": raws.len(),
            })
        );
    }
    if want("graph") {
        graph_figure(
            &cfg,
            patterns,
            &crate::cluster::ClusterArgs::local(args.threads),
            args.graph_epochs,
        )?;
    }
    Ok(())
}

/// The chain against decode alone, interleaved: each thread decodes a block
/// of 8 images, runs the chain on the same 8, and so on (the two in
/// alternating order from block to block), adding up the time of each. The
/// ratio of the two sums does not drift with the machine's speed, which on a
/// shared machine moves by a third within seconds and made the ratio of the
/// separate `decode` and `chain` figures swing between 0.44 and 0.65. Blocks,
/// not single images, so that each side runs with its own code and tables
/// warm in cache, as it does alone.
/// Returns (images, seconds in `first`, seconds in `second`), summed over threads.
fn interleaved(
    n: usize,
    threads: usize,
    seconds: f64,
    first: &(dyn Fn(usize) + Sync),
    second: &(dyn Fn(usize) + Sync),
) -> (u64, f64, f64) {
    const BLOCK: usize = 8;
    let start = Instant::now();
    let totals = std::sync::Mutex::new((0u64, 0f64, 0f64));
    std::thread::scope(|s| {
        for t in 0..threads {
            let totals = &totals;
            s.spawn(move || {
                let (mut done, mut a, mut b) = (0u64, 0f64, 0f64);
                let mut i = t;
                let mut block = 0usize;
                while start.elapsed().as_secs_f64() < seconds {
                    let images: Vec<usize> = (0..BLOCK).map(|k| (i + k * threads) % n).collect();
                    let time = |f: &(dyn Fn(usize) + Sync)| {
                        let t0 = Instant::now();
                        for &j in &images {
                            f(j);
                        }
                        t0.elapsed().as_secs_f64()
                    };
                    if block % 2 == 0 {
                        a += time(first);
                        b += time(second);
                    } else {
                        b += time(second);
                        a += time(first);
                    }
                    i += BLOCK * threads;
                    block += 1;
                    done += BLOCK as u64;
                }
                if let Ok(mut tot) = totals.lock() {
                    tot.0 += done;
                    tot.1 += a;
                    tot.2 += b;
                }
            });
        }
    });
    totals.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// The same chain through the `pipeline run` dataflow (lanes reading the
/// shards from disk, the stage operators, the sink assembling batches, no
/// trainer), `epochs` epochs on `threads` timely workers: one line for the
/// whole graph, one per stage with its records/s and busy fraction.
fn graph_figure(
    cfg: &crate::config::RunConfig,
    patterns: Vec<String>,
    cluster: &crate::cluster::ClusterArgs,
    epochs: usize,
) -> anyhow::Result<()> {
    let mut cfg = cfg.clone();
    cfg.data.train = patterns;
    let placement =
        crate::placement::Placement::resolve(&cfg.cluster, &cfg.placement, cluster.processes, cluster.workers)?;
    let data_workers = placement.sets.decode.len();
    let got = crate::job::data_throughput(&cfg, cluster, epochs)?;
    if got.delivered == 0 {
        // A data process: the train process, which holds the sink, reports.
        eprintln!(
            "process {}: the data stages ran for {:.1} s",
            cluster.process, got.seconds
        );
        return Ok(());
    }
    let rate = got.delivered as f64 / got.seconds;
    println!(
        "{}",
        serde_json::json!({
            "figure": "graph", "processes": cluster.processes, "threads": cluster.workers,
            "decode_workers": data_workers, "images": got.delivered, "epochs": epochs,
            "seconds": (got.seconds * 1000.0).round() / 1000.0,
            "images_per_s": rate.round(), "per_thread": (rate / cluster.workers as f64).round(),
            "per_decode_worker": (rate / data_workers.max(1) as f64).round(),
            "wire_bytes_per_record": got.wire_bytes_per_record.round(),
        })
    );
    for r in got.stage_rates {
        println!(
            "{}",
            serde_json::json!({
                "figure": format!("graph_{}", r.stage), "threads": cluster.workers,
                "images_per_s": r.records_per_s.round(), "busy": (r.busy * 1000.0).round() / 1000.0,
            })
        );
    }
    Ok(())
}

/// Run `f(i)` on `threads` threads, thread t taking i = t, t + T, ... (mod n),
/// until `seconds` pass. Returns (calls, elapsed seconds, CPU seconds of the
/// threads). On a machine shared with other work, calls per CPU second is
/// the per-core speed; calls per elapsed second is what this machine gave.
fn measure(n: usize, threads: usize, seconds: f64, f: &(dyn Fn(usize) + Sync)) -> (u64, f64, f64) {
    let count = AtomicU64::new(0);
    let cpu_ticks = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (count, cpu_ticks) = (&count, &cpu_ticks);
            s.spawn(move || {
                let ticks0 = thread_cpu_ticks();
                let mut i = t;
                let mut done = 0u64;
                while start.elapsed().as_secs_f64() < seconds {
                    f(i % n);
                    i += threads;
                    done += 1;
                }
                count.fetch_add(done, Ordering::Relaxed);
                cpu_ticks.fetch_add(thread_cpu_ticks().saturating_sub(ticks0), Ordering::Relaxed);
            });
        }
    });
    // Linux reports thread times in USER_HZ ticks, 100 per second on x86-64.
    let cpu = cpu_ticks.load(Ordering::Relaxed) as f64 / 100.0;
    (count.load(Ordering::Relaxed), start.elapsed().as_secs_f64(), cpu)
}

/// User + system CPU ticks of the calling thread (`/proc/thread-self/stat`
/// fields 14 and 15), 0 where that file is missing.
fn thread_cpu_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return 0;
    };
    // The command name may hold spaces: fields start after its closing ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}
