//! How close this CPU's f32 products get to its arithmetic peak on SmolLM2's linear layers:
//! the `gemm` crate (which the quantized/f16 weights and the attention use) against the packed
//! product that f32 weights use (`softprompt_kernels::packed`). The evidence behind
//! docs/PERFORMANCE.md's "Evaluation throughput" section.
//!
//! `cargo run --release -p softprompt-kernels --example gemm_ceiling` prints, measured in one
//! run with every thread of rayon's pool: the FMA peak (independent 8-lane fused multiply-adds
//! on registers only; x86-64 with AVX2/FMA), then for each linear layer of SmolLM2-135M on an
//! evaluation batch (552 positions) the forward `x · Wᵀ` and the input gradient `dy · W` by
//! both products, alternated three times (best of each). Last, the vocabulary head on a few
//! rows (SmolLM2's 49152 × 576 table): the `gemm` crate against `softprompt_kernels::head`.

use softprompt_kernels::head;
use softprompt_kernels::matmul::{matmul, matmul_wt};
use softprompt_kernels::packed::PackedWeight;
use std::time::Instant;

fn main() {
    let threads = rayon::current_num_threads();
    println!("{threads} threads");
    let peak = fma_peak(threads);
    match peak {
        Some(p) => println!("FMA peak (registers only): {p:.1} GFLOP/s"),
        None => println!("FMA peak: not measured (x86-64 with AVX2/FMA only)"),
    }
    let share = |g: f64| peak.map_or(String::new(), |p| format!(" ({:2.0}%)", 100.0 * g / p));
    println!("SmolLM2-135M products, 552 positions (GFLOP/s, best of 3, alternated):");
    println!("  layer      k     n   forward: gemm     packed           input gradient: gemm     packed");
    for (name, k, n) in [
        ("q|k|v", 576, 960),
        ("o-proj", 576, 576),
        ("gate|up", 576, 3072),
        ("down", 1536, 576),
    ] {
        let [fg, fp, bg, bp] = compare(552, k, n);
        println!(
            "  {name:8} {k:5} {n:5}   {fg:6.1}{}  {fp:6.1}{} {:.2}x   {bg:6.1}{}  {bp:6.1}{} {:.2}x",
            share(fg),
            share(fp),
            fp / fg,
            share(bg),
            share(bp),
            bp / bg
        );
    }
    println!("vocabulary head 49152 x 576 (ms per call, best of 3, alternated):");
    println!("  rows    gemm    head");
    for m in [1, 8, 16] {
        let [g, h] = compare_head(m, 576, 49152);
        println!("  {m:4}  {g:6.2}  {h:6.2}  {:.2}x", g / h);
    }
}

/// Milliseconds per head call on `m` rows: the `gemm` crate, then `head::logits`.
fn compare_head(m: usize, d: usize, n: usize) -> [f64; 2] {
    let x: Vec<f32> = (0..m * d).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
    let table: Vec<f32> = (0..n * d).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01).collect();
    let (mut by_gemm, mut by_head) = (vec![0f32; m * n], vec![0f32; m * n]);
    let mut best = [f64::MAX; 2];
    for _ in 0..3 {
        let runs: [&mut dyn FnMut(); 2] = [&mut || matmul_wt(&x, &table, &mut by_gemm, m, d, n, false), &mut || {
            head::logits(&x, &table, &mut by_head, m, d, n)
        }];
        for (b, run) in best.iter_mut().zip(runs) {
            *b = b.min(1e3 / gflops(1e9, run));
        }
    }
    let worst = by_gemm
        .iter()
        .zip(&by_head)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "the head disagrees with gemm by {worst}");
    best
}

/// GFLOP/s of the forward and input-gradient products of a `[n, k]` weight on `m` rows: gemm
/// forward, packed forward, gemm gradient, packed gradient. Panics if the two disagree.
fn compare(m: usize, k: usize, n: usize) -> [f64; 4] {
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
    let dy: Vec<f32> = (0..m * n).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
    let packed = PackedWeight::pack(&w, n, k);
    let (mut out_gemm, mut out_packed) = (vec![0f32; m * n], vec![0f32; m * n]);
    let (mut dx_gemm, mut dx_packed) = (vec![0f32; m * k], vec![0f32; m * k]);
    let flops = 2.0 * (m * k * n) as f64;
    let mut best = [0f64; 4];
    for _ in 0..3 {
        let runs: [&mut dyn FnMut(); 4] = [
            &mut || matmul_wt(&x, &w, &mut out_gemm, m, k, n, false),
            &mut || packed.forward(&x, &mut out_packed, m, false),
            &mut || matmul(&dy, &w, &mut dx_gemm, m, n, k, false),
            &mut || packed.backward(&dy, &mut dx_packed, m, false),
        ];
        for (b, run) in best.iter_mut().zip(runs) {
            *b = b.max(gflops(flops, run));
        }
    }
    for (a, b) in [(&out_gemm, &out_packed), (&dx_gemm, &dx_packed)] {
        let worst = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-2, "the packed product disagrees with gemm by {worst}");
    }
    best
}

/// GFLOP/s of `f` (one warm-up call, then the mean of ten).
fn gflops(flops: f64, f: &mut dyn FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..10 {
        f();
    }
    10.0 * flops / start.elapsed().as_secs_f64() / 1e9
}

/// GFLOP/s of `threads` threads each running 12 independent FMA chains on registers (enough
/// to hide the FMA latency on two pipes); None without AVX2/FMA.
fn fma_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        const ITERS: usize = 100_000_000;
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                // SAFETY: AVX2 and FMA were detected above.
                s.spawn(|| unsafe { fma_chains(ITERS) });
            }
        });
        return Some((threads * ITERS * 12 * 16) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    None
}

/// Twelve chains of `iters` dependent 8-lane FMAs each.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 12];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for c in &mut acc {
            *c = _mm256_fmadd_ps(a, *c, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for c in acc {
        sum = _mm256_add_ps(sum, c);
    }
    _mm256_cvtss_f32(sum)
}
