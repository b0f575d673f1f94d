//! `softprompt bench`: times the frozen backbone's forward, training forward and input-gradient
//! backward on a batch like a training step's, and prints the figures of one run.

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Args;
use softprompt::backbone::BackboneInput;
use std::time::Instant;

/// Arguments of `bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// MODEL.
    #[arg(default_value = "smollm2-135m")]
    model: String,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Positions per row.
    #[arg(long, default_value_t = 64)]
    len: usize,
    /// Give rows random lengths between half and all of --len (right-padded, as in training).
    #[arg(long)]
    ragged: bool,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let model = crate::model_cmds::load(&args.model)?;
    let bb = model.backbone.as_ref();
    let (b, t) = (args.batch, args.len);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 20000) as u32 + 100).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let lens: Vec<usize> = (0..b)
        .map(|r| {
            if args.ragged {
                t / 2 + (r * 7919 + 13) % (t - t / 2 + 1)
            } else {
                t
            }
        })
        .map(|l| l.min(t))
        .collect();
    let mask: Vec<u32> = (0..b * t).map(|i| u32::from(i % t < lens[i / t])).collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
    let embeds = bb.embed(&ids)?;
    let input = BackboneInput {
        embeds: &embeds,
        mask: &mask,
        token_types: None,
    };
    let (mut fwd, mut fwd_train, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.reps.max(1) {
        let s = Instant::now();
        let h = bb.forward(&input)?;
        fwd.push(s.elapsed().as_secs_f64());
        let s = Instant::now();
        let (_, tape) = bb.forward_train(&input)?;
        fwd_train.push(s.elapsed().as_secs_f64());
        let s = Instant::now();
        let d = bb.backward(&tape, &h.ones_like()?)?;
        bwd.push(s.elapsed().as_secs_f64());
        drop(d);
    }
    let (f, ft, bw) = (median(fwd), median(fwd_train), median(bwd));
    let tokens = lens.iter().sum::<usize>() as f64;
    println!(
        "model {} · batch {b} × {t} positions ({tokens} real) · {} threads",
        args.model,
        rayon::current_num_threads()
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
    Ok(())
}
