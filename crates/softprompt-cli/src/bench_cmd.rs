//! `softprompt bench`: times the frozen backbone's forward, training forward and input-gradient
//! backward on a batch like a training step's, says where the time goes per layer kind, and
//! measures this machine's f32 matrix-multiply ceiling with the same product in the same run, so
//! efficiency is a ratio. Prints one run's figures (text, or JSON lines with `--json`).

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Args;
use serde_json::json;
use softprompt::backbone::profile::{self, Direction};
use softprompt::backbone::{Backbone, BackboneInput, ModelInfo};
use std::time::Instant;

use crate::args::whole;

/// Arguments of `bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// MODEL.
    #[arg(default_value = "smollm2-135m")]
    model: String,
    /// Rows per batch.
    #[arg(long, default_value_t = 8, value_parser = whole("--batch", 1, "rows per batch"))]
    batch: usize,
    /// Positions per row.
    #[arg(long, default_value_t = 64, value_parser = whole("--len", 1, "positions per row"))]
    len: usize,
    /// Give rows random lengths between half and all of --len (right-padded, as in training).
    #[arg(long)]
    ragged: bool,
    /// The first N positions are the same in every row (a prepended soft prompt), as in prompt
    /// tuning: the backbone computes them once per batch. At most --len.
    #[arg(long, default_value_t = 0, value_parser = whole("--shared-prefix", 0, "positions shared by every row"))]
    shared_prefix: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = whole("--reps", 1, "repetitions"))]
    reps: usize,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// Time real training steps (head, loss and AdamW included) and evaluation on the recipe of
    /// this training TOML (e.g. examples/sentiment.toml) instead of the bare backbone.
    #[arg(long)]
    recipe: Option<std::path::PathBuf>,
    /// Training steps timed with --recipe (after 2 warm-up steps; the median is reported).
    #[arg(long, default_value_t = 10, value_parser = whole("--steps", 1, "training steps timed"))]
    steps: usize,
    /// Dev rows scored for the evaluation throughput with --recipe.
    #[arg(long, default_value_t = 64, value_parser = whole("--eval-rows", 1, "dev rows scored"))]
    eval_rows: usize,
    /// Instead of MODEL, a random-weight Llama of shape HIDDENxLAYERSxHEADSxKV_HEADSxINTERMEDIATE
    /// (e.g. 2048x16x32x8x8192, about Llama-3.2-1B without its vocabulary), to see how cost
    /// grows with width.
    #[arg(long, conflicts_with_all = ["recipe", "generate"])]
    random_llama: Option<String>,
    /// How to hold the frozen linear weights: `f32`, `file` (the file's storage, e.g. GGUF
    /// Q4_1, converted tile by tile), `f16`, `bf16` or `q8_0`; overrides the recipe's `weights`.
    /// Default: the recipe's, else f32. Not with --random-llama (its weights are f32).
    #[arg(long, value_enum)]
    weights: Option<softprompt::backbone::WeightStorage>,
    /// Time generation instead: single-stream greedy tokens/s with a prompt-tuning adapter (the
    /// workload of scripts/reference/peft_generate_speed.py), then --clients requests over
    /// --adapters adapters batched together against the same requests one at a time.
    #[arg(long, conflicts_with = "recipe")]
    generate: bool,
    /// New tokens per request (--generate).
    #[arg(long, default_value_t = 32, value_parser = whole("--max-tokens", 1, "new tokens per request"))]
    max_tokens: usize,
    /// Virtual tokens of each adapter (--generate).
    #[arg(long = "virtual", default_value_t = 20, value_parser = whole("--virtual", 1, "virtual tokens of each adapter"))]
    virtual_tokens: usize,
    /// Concurrent requests (--generate).
    #[arg(long, default_value_t = 16, value_parser = whole("--clients", 1, "concurrent requests"))]
    clients: usize,
    /// Distinct adapters among the concurrent requests (--generate).
    #[arg(long, default_value_t = 4, value_parser = whole("--adapters", 1, "distinct adapters"))]
    adapters: usize,
}

