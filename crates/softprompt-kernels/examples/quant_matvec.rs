//! The weights one decode step of SmolLM2-135M reads, as its Q4_1 GGUF stores them (30 layers
//! of q|k|v, o, gate|up, down) and its Q8_0 vocabulary head, multiplied with `m` activation
//! rows by the quantized kernels (`softprompt_kernels::quant`), each kernel family this CPU
//! runs. Every layer has its own buffers, so the weights stream from memory as in decode.
//!
//! `cargo run --release -p softprompt-kernels --example quant_matvec [TYPE] [M...]` (default
//! Q4_1 layers; 1 4 16 rows)
//! prints milliseconds per step and the weight bytes read per second, best of 7 (the kernel
//! families alternating; the portable kernels only up to 4 rows).

use softprompt_kernels::quant::{matmul_wt_with, Isa, QuantRows, QuantType};
use std::time::Instant;

/// One weight: type, rows, columns, blocks (random codes, small factors).
struct Weight {
    t: QuantType,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

fn weight(t: QuantType, rows: usize, cols: usize, seed: &mut u64) -> Weight {
    let n = rows * cols / t.block_values() * t.block_bytes();
    let mut bytes: Vec<u8> = (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect();
    // finite f16 factors (0x2000 ≈ 0.0078)
    for b in bytes.chunks_exact_mut(t.block_bytes()) {
        let at: &[usize] = if t == QuantType::Q6K { &[208] } else { &[0, 2] };
        for &a in at {
            if t == QuantType::Q8_0 && a == 2 {
                continue;
            }
            b[a] = 0;
            b[a + 1] = 0x20;
        }
    }
    Weight { t, rows, cols, bytes }
}

fn main() {
    // an optional first argument: the layers' type instead of Q4_1 (q4_0, q8_0, q4_k, q5_k, q6_k)
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let layer_type = match args.first().map(|a| a.to_lowercase()) {
        Some(t) if t.parse::<usize>().is_err() => {
            args.remove(0);
            match t.as_str() {
                "q4_0" => QuantType::Q4_0,
                "q4_1" => QuantType::Q4_1,
                "q8_0" => QuantType::Q8_0,
                "q4_k" => QuantType::Q4K,
                "q5_k" => QuantType::Q5K,
                "q6_k" => QuantType::Q6K,
                other => panic!("unknown type {other}"),
            }
        }
        _ => QuantType::Q4_1,
    };
    let ms: Vec<usize> = args.iter().map(|a| a.parse().expect("M is a number of rows")).collect();
    let ms = if ms.is_empty() { vec![1, 4, 16] } else { ms };
    // SmolLM2-135M's shape; its rows (576) are no whole K-quant super-blocks, so those run on a
    // shape of their own (1024 wide, 2816 inner, 16 layers)
    let (d, inter, kv, layers) = if layer_type.is_k() {
        (1024, 2816, 256, 16)
    } else {
        (576, 1536, 192, 30)
    };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut weights = Vec::new();
    for _ in 0..layers {
        weights.push(weight(layer_type, d + 2 * kv, d, &mut seed));
        weights.push(weight(layer_type, d, d, &mut seed));
        weights.push(weight(layer_type, 2 * inter, d, &mut seed));
        weights.push(weight(layer_type, d, inter, &mut seed));
    }
    weights.push(weight(QuantType::Q8_0, 49152, d, &mut seed));
    let bytes: usize = weights.iter().map(|w| w.bytes.len()).sum();
    println!(
        "{} threads; one step reads {:.1} MB of weights ({layers} layers of {layer_type:?} [{d}, {inter}], a Q8_0 head)",
        rayon::current_num_threads(),
        bytes as f64 / 1e6
    );
    // the ceiling: the same bytes only read (xor-ed), on every thread
    let mut best = f64::INFINITY;
    let mut total = 0u64;
    for _ in 0..5 {
        let start = Instant::now();
        for w in &weights {
            use rayon::prelude::*;
            total += w
                .bytes
                .par_chunks(1 << 14)
                .map(|c| {
                    c.chunks_exact(8)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .fold(0, |a, v| a ^ v)
                })
                .reduce(|| 0, |a, b| a ^ b);
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "read only: {:.2} ms ({:.1} GB/s; checksum {total})",
        best * 1e3,
        bytes as f64 / best / 1e9
    );
    for &m in &ms {
        let xs: Vec<Vec<f32>> = weights
            .iter()
            .map(|w| {
                (0..m * w.cols)
                    .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                    .collect()
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; m * w.rows]).collect();
        // the kernel families alternate, best of 7 each: load from elsewhere hits all alike
        let isas: Vec<Isa> = Isa::ALL
            .into_iter()
            .filter(|i| i.available() && (m <= 4 || *i != Isa::Portable))
            .collect();
        let mut best = vec![f64::INFINITY; isas.len()];
        for _ in 0..7 {
            for (isa, best) in isas.iter().zip(best.iter_mut()) {
                let start = Instant::now();
                for ((w, x), out) in weights.iter().zip(&xs).zip(outs.iter_mut()) {
                    let parts = [QuantRows::new(w.t, w.rows, w.cols, &w.bytes)];
                    matmul_wt_with(*isa, &parts, x, out, m, false);
                }
                *best = best.min(start.elapsed().as_secs_f64());
            }
        }
        let mut line = format!("m = {m:2}:");
        for (isa, s) in isas.iter().zip(&best) {
            line += &format!("  {isa:?} {:.2} ms ({:.1} GB/s)", s * 1e3, bytes as f64 / s / 1e9);
        }
        println!("{line}");
    }
}