/// The random Llama of `--random-llama`.
fn random_model(spec: &str) -> Result<Box<dyn Backbone>> {
    let dims: Vec<usize> = spec
        .split('x')
        .map(|v| v.parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--random-llama {spec}: expected HIDDENxLAYERSxHEADSxKV_HEADSxINTERMEDIATE"))?;
    let [hidden, layers, heads, kv_heads, intermediate] = dims[..] else {
        anyhow::bail!("--random-llama {spec}: expected five numbers HIDDENxLAYERSxHEADSxKV_HEADSxINTERMEDIATE");
    };
    let cfg = softprompt::backbone::llama::LlamaConfig {
        shape: softprompt::backbone::Shape {
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim: hidden / heads.max(1),
            intermediate,
            vocab: 32_000,
            max_positions: 4096,
        },
        eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: Default::default(),
    };
    let weights = softprompt::backbone::random::random_llama(cfg, 7, &Device::Cpu)?;
    let path = softprompt::backbone::KernelPath::default_for(&Device::Cpu, weights.dtype());
    Ok(softprompt::backbone::llama::build(weights, path)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Matrix-multiply FLOPs of one forward over `tokens` positions whose keys span `keys` slots
/// on average (projections, MLP and attention; the work actually needed).
fn forward_flops(info: &ModelInfo, tokens: f64, keys: f64) -> f64 {
    let (d, i) = (info.hidden as f64, info.intermediate as f64);
    let kvd = (info.kv_heads * info.head_dim()) as f64;
    let per_token = 2.0 * (d * (d + 2.0 * kvd) + d * d + 3.0 * d * i) + 4.0 * keys * d;
    info.layers as f64 * per_token * tokens
}

/// GFLOP/s of the product the fused kernels use for f32 weights (packed panels), on the shape
/// of the MLP's gate and up projections.
fn matmul_ceiling(info: &ModelInfo, rows: usize) -> f64 {
    let (k, n) = (info.hidden, 2 * info.intermediate);
    let x: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32 * 0.01).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.01).collect();
    let w = softprompt_kernels::packed::PackedWeight::pack(&w, n, k);
    let mut out = vec![0f32; rows * n];
    let mut times = Vec::new();
    for _ in 0..5 {
        let s = Instant::now();
        w.forward(&x, &mut out, rows, false);
        times.push(s.elapsed().as_secs_f64());
    }
    2.0 * (rows * k * n) as f64 / median(times) / 1e9
}

fn batch_input(bb: &dyn Backbone, args: &BenchArgs) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let (b, t) = (args.batch, args.len);
    let id = |i: usize| (i * 7919 % 20000) as u32 + 100;
    let ids: Vec<u32> = (0..b * t)
        .map(|i| if i % t < args.shared_prefix { id(i % t) } else { id(i) })
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let lens: Vec<usize> = (0..b)
        .map(|r| {
            if args.ragged {
                t / 2 + (r * 7919 + 13) % (t - t / 2 + 1)
            } else {
                t
            }
        })
        .map(|l| l.clamp(args.shared_prefix.min(t), t))
        .collect();
    let mask: Vec<u32> = (0..b * t).map(|i| u32::from(i % t < lens[i / t])).collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
    Ok((bb.embed(&ids)?, mask, lens))
}

/// Prints the per-kind profile as a table or JSON lines.
fn print_profile(kinds: &std::collections::BTreeMap<(&'static str, Direction), f64>, per: f64, json: bool) {
    if json {
        for ((kind, dir), secs) in kinds {
            let dir = if *dir == Direction::Forward {
                "forward"
            } else {
                "backward"
            };
            println!(
                "{}",
                json!({"workload": "profile", "kind": kind, "direction": dir, "seconds": secs / per})
            );
        }
        return;
    }
    println!("  {:<10} {:>9} {:>9}", "kind", "forward", "backward");
    let mut names: Vec<&str> = kinds.keys().map(|(k, _)| *k).collect();
    names.dedup();
    let mut total = 0.0;
    for k in names {
        let get = |d| kinds.get(&(k, d)).copied().unwrap_or(0.0) / per;
        total += get(Direction::Forward) + get(Direction::Backward);
        println!(
            "  {:<10} {:>9.3} {:>9.3}",
            k,
            get(Direction::Forward),
            get(Direction::Backward)
        );
    }
    println!("  {:<10} {:>19.3}", "sum", total);
}

/// The training-step and evaluation workloads of a real recipe.
fn bench_recipe(args: &BenchArgs, path: &std::path::Path) -> Result<()> {
    use softprompt::train;
    // Paths in the recipe are relative to its folder, as for `train --config`.
    let table = crate::train_config::read_config_table(path)?;
    let mut cfg = crate::train_config::config_from_table(table, &path.display().to_string())?;
    cfg.baseline_template = None;
    cfg.weights = args.weights.unwrap_or(cfg.weights);
    cfg.output = std::env::temp_dir().join(format!("softprompt-bench-{}", std::process::id()));
    let p = train::prepare(&cfg, &mut train::Quiet)?;
    let mut learner = train::new_learner(&p)?;
    let mut order = p.data_order();
    let total = args.steps + 2;
    let mut times = Vec::new();
    for step in 1..=total {
        profile::set_enabled(step > 2);
        let s = Instant::now();
        train::step(&p, &mut learner, &mut order, step, total)?;
        if step > 2 {
            times.push(s.elapsed().as_secs_f64());
        }
    }
    profile::set_enabled(false);
    let kinds = profile::totals();
    profile::reset();
    let step_s = median(times.clone());
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let (prompt, prefix) = learner.prompt.eval_parts(&*p.model.backbone)?;
    let update = learner.prompt.input_update()?;
    let dev = &p.tasks[0].dev;
    let mut rows = dev[..args.eval_rows.min(dev.len())].to_vec();
    if prompt.is_none() && prefix.is_some() {
        // Late prompt tuning: the prefix stands for the rows' virtual tokens.
        rows = softprompt::train::late_prompt::without_virtual_tokens(&rows);
    }
    let rows = rows.as_slice();
    let scorer = softprompt::infer::evaluate::Scorer::new(&p.model, p.task(), prompt.as_ref(), learner.head.as_ref())?
        .with_prefix(prefix.as_ref())
        .with_input_update(update.as_ref());
    let s = Instant::now();
    scorer.evaluate(rows, cfg.eval_batch, false)?;
    let eval_s = s.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&cfg.output);
    let info = p.model.backbone.info().clone();
    let ceiling = matmul_ceiling(&info, 256);
    let line = json!({
        "workload": "train_step", "recipe": path.display().to_string(), "steps": args.steps,
        "weights": cfg.weights, "peak_rss_mb": crate::memory::memory_mib().map(|(_, peak)| peak),
        "batch": cfg.batch, "s_per_step_median": step_s, "s_per_step_mean": mean,
        "s_per_step_min": times.iter().cloned().fold(f64::INFINITY, f64::min),
        "s_per_step_max": times.iter().cloned().fold(0.0, f64::max),
        "eval_rows": rows.len(), "eval_rows_per_s": rows.len() as f64 / eval_s,
        "matmul_ceiling_gflops_256_rows": ceiling, "threads": rayon::current_num_threads(),
    });
    if args.json {
        println!("{line}");
    } else {
        println!(
            "recipe {} · batch {} · weights {:?} · peak RSS {:.0} MiB · {} threads\ntraining step (splice, forward, head, loss, backward, AdamW): median {:.3} s, mean {mean:.3} s over {} steps\nevaluation: {} rows in {eval_s:.2} s = {:.1} rows/s\nmatmul ceiling (256 rows): {ceiling:.1} GFLOP/s\nwhere the time goes (seconds per step):",
            path.display(), cfg.batch, cfg.weights, crate::memory::memory_mib().map_or(0.0, |(_, peak)| peak), rayon::current_num_threads(), step_s, times.len(), rows.len(), rows.len() as f64 / eval_s
        );
    }
    print_profile(&kinds, times.len() as f64, args.json);
    Ok(())
}

/// Runs `bench`.
pub fn bench(args: BenchArgs) -> Result<()> {
    if args.shared_prefix > args.len {
        anyhow::bail!(
            "--shared-prefix is {}, longer than the rows (--len {}); it must be at most --len",
            args.shared_prefix,
            args.len
        );
    }
    if let (Some(spec), Some(w)) = (&args.random_llama, args.weights) {
        if w != softprompt::backbone::WeightStorage::F32 {
            anyhow::bail!(
                "--weights {} holds a model file's weights another way; --random-llama {spec} builds \
                 f32 weights (leave --weights out)",
                w.name()
            );
        }
    }
    if args.generate {
        let b = crate::bench_generate::GenerateBench {
            max_tokens: args.max_tokens,
            virtual_tokens: args.virtual_tokens,
            clients: args.clients,
            adapters: args.adapters,
            reps: args.reps,
        };
        return crate::bench_generate::run(&args.model, args.weights.unwrap_or_default(), &b, args.json);
    }
    if let Some(path) = args.recipe.clone() {
        return bench_recipe(&args, &path);
    }
    let loaded;
    let random;
    let bb: &dyn Backbone = match &args.random_llama {
        Some(spec) => {
            random = random_model(spec)?;
            random.as_ref()
        }
        None => {
            loaded = crate::args::load_with(&args.model, args.weights.unwrap_or_default())?;
            &*loaded.backbone
        }
    };
    let info = bb.info().clone();
    let (embeds, mask, lens) = batch_input(bb, &args)?;
    let input = BackboneInput {
        embeds: &embeds,
        mask: &mask,
        token_types: None,
    };
    let (mut fwd, mut fwd_train, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
    let reps = args.reps;
    for rep in 0..reps {
        // the last repetition is profiled (timing spans cost a little)
        profile::set_enabled(rep + 1 == reps);
        profile::reset();
        let s = Instant::now();
        let h = bb.forward(&input)?;
        fwd.push(s.elapsed().as_secs_f64());
        profile::reset();
        let s = Instant::now();
        let (_, tape) = bb.forward_train(&input)?;
        fwd_train.push(s.elapsed().as_secs_f64());
        let s = Instant::now();
        let d = bb.backward(&tape, &h.ones_like()?)?;
        bwd.push(s.elapsed().as_secs_f64());
        drop(d);
    }
    let kinds = profile::totals();
    profile::set_enabled(false);
    let (f, ft, bw) = (median(fwd), median(fwd_train), median(bwd));
    let real: usize = lens.iter().sum();
    let shared = args.shared_prefix;
    let computed = real - shared * (args.batch.saturating_sub(1));
    let tokens = real as f64;
    let keys = lens.iter().map(|&l| (l * (l + 1) / 2) as f64).sum::<f64>() / tokens;
    let needed = forward_flops(&info, computed as f64, keys);
    let ceiling = matmul_ceiling(&info, computed.max(1));
    let achieved = needed / f / 1e9;
    let threads = rayon::current_num_threads();
    let summary = json!({
        "workload": "backbone", "model": args.random_llama.as_ref().map_or(args.model.clone(), |s| format!("random-llama {s}")), "batch": args.batch, "len": args.len,
        "real_tokens": real, "computed_tokens": computed, "shared_prefix": shared, "threads": threads,
        "forward_s": f, "forward_tokens_per_s": tokens / f, "forward_keep_tape_s": ft, "backward_s": bw,
        "train_step_backbone_s": ft + bw, "forward_gflop": needed / 1e9, "forward_gflops": achieved,
        "matmul_ceiling_gflops": ceiling, "forward_efficiency": achieved / ceiling,
        "params_m": info.params as f64 / 1e6,
        "peak_rss_mb": crate::memory::memory_mib().map(|(_, peak)| peak),
    });
    if args.json {
        println!("{summary}");
        print_profile(&kinds, 1.0, true);
        return Ok(());
    }
    println!(
        "model {} · batch {} × {} positions ({real} real, {computed} computed: shared prefix {shared}) · {threads} threads",
        args.model, args.batch, args.len
    );
    println!(
        "forward (inference):    {:8.1} ms  {:8.0} tokens/s",
        f * 1e3,
        tokens / f
    );
    println!("forward (keep tape):    {:8.1} ms", ft * 1e3);
    println!(
        "input-gradient backward:{:8.1} ms  (backward/forward = {:.2})",
        bw * 1e3,
        bw / ft
    );
    println!(
        "training step (fwd+bwd):{:8.1} ms  {:8.0} tokens/s",
        (ft + bw) * 1e3,
        tokens / (ft + bw)
    );
    println!(
        "forward work {:.1} GFLOP at {achieved:.1} GFLOP/s = {:.0}% of this machine's f32 matmul ceiling ({ceiling:.1} GFLOP/s, same product, same run)",
        needed / 1e9,
        100.0 * achieved / ceiling
    );
    if !kinds.is_empty() {
        println!("where the time goes (one training forward + backward, seconds):");
        print_profile(&kinds, 1.0, false);
    }
    Ok(())
}
